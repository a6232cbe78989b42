"""Which ONNX Runtime library the extension loads for its second engine.

The extension looks at ``$ONNXOPT_ORT_LIB``, then ``$ORT_DYLIB_PATH``, then asks
``python3`` on the PATH for its ``onnxruntime`` package, which in a virtual environment that
is not activated is another interpreter's. On import, the package therefore points
``$ONNXOPT_ORT_LIB`` at the library of the ``onnxruntime`` package that *this* interpreter
finds (without importing it), unless one of the variables is set already.
"""

import importlib.util
import os
import sys
from pathlib import Path


def _library(capi):
    """The ONNX Runtime library in ``capi`` (the versioned name when there are several)."""
    if sys.platform == "darwin":
        found = [p for p in capi.glob("libonnxruntime.*") if p.name.endswith(".dylib")]
    elif sys.platform == "win32":
        found = list(capi.glob("onnxruntime.dll"))
    else:
        found = list(capi.glob("libonnxruntime.so*"))
    found = sorted(p for p in found if p.is_file())
    return found[-1] if found else None


def point_at_this_interpreters_onnxruntime():
    if os.environ.get("ONNXOPT_ORT_LIB") or os.environ.get("ORT_DYLIB_PATH"):
        return
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    library = _library(Path(list(spec.submodule_search_locations)[0]) / "capi")
    if library is not None:
        os.environ["ONNXOPT_ORT_LIB"] = str(library)
