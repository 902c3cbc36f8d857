"""`python -m pipeline <command>` (pipeline.cli). Under pipeline.commands.supervise, the exit status is also written where
the supervisor reads it (a launcher in between may turn a rank's 75 into its own failure status).

When the command has returned, the objects alive then are frozen out of the cyclic garbage collector (`gc.freeze`):
the interpreter's shutdown otherwise walks the whole import graph of torch, DeepSpeed and open_clip in its final
collections, about 1.2 s per process measured on 2 cores (0.3 s frozen), paid by every rank of every launch. Files
are closed by the commands themselves (metrics, checkpoints, TensorBoard) and atexit handlers still run; only
reference cycles still alive at exit are left to the operating system instead of being collected.
"""

import gc
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
        gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(run())
