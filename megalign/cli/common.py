"""What every command shares: one way to report an error and choose the exit code."""

from __future__ import annotations

import json
import sys
from typing import Callable, Optional

from megalign.errors import USER_ERRORS

# bad input (a config key, a file, a checkpoint): exit 2 with one line, never a traceback
INPUT_ERRORS = (*USER_ERRORS, ValueError, OSError)


def run_command(prog: str, body: Callable[[], Optional[int]]) -> int:
    """``body()``'s exit code (0 when it returns None); an input error is one line on stderr and
    exit code 2. Process groups are shut down either way."""
    from megalign import distributed

    try:
        return body() or 0
    except INPUT_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.shutdown()


def print_result(result: dict, output: Optional[str]) -> None:
    """The result as one JSON line on stdout and, when asked, in ``output``."""
    line = json.dumps(result, default=str)
    print(line, flush=True)
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(line + "\n")
