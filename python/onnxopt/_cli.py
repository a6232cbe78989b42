"""The ``onnxopt`` console script: the Rust command line, run by the extension module.

The wheel holds one native build, the extension; its ``cli_main`` is the ``onnxopt``
binary's ``main`` (same arguments, output and exit codes), so the command needs no second
executable in the wheel.
"""

import signal
import sys

from . import _onnxopt


def main(argv=None):
    """Runs ``onnxopt`` with ``argv`` (default: this process's arguments) and returns its
    exit code. Meant for a process of its own (the console script, ``python -m onnxopt``):
    Ctrl-C ends the process at once, as it ends the binary."""
    args = sys.argv if argv is None else ["onnxopt", *argv]
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stdout.flush()
    return _onnxopt.cli_main([str(a) for a in args])
