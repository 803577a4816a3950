"""Entry point; the command is ``megalign.cli.train_tokenizer``."""

import sys

from megalign.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
