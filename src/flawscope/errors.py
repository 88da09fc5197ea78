"""Errors a user can act on.

Everything raised as a :class:`FlawscopeError` is shown by the CLI as a one-line message
(no traceback) and turns into a non-zero exit code. Library callers can catch it to tell
bad input apart from bugs.
"""


class FlawscopeError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class DataError(FlawscopeError):
    """A dataset folder, image or mask is missing, malformed or inconsistent."""


class ModelFileError(FlawscopeError):
    """A saved model directory is missing, corrupt, tampered with or too new."""


class TileGridError(DataError):
    """An image's tiles lie elsewhere than those a model with statistics per tile position
    was fitted on (a different working size: another pose, crop or camera)."""
