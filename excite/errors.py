"""User-facing errors.

Anything raised as an :class:`ExciteError` is a mistake the user can fix (a wrong path, a bad flag, a
checkpoint that does not fit). The CLI prints its message as one line on stderr and exits non-zero;
every other exception is a bug and keeps its traceback.
"""


class ExciteError(Exception):
    """A problem with the user's input, reported as one line that says what to do."""

    exit_code = 2  # the CLI's exit status, as argparse uses for usage errors


class UnknownModelError(ValueError):
    """``create_model`` was given a name that is not registered.

    A ``ValueError``, not an :class:`ExciteError`, like every other argument the model layer refuses: the
    callers that take the name from the user (the CLI, ``fit``, checkpoints) turn it into their one line.
    """


class CheckpointError(ExciteError):
    """A checkpoint or weights file is missing, unsafe, corrupt or does not fit the model."""


class DataError(ExciteError):
    """The data set cannot be used as given."""


class NonFiniteLossError(ExciteError):
    """Training produced a NaN or infinite loss."""


class RunInterrupted(ExciteError):
    """The user stopped a run (Ctrl-C); the message says how to resume it."""

    exit_code = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C
