"""Entry point; the implementation is ``megalign.convert.cli``."""

import sys

from megalign.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
