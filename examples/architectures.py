"""Models no preset has, as a user would write them, for scikit-learn's 8x8 digits
(``data.preset = "digits"``: images ``(N, 1, 8, 8)`` in [0, 1]): what the architecture tests and
``benchmarks/architectures.py`` compress.

- :class:`ResidualCNN`: convolutions with batch norm, an identity and a projection shortcut.
- :class:`DigitsTransformer`: the 8 rows as tokens, a linear projection, learned positions
  (an ``nn.Embedding``), ``nn.TransformerEncoderLayer`` (packed ``in_proj_weight``), mean pooling.
- :class:`SequenceGRU`: the rows as a sequence, a ``Conv1d`` over time, then a ``GRU``.
- :class:`PixelEmbedding`: each pixel's intensity level (0..16) as a token of an ``nn.Embedding``.

Example (in a spec: ``[model] factory = "examples.architectures:ResidualCNN"``)::

    >>> import torch
    >>> [m(torch.zeros(2, 1, 8, 8)).shape[1] for m in (ResidualCNN(), DigitsTransformer(), SequenceGRU(),
    ...                                                 PixelEmbedding())]
    [10, 10, 10, 10]
"""

from __future__ import annotations

import torch
from torch import nn


class _Block(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a 1x1 projection when the shape changes)."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.project = None
        if stride != 1 or channels_in != channels_out:
            self.project = nn.Sequential(nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False),
                                         nn.BatchNorm2d(channels_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.project is None else self.project(x)
        return torch.relu(out + shortcut)


class ResidualCNN(nn.Module):
    """A small ResNet: stem, a block at 16 channels, a strided block to 32 with a projection, pooling, logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = _Block(16, 16)
        self.block2 = _Block(16, 32, stride=2)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class DigitsTransformer(nn.Module):
    """The image's 8 rows as 8 tokens: projection, learned positions, two encoder layers, mean, logits."""

    def __init__(self, width: int = 32, heads: int = 4, layers: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.project = nn.Linear(8, width)
        self.position = nn.Embedding(8, width)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True), layers,
            enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.project(x.reshape(-1, 8, 8)) + self.position.weight
        return self.head(self.encoder(tokens).mean(dim=1))


class SequenceGRU(nn.Module):
    """The rows as a sequence of 8 steps: a Conv1d over time, a GRU, logits from its last state."""

    def __init__(self, channels: int = 32, hidden: int = 48, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, channels, 3, padding=1)
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.reshape(-1, 8, 8).transpose(1, 2)  # (N, row features, time)
        features = torch.relu(self.conv(steps)).transpose(1, 2)  # (N, time, channels)
        _, last = self.gru(features)
        return self.head(last[-1])


class PixelEmbedding(nn.Module):
    """Each pixel's intensity level as a token: an embedding per level, flattened, two Linear layers."""

    def __init__(self, levels: int = 17, width: int = 4, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.levels = levels
        self.embed = nn.Embedding(levels, width)
        self.fc = nn.Linear(64 * width, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.clamp(torch.round(x.reshape(-1, 64) * (self.levels - 1)), 0, self.levels - 1).long()
        return self.head(torch.relu(self.fc(self.embed(tokens).flatten(1))))
