"""optimize, validate, inspect, dump: the command line's work, as calls."""

import json
import os
from collections.abc import Mapping

from . import _onnxopt
from ._errors import (
    InvalidArgumentError,
    InvalidModelError,
    OnnxoptError,
    UnsupportedError,
    ValidationError,
)
from ._report import Report

_KINDS = {
    "invalid_model": InvalidModelError,
    "invalid_argument": InvalidArgumentError,
    "validation": ValidationError,
    "unsupported": UnsupportedError,
}


def _call(function, *args, **kwargs):
    """Calls into the extension, raising its failures as the public exception classes."""
    try:
        return function(*args, **kwargs)
    except _onnxopt.Failure as failure:
        kind, message, report_json, report_text = failure.args
        error = _KINDS.get(kind, OnnxoptError)(message)
        if report_json is not None:
            error.report = Report(json.loads(report_json), report_text)
        raise error from None


def _model(model):
    """A model for the extension: a path or ``bytes`` as given (a path is mapped, bytes are
    read in place), an ``onnx.ModelProto`` serialized (its one copy)."""
    if isinstance(model, (str, bytes, bytearray, os.PathLike)):
        return model
    if isinstance(model, memoryview):
        return model.tobytes()
    serialize = getattr(model, "SerializeToString", None)
    if callable(serialize):
        return serialize()
    raise InvalidArgumentError(
        f"a model is a path, bytes or an onnx.ModelProto, not {type(model).__name__}"
    )


def _batches(data, what):
    """Batches for the extension: a folder as given; otherwise a list of ``(name, dict)``.

    ``data`` may be a list of dicts of arrays by input name, any iterable of such dicts, or a
    reader in the convention of ONNX Runtime's ``CalibrationDataReader`` (``get_next()``
    returns a dict per batch, then None). Values go through ``numpy.asarray``. Batches are
    named ``batch_00``, ``batch_01``, ... as files in a folder would be.
    """
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if isinstance(data, Mapping):
        raise InvalidArgumentError(
            f"{what}: a dict is one batch: give a list of dicts (or any iterable of them, or "
            "a reader with get_next())"
        )
    get_next = getattr(data, "get_next", None)
    if callable(get_next):
        items = iter(get_next, None)
    else:
        try:
            items = iter(data)
        except TypeError:
            raise InvalidArgumentError(
                f"{what}: expected a folder or batches (dicts of arrays by input name), not "
                f"{type(data).__name__}"
            ) from None
    import numpy

    batches = []
    for i, batch in enumerate(items):
        if not isinstance(batch, Mapping):
            raise InvalidArgumentError(
                f"{what}: batch {i} is a {type(batch).__name__}, not a dict of arrays by "
                "input name"
            )
        arrays = {str(name): numpy.asarray(value) for name, value in batch.items()}
        batches.append((f"batch_{i:02}", arrays))
    if not batches:
        raise InvalidArgumentError(f"{what}: no batches")
    return batches


def _names(value):
    """A list of strings from a list, a tuple or one comma-free string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


class _Bar:
    """Drives a tqdm-like bar (``update``, ``reset``, ``set_description``) from the
    ``(stage, done, total)`` calls of the extension."""

    def __init__(self, bar, owned):
        self.bar = bar
        self.owned = owned
        self.stage = None
        self.done = 0

    def __call__(self, stage, done, total):
        if stage != self.stage:
            self.stage, self.done = stage, 0
            self.bar.set_description(stage, refresh=False)
            self.bar.reset(total=total)
        elif total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.done)
        self.done = done

    def close(self):
        if self.owned:
            self.bar.close()


def _progress(progress):
    """A ``(stage, done, total)`` callable and its clean-up, from what ``progress`` is:
    None or False (none), True (a tqdm bar, when tqdm is installed), a tqdm class or
    factory, a tqdm bar, or a callable ``progress(stage, done, total)``."""
    if progress is None or progress is False:
        return None, lambda: None
    if progress is True:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            raise InvalidArgumentError("progress=True needs tqdm: pip install tqdm") from None
        progress = tqdm
    if isinstance(progress, type):
        bar = _Bar(progress(total=0, leave=False), owned=True)
        return bar, bar.close
    if all(hasattr(progress, m) for m in ("update", "reset", "set_description")):
        bar = _Bar(progress, owned=False)
        return bar, bar.close
    if callable(progress):
        return progress, lambda: None
    raise InvalidArgumentError(
        "progress: expected a callable(stage, done, total), a tqdm bar or class, True or None"
    )


def _with_progress(progress, function, *args, **kwargs):
    callback, close = _progress(progress)
    try:
        return _call(function, *args, progress=callback, **kwargs)
    finally:
        close()


def _fail(message):
    raise InvalidArgumentError(message)


def optimize(
    model,
    output=None,
    *,
    target="ort",
    passes=None,
    validate=False,
    check=True,
    int8=False,
    int8_dynamic=False,
    fp16=False,
    keep_io_types=False,
    int8_weights=None,
    dynamic_weights=None,
    weights=None,
    block_size=32,
    symmetric=False,
    weights_method="gptq",
    act_order=True,
    gptq_damping=0.1,
    accuracy_level=4,
    lm_head=False,
    calib=None,
    calib_random=None,
    calib_method="mse",
    percentile=None,
    auto_exclude=False,
    smooth_quant=None,
    include=None,
    exclude=None,
    prune=None,
    prune_scope="layer",
    prune_embeddings=False,
    prune_heads=None,
    prune_ffn=None,
    inputs=None,
    batches=2,
    dims=None,
    input_ranges=None,
    seed=0,
    max_error=None,
    min_cosine=None,
    max_kl=None,
    kl_temperature=1.0,
    logits=None,
    perplexity=False,
    engine="auto",
    external_data=None,
    in_place=False,
    as_proto=False,
    progress=None,
):
    """Optimizes ``model`` as ``onnxopt optimize`` does, and returns the ``Report``.

    ``model`` is a path, ``bytes`` or an ``onnx.ModelProto``. With ``output`` (a path) the
    result is written there, as the command line writes it; without, it is returned as
    ``report.model``: ``bytes``, or an ``onnx.ModelProto`` with ``as_proto=True``.

    The keyword arguments are the command line's options (``--int8`` is ``int8=True``,
    ``--calib-method`` is ``calib_method``, ``--no-check`` is ``check=False``,
    ``--no-smooth-quant`` is ``smooth_quant=False``, ``--dim NAME=N`` is ``dims={NAME: N}``,
    ``--input-range NAME=LO:HI`` is ``input_ranges={NAME: (LO, HI)}``,
    ``--external-data``/``--no-external-data`` is ``external_data=True``/``False``,
    ``--weights int4`` is ``weights="int4"``, ``--no-act-order`` is ``act_order=False``).
    ``calib`` and ``inputs`` take a folder, as on the command line, or batches: a list of
    dicts of NumPy arrays by input name, any iterable of such dicts, or a reader with
    ``get_next()`` (ONNX Runtime's ``CalibrationDataReader``). As with a folder, the last
    fifth of the calibration batches is held back for validation unless ``inputs`` is given.

    ``progress`` is a callable ``progress(stage, done, total)``, a tqdm bar or class, or
    True for a tqdm bar; it is called while calibration, validation and the output check
    run, with the GIL released between calls.

    Raises ``InvalidModelError``, ``InvalidArgumentError``, ``ValidationError`` (nothing
    written: the outputs break the tolerance or the output check failed; ``error.report``
    holds what was measured), ``UnsupportedError`` (nothing written: no engine here runs the
    model faithfully), or ``OnnxoptError``.
    """
    if int8 + int8_dynamic + fp16 + (weights is not None) > 1:
        _fail("int8, int8_dynamic, fp16 and weights exclude each other")
    if keep_io_types and not fp16:
        _fail("keep_io_types needs fp16=True")
    if auto_exclude and not int8:
        _fail("auto_exclude needs int8=True")
    if dynamic_weights is not None:
        # The name int8_weights had while it applied to dynamic INT8 only.
        if int8_weights is not None:
            _fail("int8_weights and dynamic_weights (its former name) exclude each other")
        int8_weights = dynamic_weights
    if int8_weights is not None and not (int8 or int8_dynamic):
        _fail("int8_weights needs int8=True or int8_dynamic=True")
    if smooth_quant is True:
        _fail("smooth_quant takes a strength α in [0, 1] (or False: no smoothing)")
    if smooth_quant is not None and smooth_quant is not False and not (int8 or int8_dynamic):
        _fail("smooth_quant needs int8=True or int8_dynamic=True")
    if smooth_quant is False and not (int8 or int8_dynamic):
        _fail("smooth_quant=False needs int8=True or int8_dynamic=True")
    if calib is not None and calib_random is not None:
        _fail("calib and calib_random exclude each other")
    if validate and not check:
        _fail("validate=True and check=False exclude each other")
    if prune_embeddings and prune is None:
        _fail("prune_embeddings needs prune")
    if as_proto and output is not None:
        _fail("as_proto=True returns the model: give no output path")
    model = _model(model)
    if output is not None:
        output = os.fspath(output)
        if (
            not in_place
            and isinstance(model, (str, os.PathLike))
            and os.path.exists(output)
            and os.path.exists(model)
            and os.path.samefile(model, output)
        ):
            _fail(f"`{output}` is the input: pass in_place=True to replace it")
    if isinstance(passes, str):
        passes = passes.split(",")
    data, text, model_bytes = _with_progress(
        progress,
        _onnxopt.optimize,
        model,
        output,
        target=target,
        passes=_names(passes),
        validate=validate,
        check=check,
        int8=int8,
        int8_dynamic=int8_dynamic,
        fp16=fp16,
        keep_io_types=keep_io_types,
        int8_weights=int8_weights,
        weights=weights,
        block_size=block_size,
        symmetric=symmetric,
        weights_method=weights_method,
        act_order=act_order,
        gptq_damping=gptq_damping,
        accuracy_level=accuracy_level,
        lm_head=lm_head,
        calib=_batches(calib, "calib"),
        calib_random=calib_random,
        calib_method=calib_method,
        percentile=percentile,
        auto_exclude=auto_exclude,
        smooth_quant=None if smooth_quant is False else smooth_quant,
        no_smooth_quant=smooth_quant is False,
        include=_names(include),
        exclude=_names(exclude),
        prune=None if prune is None else str(prune),
        prune_scope=prune_scope,
        prune_embeddings=prune_embeddings,
        prune_heads=prune_heads,
        prune_ffn=prune_ffn,
        inputs=_batches(inputs, "inputs"),
        batches=batches,
        dims=dims,
        input_ranges=input_ranges,
        seed=seed,
        max_error=max_error,
        min_cosine=min_cosine,
        max_kl=max_kl,
        kl_temperature=kl_temperature,
        logits=_names(logits),
        perplexity=perplexity,
        engine=engine,
        external_data=external_data,
    )
    result = model_bytes
    if as_proto:
        import onnx

        result = onnx.load_model_from_string(model_bytes)
    return Report(json.loads(data), text, model=result)


def validate(
    reference,
    candidate,
    inputs=None,
    *,
    batches=2,
    dims=None,
    input_ranges=None,
    seed=0,
    max_error=None,
    min_cosine=None,
    max_kl=None,
    kl_temperature=1.0,
    logits=None,
    perplexity=False,
    engine="auto",
    progress=None,
):
    """Runs ``reference`` and ``candidate`` (each a path, ``bytes`` or an
    ``onnx.ModelProto``) on the same inputs and compares every output, as
    ``onnxopt validate`` does; returns the ``Report`` (its ``validation`` holds the table).

    ``inputs`` is a folder or batches (see ``optimize``); None generates ``batches``
    batches (``dims``, ``input_ranges`` and ``seed`` shape them). Without limits, the
    defaults of a lossless rewrite apply. Raises ``ValidationError`` when an output breaks
    the tolerance (``error.report`` holds the table) or the models cannot be compared,
    ``UnsupportedError`` when no engine here runs them faithfully. ``perplexity=True``
    also scores both models' next-token predictions of the batches' ``input_ids``
    (causal language models), in ``validation["perplexity"]``.
    """
    data, text = _with_progress(
        progress,
        _onnxopt.validate,
        _model(reference),
        _model(candidate),
        inputs=_batches(inputs, "inputs"),
        batches=batches,
        dims=dims,
        input_ranges=input_ranges,
        seed=seed,
        max_error=max_error,
        min_cosine=min_cosine,
        max_kl=max_kl,
        kl_temperature=kl_temperature,
        logits=_names(logits),
        perplexity=perplexity,
        engine=engine,
    )
    return Report(json.loads(data), text)


def inspect(model):
    """What ``onnxopt inspect MODEL --json`` prints, as a dict: IR version, opsets,
    producer, the runtime onnxopt built the model for, inputs and outputs with their types,
    parameters, external data files and the operator histogram."""
    return json.loads(_call(_onnxopt.inspect, _model(model)))


def dump(model):
    """What ``onnxopt dump MODEL`` prints: one line per input, output, initializer and node."""
    return _call(_onnxopt.dump, _model(model))
