"""Megatron-LM-style entry point; the command is ``megalign.cli.preprocess``."""

import sys

from megalign.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
