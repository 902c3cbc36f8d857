"""Errors a user can fix: the message names the key, setting or file at fault.

The CLI prints such an error as one line (`error: ...`, exit status 2, rank 0 only); every other
exception is an internal error and keeps its traceback. Leaf module: imports nothing of ours.
"""


class ConfigError(ValueError):
    """A bad configuration, command line or input: the message names the key or setting at fault."""
