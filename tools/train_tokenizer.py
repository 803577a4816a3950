"""Entry point; the implementation is ``megalign.data.train_tokenizer``."""

import sys

from megalign.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
