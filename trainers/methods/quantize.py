"""Weight quantization: the ``quantize`` method (knobs ``weight_bits`` and ``act_bits``, options ``[method.quantize]``).

:class:`FakeQuant` quantizes a weight uniformly and symmetrically per output channel to ``bits``
(codes in ``[-(2**(bits-1)-1), 2**(bits-1)-1]``) in the forward pass, with a straight-through
gradient. Scales are rounded to float16 up to 8 bits, so the artifact stores them exactly; a
channel whose weights are all zero gets scale 1 and codes 0. Two ways to choose the scales (the
option ``quantizer``): ``"amax"``, the largest magnitude of the channel over the largest code,
recomputed from the weights at every step; or ``"lsq"``, a learned step size (Esser et al.,
2020): each channel's scale is a parameter (its log, initialized at the ``amax`` value) trained
with the weights. The option ``bias_bits = 16`` rounds the compressed layers' biases to float16
values (:class:`HalfPrecision`), which the artifact stores in 2 bytes each.

Its share of the artifact (entry kinds):

- ``quant``: ``scales`` (float16 up to 8 bits, float32 above), then the codes ``q + 2**(bits-1)``,
  one byte each up to 8 bits and a u16 above, either every code (``layout = "bytes"``) or, when at
  least half are zero, the index of the nonzero ones (``slimtune.trainers._index``) and their
  codes (``"gaps"``); version 1 files' ``"dense"``/``"sparse"`` bit-packed layouts are still read;
- ``half``: a float32 tensor of float16 values (a :class:`HalfPrecision` bias), as float16.

Example:
    >>> codes, scale = quantize(torch.tensor([[0.5, -1.0], [0.0, 0.0]]), bits=4)
    >>> codes.tolist(), scale.tolist()
    ([[4, -7], [0, 0]], [0.142822265625, 1.0])
    >>> HalfPrecision()(torch.tensor([0.1, 1e6])).tolist()  # the float16 values nearest
    [0.0999755859375, 65504.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.spaces import QUANTIZE_DECLARATION, LayerPlan, SpecError

from .._index import bitmap, positions, run_lengths
from ._inputs import ACT_BITS, attach_input_quant, input_quantized
from ._layers import bias_tensors, register_parametrization, weight_tensors
from .lowrank import Factorized
from ._base import ApplyContext, Blocks, Codec, CompressionMethod, straight_through

FP16_MAX = 65504.0
FP16_SCALE_MAX_BITS = 8  # above this, scales stay float32 (float16 would cost the extra precision)


def channel_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scales in float32, shape ``(out_channels,)``; up to 8 bits rounded
    to float16 values, which the artifact then stores exactly in 2 bytes each."""
    qmax = 2 ** (bits - 1) - 1
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    scale = amax / qmax
    if bits <= FP16_SCALE_MAX_BITS:
        scale = torch.clamp(scale, max=FP16_MAX).to(torch.float16).to(torch.float32)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int32, same shape) and per-channel scales of ``weight`` at ``bits``."""
    qmax = 2 ** (bits - 1) - 1
    scale = channel_scales(weight, bits)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    codes = torch.clamp(torch.round(weight.detach() / scale.view(shape)), -qmax, qmax)
    return codes.to(torch.int32), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` per output channel, in float32; the one formula used everywhere."""
    shape = (-1,) + (1,) * (codes.dim() - 1)
    return codes.to(torch.float32) * scale.view(shape)


class _StraightThroughQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        codes, scale = quantize(weight, bits)
        return dequantize(codes, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class HalfPrecision(nn.Module):
    """Parametrization rounding a tensor to float16 values (kept as float32) in the forward
    pass, with the identity gradient: what the artifact stores in 2 bytes a value."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        rounded = torch.clamp(value, -FP16_MAX, FP16_MAX).to(torch.float16).to(value.dtype)
        return straight_through(rounded, value)


class FakeQuant(nn.Module):
    """Parametrization quantizing the weight to ``bits`` in the forward pass.

    ``init_weight`` (the weight as it enters the quantizer) is needed for ``learned=True``: the
    log-scales start at the ``amax`` scales of that weight.
    """

    def __init__(self, bits: int, learned: bool = False, init_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not 2 <= bits <= 16:
            raise ValueError(f"bits must be in 2..16 for fake quantization, got {bits}")
        self.bits = bits
        self.learned = learned
        if learned:
            if init_weight is None:
                raise ValueError("a learned-scale FakeQuant needs init_weight to start its scales from")
            self.log_scale = nn.Parameter(channel_scales(init_weight, bits).log())

    def learned_scales(self) -> torch.Tensor:
        """The learned per-channel scales as the artifact stores them (float16 values up to 8
        bits), with a straight-through gradient for that rounding."""
        scale = self.log_scale.exp()
        if self.bits <= FP16_SCALE_MAX_BITS:
            rounded = torch.clamp(scale, min=2**-24, max=FP16_MAX).to(torch.float16).to(torch.float32)
            scale = straight_through(rounded, scale)
        return scale

    def codes_and_scales(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer codes and scales of ``weight`` (no gradient): what the packer stores."""
        if not self.learned:
            return quantize(weight, self.bits)
        qmax = 2 ** (self.bits - 1) - 1
        scale = self.learned_scales().detach()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        codes = torch.clamp(torch.round(weight.detach() / scale.view(shape)), -qmax, qmax)
        return codes.to(torch.int32), scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.learned:
            return _StraightThroughQuant.apply(weight, self.bits)
        qmax = 2 ** (self.bits - 1) - 1
        scale = self.learned_scales().view((-1,) + (1,) * (weight.dim() - 1))
        clamped = torch.clamp(weight / scale, -qmax, qmax)
        return straight_through(torch.round(clamped), clamped) * scale  # LSQ's gradients for weight and scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (", learned scales" if self.learned else "")


def _scale_dtype(bits: int) -> str:
    """float16 scales up to 8 bits (exact: the quantizer rounds them so), float32 above."""
    return "<f2" if bits <= FP16_SCALE_MAX_BITS else "<f4"


def _code_bytes(codes: np.ndarray, bits: int) -> bytes:
    """Codes (non-negative, < 2**bits) one byte each up to 8 bits, else little-endian u16."""
    return codes.astype(np.uint8 if bits <= 8 else "<u2").tobytes()


def _read_codes(data: bytes, bits: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8 if bits <= 8 else "<u2").astype(np.int64)


def _bitunpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """Version 1 codes: ``count`` integers of ``bits`` bits each, MSB first."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    padded = np.zeros((count, 16), dtype=np.uint8)
    padded[:, 16 - bits:] = flat
    return np.packbits(padded.reshape(-1)).view(">u2").astype(np.int64)


def _encode_quant(quantizer: nn.Module, weight: torch.Tensor) -> tuple[dict[str, Any], Blocks]:
    assert isinstance(quantizer, FakeQuant)
    bits = quantizer.bits
    codes, scale = quantizer.codes_and_scales(weight)
    offset = 2 ** (bits - 1)
    flat = codes.flatten().cpu().numpy().astype(np.int64)
    nonzero = flat != 0
    scales = scale.cpu().numpy().astype(_scale_dtype(bits)).tobytes()
    if 2 * int(nonzero.sum()) <= flat.size:
        return ({"layout": "gaps", "bits": bits},
                [scales, run_lengths(nonzero), _code_bytes(flat[nonzero] + offset, bits)])
    return {"layout": "bytes", "bits": bits}, [scales, _code_bytes(flat + offset, bits)]


def decode_codes(entry: dict[str, Any], parts: Blocks, count: int, shape: tuple[int, ...],
                 version: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes (int64, shaped ``shape``) and per-channel scales (float32) of a ``quant``
    entry, exactly as stored; ``dequantize`` of them is the weight."""
    bits = entry["bits"]
    scale = torch.from_numpy(np.frombuffer(parts[0], dtype=_scale_dtype(bits)).astype(np.float32))
    if scale.numel() != shape[0]:
        raise ValueError(f"tensor {entry['name']} has {scale.numel()} scales for {shape[0]} output channels")
    codes = np.zeros(count, dtype=np.int64)
    offset = 2 ** (bits - 1)
    layout = entry["layout"]
    if layout == "gaps":
        codes[positions(parts[1], count)] = _read_codes(parts[2], bits) - offset
    elif layout == "bytes":
        codes = _read_codes(parts[1], bits) - offset
    elif layout == "sparse":  # version 1
        nonzero = bitmap(parts[1], count)
        codes[nonzero] = _bitunpack(parts[2], bits, int(nonzero.sum())) - offset
    else:  # version 1 "dense"
        codes = _bitunpack(parts[1], bits, count) - offset
    return torch.from_numpy(codes.reshape(shape)), scale


def _decode_quant(entry: dict[str, Any], parts: Blocks, count: int, shape: tuple[int, ...],
                  version: int) -> torch.Tensor:
    return dequantize(*decode_codes(entry, parts, count, shape, version))


def _check_quant(entry: dict[str, Any], shape: tuple[int, ...]) -> None:
    bits = entry.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"tensor {entry['name']} has {bits!r} bits; allowed: 2..16")
    if entry.get("layout") not in ("gaps", "bytes", "sparse", "dense") or not shape:
        raise ValueError(f"tensor {entry['name']} has an unknown layout {entry.get('layout')!r}")


def _encode_half(parametrization: nn.Module, value: torch.Tensor) -> tuple[dict[str, Any], Blocks]:
    half = parametrization(value).detach()  # float16 values, as HalfPrecision rounds them
    return {}, [half.cpu().numpy().astype("<f2").tobytes()]


def _decode_half(entry: dict[str, Any], parts: Blocks, count: int, shape: tuple[int, ...],
                 version: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(parts[0], dtype="<f2").astype(np.float32).reshape(shape))


INPUT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the modules that get an InputQuant
INPUT_QUANTIZABLE = (*INPUT_LAYERS, Factorized)  # layers whose input act_bits quantizes (low rank: the first factor's)


def _float_calls(model: nn.Module, layer_names: list[str], example_input: torch.Tensor | None) -> dict[str, int]:
    """How many times ``model`` calls each layer of ``layer_names`` as a module with a float tensor
    first (an attention's ``out_proj`` is read, not called: 0); once each when ``example_input`` is ``None``."""
    if example_input is None:
        return dict.fromkeys(layer_names, 1)
    calls = dict.fromkeys(layer_names, 0)

    def count(name: str, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            calls[name] += 1

    handles = [model.get_submodule(name).register_forward_pre_hook(lambda module, args, name=name: count(name, args))
               for name in layer_names]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return calls


def _sharing_weights(model: nn.Module, layer_names: list[str]) -> set[str]:
    """The layers whose weight is also another module's (tied weights): one input range cannot
    stand for two layers' inputs in an export."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), set()).add(name)
    shared: set[str] = set()
    for name in layer_names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if isinstance(weight, torch.Tensor) and len(owners.get(id(weight), ())) > 1:
            shared.add(name)
    return shared


class Quantize(CompressionMethod):
    """Fake quantization on a layer's weight tensors below 32 bits (both factors of a factorized
    one, each matrix of an attention or recurrent layer; per row of an embedding), float16
    biases with ``bias_bits = 16``, and int8 inputs with ``act_bits = 8`` (the layers of
    :data:`INPUT_QUANTIZABLE` the model calls once, with a weight of their own; the knob is inert
    on the others)."""

    declaration = QUANTIZE_DECLARATION

    def apply(self, model: nn.Module, name: str, layer: nn.Module, values: LayerPlan,
              context: ApplyContext) -> nn.Module | None:
        options = context.options("quantize")
        if values["weight_bits"] < 32:
            learned = options.quantizer == "lsq"
            for module, tensor_name in weight_tensors(layer):
                weight = getattr(module, tensor_name).detach()
                register_parametrization(
                    module, tensor_name, FakeQuant(values["weight_bits"], learned, weight if learned else None))
        if options.bias_bits == 16:
            for module, tensor_name in bias_tensors(layer):
                register_parametrization(module, tensor_name, HalfPrecision())
        if values["act_bits"] < 32 and isinstance(layer, INPUT_QUANTIZABLE):
            # a low-rank layer's first factor reads its input (a child of the Sequential would run after it)
            attach_input_quant(layer[0] if isinstance(layer, Factorized) else layer, values["act_bits"])
        return None

    def inert_layers(self, model: nn.Module, layer_names: list[str],
                     example_input: torch.Tensor | None = None) -> dict[str, set[str]]:
        calls = _float_calls(model, layer_names, example_input)
        shared = _sharing_weights(model, layer_names)
        return {"act_bits": {n for n in layer_names if not isinstance(model.get_submodule(n), INPUT_QUANTIZABLE)
                             or calls.get(n) != 1 or n in shared}}

    def architecture(self, model: nn.Module) -> dict[str, Any]:
        found = input_quantized(model)
        return {"quantized_inputs": {name: quant.bits for name, quant in found.items()}} if found else {}

    def rebuild(self, model: nn.Module, meta: Mapping[str, Any]) -> None:
        found = meta.get("quantized_inputs", {})
        if not isinstance(found, Mapping):
            raise SpecError("artifact", "meta.quantized_inputs", "a table of layer names and activation bits",
                            "is unreadable")
        for name, bits in found.items():
            try:
                layer = model.get_submodule(name) if isinstance(name, str) and name else None
            except AttributeError:
                layer = None
            if not isinstance(layer, INPUT_LAYERS) or bits != ACT_BITS or isinstance(bits, bool):
                raise SpecError("artifact", f"meta.quantized_inputs.{name}",
                                f"a Linear/Conv layer of the model and {ACT_BITS} bits",
                                f"does not fit the model ({bits!r} bits)")
            attach_input_quant(layer, bits)

    def codecs(self) -> list[Codec]:
        return [
            Codec("quant", (FakeQuant,), _encode_quant, _decode_quant,
                  blocks=lambda entry: 3 if entry.get("layout") in ("gaps", "sparse") else 2, check=_check_quant,
                  codes=decode_codes),
            Codec("half", (HalfPrecision,), _encode_half, _decode_half, blocks=lambda entry: 1),
        ]

    def achieved(self, layer: nn.Module) -> dict[str, float]:
        bits = 32
        for module, tensor_name in weight_tensors(layer):
            if parametrize.is_parametrized(module, tensor_name):
                found = [p.bits for p in module.parametrizations[tensor_name] if isinstance(p, FakeQuant)]
                bits = found[-1] if found else bits
        return {"bits": bits}
