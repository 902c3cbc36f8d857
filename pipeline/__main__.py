"""`python -m pipeline <command>` (pipeline.cli). Under pipeline.commands.supervise, the exit status is also written where
the supervisor reads it (a launcher in between may turn a rank's 75 into its own failure status)."""

import sys

from pipeline.cli import main
from pipeline.core.errors import write_exit_status


def run() -> int:
    status = 1  # an exception escapes main: Python prints its traceback and exits 1
    try:
        status = main()
    except SystemExit as exit_:  # argparse: --help 0, a bad argument 2
        status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        raise
    finally:
        write_exit_status(status)
    return status


if __name__ == "__main__":
    sys.exit(run())
