"""Measuring ONNX files as a deployment would: latency per batch size and peak memory.

:func:`bench_onnx` runs one file in a fresh Python process of its own (``_onnx_timer.py``, which
imports numpy and onnxruntime only), so that its peak resident memory is that of the runtime and
the model, not of this process, and files compared are measured alike: onnxruntime on the CPU
with ``threads`` intra-op threads, a few warm-up calls, then ``runs`` timed calls per batch size
on real inputs (median and 90th percentile, in ms). Why our own loop: onnxruntime's
``perf_test`` is a C++ tool that pip does not install.

Example:
    >>> import numpy as np, tempfile, os, torch
    >>> from slimtune.trainers import export_onnx
    >>> path = os.path.join(tempfile.mkdtemp(), "m.onnx")
    >>> _ = export_onnx(torch.nn.Linear(4, 2), torch.randn(1, 4), path)
    >>> timing = bench_onnx(path, np.random.rand(8, 4).astype(np.float32), batches=(1, 8), runs=5)
    >>> sorted(timing.latency_ms), 0 < timing.peak_rss_mib < 500
    ([1, 8], True)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimtune.spaces import SpecError

TIMER = Path(__file__).with_name("_onnx_timer.py")


@dataclass
class OnnxTiming:
    """One file's latency per batch size (``{batch: (median ms, p90 ms)}``) and the peak
    resident memory of the process that loaded and ran it (MiB)."""

    latency_ms: dict[int, tuple[float, float]]
    peak_rss_mib: float


def bench_onnx(path: str | os.PathLike[str], inputs: np.ndarray, batches: tuple[int, ...] = (1, 256),
               threads: int = 1, runs: int = 200) -> OnnxTiming:
    """Latency and peak memory of the ONNX file at ``path`` on ``inputs`` (see the module
    docstring), measured in a fresh process; a run that fails is a :class:`SpecError`."""
    with tempfile.TemporaryDirectory(prefix="slimtune-timer-") as folder:
        feed = Path(folder) / "inputs.npy"
        np.save(feed, inputs, allow_pickle=False)
        done = subprocess.run([sys.executable, str(TIMER), os.fspath(path), str(feed), str(threads), str(runs),
                               ",".join(map(str, batches))], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SpecError("bench", os.fspath(path), "an ONNX file onnxruntime runs", f"fails to run ({last[:300]})")
    report = json.loads(done.stdout)
    return OnnxTiming({int(b): (m, p) for b, (m, p) in report["latency_ms"].items()}, report["peak_rss_mib"])
