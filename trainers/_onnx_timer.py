"""Times one ONNX file in onnxruntime, run as a script in a process of its own (numpy and
onnxruntime only, so the peak memory it reports is the model's and the runtime's, not torch's).

``python _onnx_timer.py MODEL INPUTS.npy THREADS RUNS B[,B...]`` prints
``{"latency_ms": {"B": [median, p90]}, "peak_rss_mib": ...}``; ``bench_onnx`` runs it.

Example:
    >>> _batch_of(np.arange(3), 7).tolist()
    [0, 1, 2, 0, 1, 2, 0]
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np

WARMUP_CALLS = 10


def _batch_of(inputs: np.ndarray, size: int) -> np.ndarray:
    """``size`` inputs: the first ones, repeated when there are fewer."""
    reps = -(-size // len(inputs))
    return np.concatenate([inputs] * reps)[:size] if reps > 1 else inputs[:size]


def measure(path: str, inputs: np.ndarray, batches: list[int], threads: int, runs: int) -> dict:
    """Median and 90th-percentile latency (ms) of ``runs`` calls per batch size, after warm-up
    calls, and this process's peak resident memory (MiB)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    latency = {}
    for size in batches:
        feed = {name: _batch_of(inputs, size)}
        for _ in range(WARMUP_CALLS):
            session.run(None, feed)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append(1e3 * (time.perf_counter() - start))
        latency[str(size)] = [float(np.median(times)), float(np.percentile(times, 90))]
    return {"latency_ms": latency, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: Linux's ``VmHWM`` (of this program's own
    memory; ``ru_maxrss`` would keep the forking parent's across ``exec``), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    model, inputs, threads, runs, batches = sys.argv[1:6]
    print(json.dumps(measure(model, np.load(inputs, allow_pickle=False), [int(b) for b in batches.split(",")],
                             int(threads), int(runs))))
