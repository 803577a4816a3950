"""Entry point; the implementation is ``megalign.cli.convert``."""

import sys

from megalign.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
