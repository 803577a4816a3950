"""megalign-train, except that rank ``--rank`` raises once, in the optimizer step of iteration
``--iteration`` of the first attempt (a marker file records that it did): a fault that leaves
every process alive, as in-process restart is meant to absorb; with ``--unrecoverable``, an error
the user must act on (TrainingError) instead."""

import argparse
import os
import sys

from megalign.cli import train
from megalign.errors import TrainingError
from megalign.training.trainer import Trainer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--marker", required=True)
    parser.add_argument("--unrecoverable", action="store_true")
    args, rest = parser.parse_known_args()
    optimizer_step = Trainer.optimizer_step

    def faulty_optimizer_step(trainer):
        if (int(os.environ["RANK"]) == args.rank and trainer.iteration + 1 == args.iteration
                and not os.path.exists(args.marker)):
            open(args.marker, "w").close()
            error = TrainingError if args.unrecoverable else RuntimeError
            raise error(f"injected fault at iteration {args.iteration}")
        return optimizer_step(trainer)

    Trainer.optimizer_step = faulty_optimizer_step
    return train.main(rest)


if __name__ == "__main__":  # the checkpoint writer's spawned helper imports this file again
    sys.exit(main())
