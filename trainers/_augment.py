"""Training-time augmentation of image batches for the student's fine-tune (``finetune.augment_shift``).

:func:`random_shift` moves every image of a batch by its own whole-pixel offset, drawn
uniformly from ``[-max_shift, max_shift]`` in each direction, filling the uncovered border with
zeros (MNIST's background). The student sees the shifted image; the labels and the teacher's
soft targets stay those of the original image, so the teacher-output cache still serves.

Example:
    >>> import torch
    >>> x = torch.zeros(1, 1, 3, 3); x[0, 0, 1, 1] = 1.0
    >>> y = random_shift(x, 1, torch.Generator().manual_seed(0))
    >>> y.shape, float(y.sum())
    (torch.Size([1, 1, 3, 3]), 1.0)
    >>> random_shift(x, 0, torch.Generator()) is x
    True
    >>> ImageShift(1, seed=0)(x).shape  # the seeded form the training modules hold
    torch.Size([1, 1, 3, 3])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """``x`` (N, C, H, W) with each image translated by a random offset of at most ``max_shift``
    pixels along each axis (zero fill); ``x`` itself when ``max_shift`` is 0."""
    if max_shift == 0:
        return x
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if x.dim() != 4:
        raise ValueError(f"finetune.augment_shift needs image batches shaped (N, C, H, W); got a batch of shape "
                         f"{tuple(x.shape)} (set finetune.augment_shift = 0 for this data)")
    n, _, height, width = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(height)[None, :]  # (N, H): padded row read for each output row
    cols = dx[:, None] + torch.arange(width)[None, :]  # (N, W)
    picked = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return picked.permute(0, 3, 1, 2).contiguous()


class ImageShift:
    """:func:`random_shift` by up to ``max_shift`` pixels with its own generator seeded by
    ``seed``: each call draws the next offsets. ``max_shift`` 0 returns batches unchanged."""

    def __init__(self, max_shift: int, seed: int = 0) -> None:
        if max_shift < 0:
            raise ValueError(f"augment_shift must be >= 0, got {max_shift}")
        self.max_shift = max_shift
        self._generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return random_shift(x, self.max_shift, self._generator)
