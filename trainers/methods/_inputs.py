"""Activation quantization: a layer's input as int8 codes (the ``quantize`` method's knob ``act_bits``).

A layer with ``act_bits = 8`` gets an :class:`InputQuant` child (``layer.input_quant``) and a
forward pre-hook that fake-quantizes whatever the layer reads, per tensor and asymmetrically,
to the int8 codes ``[-128, 127]`` (onnxruntime's recommended S8S8 format). The range is observed
as torch.ao's QAT recipe does (``MovingAverageMinMaxObserver``): the first batch's min and max,
then a moving average (:data:`RANGE_MOMENTUM`) while training; evaluation uses the range as it
stands (a model evaluated before any training batch takes its first batch's). The range always
holds 0, so zero padding and ReLU outputs stay exact. The two floats ``low`` and ``high`` are
buffers: the artifact stores them, and :func:`input_qparams` turns them into the scale and zero
point for training and for the ONNX export alike, so both compute the same codes. Our own
rather than torch.ao's ``FakeQuantize``: ``torch.ao.quantization`` warns that it is deprecated,
and its module stores observer state and flags where the artifact needs two floats.

Example:
    >>> layer = nn.Linear(4, 2)
    >>> quant = attach_input_quant(layer)
    >>> _ = layer.train()(torch.tensor([[0.0, 0.5, 1.0, 2.55]]))
    >>> scale, zero_point = input_qparams(layer.input_quant)
    >>> round(float(scale), 4), int(zero_point)
    (0.01, -128)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

ACT_BITS = 8  # the one activation width below float: int8 codes, what integer kernels read
ACT_QMIN, ACT_QMAX = -128, 127
RANGE_MOMENTUM = 0.01  # torch.ao's MovingAverageMinMaxObserver averaging constant


class InputQuant(nn.Module):
    """The observed range of a layer's input (buffers ``low`` and ``high``; NaN until the first
    batch) and its fake quantization to int8 codes with a straight-through gradient (zero outside
    the range, as ``torch.fake_quantize_per_tensor_affine`` gives). ``enabled = False`` passes
    inputs through (the ONNX export writes the quantization as ``QuantizeLinear`` nodes instead)."""

    def __init__(self, bits: int = ACT_BITS) -> None:
        super().__init__()
        if bits != ACT_BITS:
            raise ValueError(f"activation bits must be {ACT_BITS}, got {bits}")
        self.bits = bits
        self.enabled = True
        self.register_buffer("low", torch.tensor(float("nan")))
        self.register_buffer("high", torch.tensor(float("nan")))

    @property
    def observed(self) -> bool:
        return bool(torch.isfinite(self.low)) and bool(torch.isfinite(self.high))

    @torch.no_grad()
    def observe(self, x: torch.Tensor, move: bool = True) -> None:
        """Move the range towards ``x``'s (``move``), or take it before the first batch (no host
        sync: a training step on a GPU does not wait for it)."""
        low = torch.clamp(x.detach().min().float(), max=0.0).to(self.low.device)
        high = torch.clamp(x.detach().max().float(), min=0.0).to(self.high.device)
        unseen = torch.isnan(self.low) | torch.isnan(self.high)
        moved_low = self.low + RANGE_MOMENTUM * (low - self.low) if move else self.low
        moved_high = self.high + RANGE_MOMENTUM * (high - self.high) if move else self.high
        self.low.copy_(torch.where(unseen, low, moved_low))
        self.high.copy_(torch.where(unseen, high, moved_high))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not x.is_floating_point():
            return x
        self.observe(x, move=self.training)  # in evaluation only a range never observed is taken
        scale, zero_point = input_qparams(self)
        return torch.fake_quantize_per_tensor_affine(
            x, scale.to(x.device), zero_point.to(x.device), ACT_QMIN, ACT_QMAX)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{float(self.low):.4g}, {float(self.high):.4g}]"


def input_qparams(quant: InputQuant) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of the observed range: a float32 scale ``(high - low) / 255`` (at
    least ``2**-24``: an all-zero input gets codes 0) and an int32 zero point in ``[-128, 127]``
    mapping 0 exactly; the one formula for training and export."""
    low, high = quant.low.float(), quant.high.float()
    scale = torch.clamp((high - low) / (ACT_QMAX - ACT_QMIN), min=2.0 ** -24)
    zero_point = torch.clamp(torch.round(ACT_QMIN - low / scale), ACT_QMIN, ACT_QMAX).to(torch.int32)
    return scale.reshape(()), zero_point.reshape(())


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook: the layer reads its first argument through its ``input_quant``."""
    if not args:
        return args
    return (module.input_quant(args[0]),) + tuple(args[1:])


def attach_input_quant(layer: nn.Module, bits: int = ACT_BITS) -> InputQuant:
    """Give ``layer`` an :class:`InputQuant` (``layer.input_quant``) and the pre-hook that applies
    it; a layer that has one keeps it."""
    found = getattr(layer, "input_quant", None)
    if isinstance(found, InputQuant):
        return found
    quant = InputQuant(bits)
    layer.add_module("input_quant", quant)
    layer.register_forward_pre_hook(_quantize_input)
    return quant


def check_input_ranges(model: nn.Module) -> None:
    """A ``ValueError`` naming the first stored input range that is not finite, leaves out 0, or
    gives no finite scale (what a trial stores never is; a crafted file may be)."""
    for name, quant in input_quantized(model).items():
        low, high = float(quant.low), float(quant.high)
        scale = (high - low) / (ACT_QMAX - ACT_QMIN) if math.isfinite(low) and math.isfinite(high) else math.inf
        if not (math.isfinite(scale) and low <= 0.0 <= high):
            raise ValueError(f"layer {name!r} stores the input range [{low:.4g}, {high:.4g}]")


def input_quantized(model: nn.Module) -> dict[str, InputQuant]:
    """``{layer name: its InputQuant}`` for every layer of ``model`` whose input is quantized."""
    return {name.rpartition(".")[0] if "." in name else "": module for name, module in model.named_modules()
            if isinstance(module, InputQuant)}


@contextlib.contextmanager
def float_inputs(model: nn.Module) -> Iterator[dict[str, InputQuant]]:
    """Turn the model's input quantization off for the block (an export writes it as nodes);
    yields :func:`input_quantized`."""
    found = input_quantized(model)
    for quant in found.values():
        quant.enabled = False
    try:
        yield found
    finally:
        for quant in found.values():
            quant.enabled = True
