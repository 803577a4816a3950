"""Megatron-LM-style entry point; the implementation is ``megalign.data.preprocess``."""

import sys

from megalign.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
