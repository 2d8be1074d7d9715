"""One exception hierarchy. The CLI maps each class to an exit code and a one-line message."""


class OnnxGenieError(Exception):
    """Base class. ``str(err)`` is the one line shown to the user: the problem, then the fix."""

    exit_code = 1


class BadInputError(OnnxGenieError):
    """The user's model, data or flags cannot be used as given (exit 2)."""

    exit_code = 2


class UnsupportedModelError(BadInputError):
    """A valid model this tool cannot handle (op, shape, layout)."""


class NoBatchNormError(UnsupportedModelError):
    """Zero-shot needs BatchNormalization statistics and the model has none."""


class ResumeMismatchError(BadInputError):
    """``--resume`` on a work directory made for another model, config or seed."""


class BadSettingError(BadInputError, TypeError):
    """A setting or argument of the wrong type, or out of range (NaN, negative, unknown name). Also a
    ``TypeError``, so that code catching Python's own error for a wrong argument still does."""


class OutputExistsError(BadInputError):
    """A path the run would write exists (without ``overwrite``), or is an input or another output."""


class StorageError(BadInputError):
    """A file could not be written: disk full, file size limit, read-only folder (exit 2)."""


class QualityGateError(OnnxGenieError):
    """The quantized model missed a quality threshold the user asked for (exit 3)."""

    exit_code = 3


class DivergenceError(OnnxGenieError):
    """A loss became NaN/Inf and the recovery policy could not rescue it."""

    exit_code = 1
