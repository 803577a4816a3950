"""megalign-generate run once per argument list, in one process: each run is the command's own
``main``, which opens and loads the checkpoint and shuts its process groups down as a launch of
the command does. Why: a launch per option set costs an interpreter start and Megatron's import
each, most of what a tiny model's decoding costs.

    python tests/workers/generate_many.py JOBS.json   # [[arg, ...], ...]
"""

import json
import sys

from megalign.cli.generate import main

with open(sys.argv[1], encoding="utf-8") as handle:
    jobs = json.load(handle)
for argv in jobs:
    status = main([str(arg) for arg in argv])
    if status:
        sys.exit(f"megalign-generate {' '.join(map(str, argv))} exited {status}")
