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


class WriteRefused(ExciteError, OSError):
    """The system refused to write a file (a full disk, a read-only folder); the file keeps its previous content.

    Raised by :func:`excite.io.atomic_write`, chained from the original error. ``path`` is the file, ``reason``
    the system's words ("No space left on device"), ``errno`` its error number (None when unknown) and
    ``hint`` what the caller adds (see :meth:`with_hint`). Also an ``OSError``, for code that catches those.
    """

    def __init__(self, path, reason: str, errno: int | None = None, hint: str = "", existed: bool = False) -> None:
        super().__init__(errno, reason, str(path))
        self.path, self.reason, self.hint, self.existed = path, reason, hint, existed

    def with_hint(self, hint: str) -> "WriteRefused":
        """The same refusal with ``hint`` appended to the message (e.g. how to resume once it is fixed)."""
        return WriteRefused(self.path, self.reason, self.errno, hint, self.existed)

    def __str__(self) -> str:
        kept = "its previous version is intact" if self.existed else "nothing was written to it"
        return f"{self.reason}: {self.path} could not be written; {kept}" + (f"; {self.hint}" if self.hint else "")


class DataError(ExciteError):
    """The data set cannot be used as given."""


class NonFiniteLossError(ExciteError):
    """Training produced a NaN or infinite loss."""


class RunInterrupted(ExciteError):
    """The user stopped a run (Ctrl-C); the message says how to resume it."""

    exit_code = 130  # 128 + SIGINT, what shells report for a process stopped by Ctrl-C


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
