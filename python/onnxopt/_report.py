"""The report of an ``optimize`` or ``validate`` call."""

import copy
import json


class Facts(dict):
    """A part of a report: a dict whose keys also read as attributes
    (``report.validation.outputs[0].cosine``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __dir__(self):
        return list(self.keys()) + list(super().__dir__())


def _facts(value):
    if isinstance(value, dict):
        return Facts((k, _facts(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_facts(v) for v in value]
    return value


class Report:
    """The facts the command line's ``--report FILE.json`` holds, as attributes:

    - ``onnxopt_version``
    - ``input``: ``path`` (``"<bytes>"`` for a model given in memory), ``file_bytes``, ``nodes``
    - ``target``: the runtime the output was built for
    - ``passes``: ``rounds``, ``converged``, and per pass (``passes.passes``) the node counts
      before and after, seconds and rewrites
    - ``pruning``, ``quantization`` (with ``calibration``: method, batches, ranges)
    - ``validation``: the engine, batches, the table of ``outputs`` (``name``, ``max_abs``,
      ``max_rel``, ``cosine``, ``kl_divergence``), ``tolerance`` and ``violations``
    - ``check``: the output check of a lossless run (``outcome``)
    - ``output``: what was written (``path``, ``bytes``, ``external_data``), or None
    - ``warnings``

    Parts that did not happen are None. ``model`` is the optimized model when ``optimize``
    was given no output path (``bytes``, or an ``onnx.ModelProto`` with ``as_proto=True``).
    ``str(report)`` is the text the command line prints.
    """

    _FIELDS = (
        "onnxopt_version",
        "input",
        "target",
        "passes",
        "pruning",
        "quantization",
        "validation",
        "check",
        "output",
        "warnings",
    )

    def __init__(self, data, text="", model=None):
        self._data = data
        self._text = text
        self.model = model
        for field in self._FIELDS:
            setattr(self, field, _facts(data.get(field)))

    @property
    def passed(self):
        """Whether the result was shown to match the input: the validation's verdict when
        there was one, else the output check's; None when neither was done."""
        if self.validation is not None:
            return not self.validation.violations
        if self.check is not None:
            outcome = self.check.outcome
            if isinstance(outcome, dict) and "passed" in outcome:
                return True
            if isinstance(outcome, dict) and "failed" in outcome:
                return False
        return None

    def to_dict(self):
        """The report as the command line's JSON holds it (a copy)."""
        return copy.deepcopy(self._data)

    def to_json(self):
        """The report as ``--report FILE.json`` writes it."""
        return json.dumps(self._data, indent=2)

    def __str__(self):
        return self._text

    def __repr__(self):
        parts = [f"onnxopt {self.onnxopt_version}"]
        if self.passes is not None:
            parts.append(f"{len(self.passes.passes)} passes in {self.passes.rounds} rounds")
        if self.quantization is not None:
            parts.append(str(self.quantization.mode))
        if self.passed is not None:
            parts.append("passed" if self.passed else "FAILED")
        return f"<Report {', '.join(parts)}>"
