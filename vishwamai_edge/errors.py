"""User-facing errors.

Library code raises a `UserError` subclass carrying one human sentence when the
user can fix the problem (a missing file, a bad recipe field, a corrupt model).
The CLI prints that sentence and exits with code 2. Anything else is a bug.
"""

from __future__ import annotations

import contextlib
import warnings


class UserError(Exception):
    """A problem the user can fix; the message is one sentence."""


class RecipeError(UserError):
    """A recipe file is missing, malformed or has a wrong field."""


class SourceError(UserError):
    """Model weights cannot be found or read."""


class ExportError(UserError):
    """An export could not be produced or failed its check against the source."""


class BundleError(UserError):
    """A device bundle is missing, corrupt or does not match its manifest."""


class InputError(UserError):
    """A chat input (prompt, image, audio) cannot be used."""


class ContextOverflowError(InputError):
    """A prompt does not fit in the model's context window."""


class MissingDependencyError(UserError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str):
        super().__init__(
            f"{module} is not installed; install it with: pip install 'vishwamai-edge[{extra}]'"
        )


def quiet_transformers():
    """transformers, imported for the build: without its own progress bars and warnings."""
    transformers = require("transformers", "build")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@contextlib.contextmanager
def peft_on_transformers():
    """Around peft's model wrapping: peft 0.21 reads `is_gradient_checkpointing`, an alias that
    transformers 5 deprecated with a FutureWarning on every read. The call is peft's, not ours, so
    this one message (and nothing else) is held back until peft reads `is_activation_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def require(module: str, extra: str):
    """Import an optional heavy module, or raise a one-line error naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the module exists but is broken: a real bug, show it
        raise MissingDependencyError(module, extra) from None


def first_line(exc: BaseException) -> str:
    """An exception's first line, for a one-line message about a library's error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
