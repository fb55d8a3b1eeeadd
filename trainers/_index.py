"""Where a tensor's nonzero values are, as bytes an entropy coder compresses well (the artifact's index).

For each nonzero position, in row-major order, the number of zeros before it, written as bytes:
255 means "255 more zeros, read on", any other value ends the run. Run lengths and one byte per
code look wasteful, but they are what LZMA2 needs: it then stores them within a few percent of
their order-0 entropy. Shared by every entry kind that stores only the nonzero values.

Example:
    >>> import numpy as np
    >>> run_lengths(np.array([0, 0, 1, 1] + [0] * 300 + [1], dtype=bool))
    b'\\x02\\x00\\xff-'
    >>> positions(run_lengths(np.array([0, 1, 0, 1], dtype=bool)), 4).tolist()
    [False, True, False, True]
"""

from __future__ import annotations

import numpy as np


def run_lengths(nonzero: np.ndarray) -> bytes:
    """The zeros before each nonzero position, as bytes (255 = 255 zeros, read on)."""
    where = np.flatnonzero(nonzero)
    runs = np.diff(where, prepend=-1) - 1
    escapes = runs // 255
    out = np.full(int(escapes.sum()) + runs.size, 255, dtype=np.uint8)
    ends = np.cumsum(escapes + 1) - 1  # where each run's final byte goes
    out[ends] = runs % 255
    return out.tobytes()


def positions(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`run_lengths`: a boolean mask of ``count`` positions."""
    mask = np.zeros(count, dtype=bool)
    if not data:
        return mask
    raw = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
    ends = raw != 255
    run_id = np.concatenate([[0], np.cumsum(ends)[:-1]])  # which run each byte belongs to
    runs = np.bincount(run_id, weights=raw, minlength=int(ends.sum())).astype(np.int64)
    mask[np.cumsum(runs + 1) - 1] = True
    return mask


def bitmap(data: bytes, count: int) -> np.ndarray:
    """Version 1 artifacts' index: one bit per position, MSB first."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:count].astype(bool)
