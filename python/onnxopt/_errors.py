"""The exceptions onnxopt raises: one class per kind of failure a caller branches on.

``str(error)`` is the one-line message the command line prints after ``error:``.
"""


class OnnxoptError(Exception):
    """A failure of onnxopt (the base of the classes below; reading or writing a file, a
    failed quantization or pruning step, ...).

    ``report`` is the report of the run so far where one exists (a ``Report``), else None.
    """

    report = None


class InvalidModelError(OnnxoptError, ValueError):
    """The model is not a usable ONNX model: not a protobuf, truncated, a graph that reads
    undefined values or has a cycle, a tensor that does not match its dims, ..."""


class InvalidArgumentError(OnnxoptError, ValueError):
    """An argument, or the data given (calibration or validation batches), is wrong."""


class ValidationError(OnnxoptError):
    """The result breaks the tolerance, could not be validated, or failed the output check:
    nothing was written (the command line's exit code 3). ``report`` holds what was
    measured."""


class UnsupportedError(OnnxoptError):
    """No engine here runs a model faithfully (an operator tract does not run as its domain
    defines it, and no ONNX Runtime to run it), so it could not be validated: nothing was
    written (exit code 3 on the command line too). ``report`` holds the report so far."""
