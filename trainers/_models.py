"""Model presets and loading a user's model.

Presets:
- ``lenet300``: LeNet-300-100, fully connected 784-300-100-10 (Han et al. 2016).
- ``lenet5``: the Caffe LeNet-5 of Deep Compression: conv 20@5x5, max-pool, conv 50@5x5,
  max-pool, fc 500, ReLU, fc 10 (no activation after the convolutions, as in Caffe).
- ``cnn-digits``: a small CNN for 8x8 scikit-learn digits.

A user model is any ``nn.Module`` returning logits, named ``package.module:factory``.

Example:
    >>> import torch
    >>> from slimtune.spaces import ModelSpec
    >>> model = build_model(ModelSpec(preset="lenet300"))
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> compressible_layers(model)
    ['fc1', 'fc2', 'fc3']
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from slimtune.spaces import MODEL_PRESETS, ModelSpec, SpecError


class LeNet300(nn.Module):
    """LeNet-300-100: 784-300-100-10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """Caffe LeNet-5 (as compressed in Deep Compression), 431k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 28, 28)
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: conv 16@3x3, conv 32@3x3, pool, fc 64, fc 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


PRESET_MODELS: dict[str, Callable[[], nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "cnn-digits": DigitsCNN,
}
assert set(PRESET_MODELS) == set(MODEL_PRESETS)


def import_ref(ref: str, key: str) -> object:
    """Import ``package.module:name``; a failure is a :class:`SpecError` naming ``key``."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's to fix
        raise SpecError(key, ref, "an importable 'package.module:name' on the Python path",
                        f"cannot be imported ({type(exc).__name__}: {exc})") from None
    if not hasattr(module, attr):
        raise SpecError(key, ref, f"a name defined in module {module_name}", f"has no attribute {attr!r}")
    return getattr(module, attr)


def build_model(spec: ModelSpec, load_checkpoint: bool = True) -> nn.Module:
    """A fresh model from a preset or a user factory, optionally with its checkpoint loaded."""
    if spec.preset is not None:
        model = PRESET_MODELS[spec.preset](**spec.kwargs)
    else:
        assert spec.factory is not None
        factory = import_ref(spec.factory, "model.factory")
        try:
            model = factory(**spec.kwargs)  # type: ignore[operator]
        except Exception as exc:
            raise SpecError("model.factory", spec.factory, "a callable returning an nn.Module",
                            f"failed when called ({type(exc).__name__}: {exc})") from None
        if not isinstance(model, nn.Module):
            raise SpecError("model.factory", spec.factory, "a callable returning an nn.Module",
                            f"returned {type(model).__name__}")
    if load_checkpoint and spec.checkpoint:
        try:
            state = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            model.load_state_dict(state)
        except Exception as exc:
            raise SpecError("model.checkpoint", spec.checkpoint, "a state_dict of this model saved with torch.save",
                            f"cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return model


def compressible_layers(model: nn.Module) -> list[str]:
    """Names of the ``Linear`` and ``Conv2d`` modules, in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def dense_parameter_bytes(model: nn.Module) -> int:
    """Bytes of all parameters stored as dense fp32: the numerator of the compression ratio."""
    return 4 * sum(p.numel() for p in model.parameters())
