"""User-facing errors: the CLI prints their message on one line and exits with code 2.

Raise these for mistakes a user can fix (a missing file, an unreachable URL, a
folder that is not a model). Bugs stay ordinary exceptions with tracebacks.
"""


class EdgeVitError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2


class SourceError(EdgeVitError):
    """A video source cannot be found or opened."""


class ModelLoadError(EdgeVitError):
    """A model path or id does not hold the kind of model that was expected."""


class PromptTooLongError(EdgeVitError):
    """The prompt (image tokens included) does not fit the model's context."""
