"""onnxopt: an ONNX graph optimizer and quantizer for transformer models.

- ``optimize(model, output=None, **options) -> Report``: the pipeline of ``onnxopt optimize``
- ``validate(reference, candidate, inputs=None, **options) -> Report``
- ``inspect(model) -> dict`` and ``dump(model) -> str``

A model is a path, ``bytes`` or an ``onnx.ModelProto``. Failures raise ``OnnxoptError``
subclasses carrying the command line's message. The package also installs the ``onnxopt``
command (the same command line, run from the extension module).
"""

from . import _ort
from ._api import dump, inspect, optimize, validate
from ._errors import (
    InvalidArgumentError,
    InvalidModelError,
    OnnxoptError,
    UnsupportedError,
    ValidationError,
)
from ._onnxopt import __version__
from ._report import Facts, Report

_ort.point_at_this_interpreters_onnxruntime()

__all__ = [
    "optimize",
    "validate",
    "inspect",
    "dump",
    "Report",
    "Facts",
    "OnnxoptError",
    "InvalidModelError",
    "InvalidArgumentError",
    "ValidationError",
    "UnsupportedError",
    "__version__",
]
