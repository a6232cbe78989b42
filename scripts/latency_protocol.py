"""The one latency protocol of this repository's scripts (and of the benches, which call them):

- ONNX Runtime CPU, every model compared in one process;
- `threads` intra-op threads in one pool all sessions share: with a pool per session, the
  workers of the session that just ran keep spinning while the next one runs, which on a
  2-core machine added 25-60 ms to every BERT-base run at 1x128 and pulled every ratio
  towards 1 (`ort_latency.py`'s doc has the figures);
- the models alternated within each round, so that machine noise hits them alike;
- `WARMUP` rounds first, then the median of at least `MIN_ROUNDS` rounds.

`describe(threads, rounds)` says so in each script's JSON output; a table built from these
scripts names this protocol."""
import statistics
import time

import onnxruntime as ort

MIN_ROUNDS = 15
WARMUP = 3

_pool_threads = None


def open_sessions(paths, threads):
    """CPU sessions of `paths` on the process's one shared intra-op pool of `threads` threads
    (made on the first call; ONNX Runtime refuses a second pool, so every later call must ask
    for the same size)."""
    global _pool_threads
    if _pool_threads is None:
        ort.set_global_thread_pool_sizes(threads, 1)
        _pool_threads = threads
    elif _pool_threads != threads:
        raise ValueError(f"the shared pool has {_pool_threads} threads, not {threads}")
    sessions = []
    for path in paths:
        options = ort.SessionOptions()
        options.use_per_session_threads = False
        sessions.append(ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]))
    return sessions


def alternate(runs, rounds):
    """Median seconds of each of `runs` (callables taking no argument), called in turn within
    each round: `WARMUP` rounds, then `rounds` timed ones."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"{rounds} rounds: the protocol takes the median of at least {MIN_ROUNDS}")
    times = [[] for _ in runs]
    for r in range(WARMUP + rounds):
        for k, run in enumerate(runs):
            start = time.perf_counter()
            run()
            if r >= WARMUP:
                times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def describe(threads, rounds):
    """The protocol's parameters, for a script's JSON output."""
    return {
        "protocol": f"onnxruntime {ort.__version__} CPU, one process, one shared pool of "
        f"{threads} threads, models alternated, {WARMUP} warm-up rounds, median of {rounds}",
        "threads": threads,
        "rounds": rounds,
    }
