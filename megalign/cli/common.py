"""What every command shares: one-line failures with conventional exit codes.

Exit codes: 0 done; 2 bad input or arguments (a config key, a file or line, a checkpoint, a usage
error); 1 the environment or the run (permissions, disk space, a child process killed from
outside); 130 Ctrl-C (SIGINT) and 143 SIGTERM, raised as ``Interrupted`` so that every
``finally`` (temporary files, child processes) runs. A failure is one line on stderr; an
unexpected exception keeps its traceback unless the command asks for one line (the data tools,
whose failures come from child processes).
"""

# Imports inside functions are deliberate here: the data tools never import torch: process groups
# are shut down only where torch.distributed was loaded.

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

from megalign.errors import USER_ERRORS, one_line
from megalign.platform.stop_signals import Interrupted, stop_signals_raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit code 2), like every other failure."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def describe_os_error(err: OSError) -> str:
    if err.filename is None:
        return one_line(err)
    return (f"cannot use '{err.filename}': {err.strerror} "
            "(check its permissions and free disk space)")


def run_command(prog: str, body: Callable[[], Optional[int]],
                one_line_failures: bool = False) -> int:
    """``body()``'s exit code (0 when it returns None), failures told in one line (see above).
    Process groups the body started are shut down either way."""
    try:
        with stop_signals_raise():
            return body() or 0
    except Interrupted as stop:
        print(f"{prog}: stopped by {stop}; no output written", file=sys.stderr)
        return 128 + stop.signum
    except (*USER_ERRORS, ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{prog}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if not one_line_failures:
            raise
        kind = "" if isinstance(err, RuntimeError) else f"{type(err).__name__}: "
        print(f"{prog}: error: {kind}{one_line(err)}", file=sys.stderr)
        return 1
    finally:
        if "torch.distributed" in sys.modules:  # the data tools never import torch
            from megalign import distributed

            distributed.shutdown()


def print_result(result: dict, output: Optional[str]) -> None:
    """The result as one JSON line on stdout and, when asked, in ``output``."""
    line = json.dumps(result, default=str)
    print(line, flush=True)
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            handle.write(line + "\n")
