"""Compression operators as ``torch.nn.utils.parametrize`` parametrizations.

- :class:`PruneMask`: unstructured magnitude pruning, a fixed 0/1 mask with exactly
  ``round(ratio * numel)`` zeros (the smallest magnitudes; ties broken by position).
- :class:`FakeQuant`: uniform symmetric per-output-channel quantization of weights to ``bits``
  (codes in ``[-(2**(bits-1)-1), 2**(bits-1)-1]``), with a straight-through gradient. Scales are
  rounded to float16 so the packed artifact stores them exactly; a channel whose weights are all
  zero gets scale 1 and codes 0 (no division by zero, no NaN). Two ways to choose the scales
  (``quantizer``): ``"amax"``, the largest magnitude of the channel over the largest code,
  recomputed from the weights at every step; or ``"lsq"``, a learned step size (Esser et al.,
  2020): each channel's scale is a parameter (its log, initialized at the ``amax`` value) that
  the fine-tune trains with the weights, the rounding passing gradients straight through.

A layer planned with ``rank_ratio < 1`` is first replaced by its two truncated-SVD factors
(``slimtune.trainers._lowrank``); pruning and quantization then apply to each factor with the
layer's plan.

The module stays a normal module; :func:`bake` removes the parametrizations, leaving the
compressed weights as plain parameters.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from slimtune.spaces import CompressionPlan, LayerPlan
    >>> layer = nn.Sequential(nn.Linear(8, 4))
    >>> plan = CompressionPlan({"0": LayerPlan(0.5, 4, 2.0)}, kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3)
    >>> _ = apply_plan(layer, plan)
    >>> int((layer[0].weight == 0).sum()) >= 16
    True
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.spaces import BIAS_BITS, QUANTIZERS, CompressionPlan

from ._importance import importance
from ._lowrank import factorize, rank_for, replace_submodule, weight_modules

FP16_MAX = 65504.0


def magnitude_mask(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """A 0/1 mask (weight's dtype) zeroing exactly ``round(ratio * numel)`` smallest-magnitude weights."""
    numel = weight.numel()
    k = int(round(ratio * numel))
    mask = torch.ones(numel, dtype=weight.dtype, device=weight.device)
    if k > 0:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        mask[order[:k]] = 0
    return mask.view_as(weight)


def allowed_mask(score: torch.Tensor, ratio: float, allowed: torch.Tensor | None) -> torch.Tensor:
    """:func:`magnitude_mask` of ``score`` that also zeroes every position where ``allowed`` is 0
    (then at least ``round(ratio * numel)`` zeros).

    >>> allowed_mask(torch.tensor([[3.0, 1.0], [2.0, 4.0]]), 0.25, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    tensor([[1., 1.],
            [0., 0.]])
    """
    if allowed is None:
        return magnitude_mask(score, ratio)
    return magnitude_mask(score * allowed, ratio) * allowed


def _consumer_input_width(module: nn.Module) -> int:
    """How many inputs the layer reads: ``in_features`` or ``in_channels``."""
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels  # type: ignore[return-value]


def unit_keeps(model: nn.Module, plan: CompressionPlan,
               input_rms: dict[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, str]]:
    """Which output units each layer planned with ``unit_ratio < 1`` keeps, and the layer that
    reads them: ``{layer: (kept units as a bool vector, consumer name)}``.

    The consumer is the next ``Linear``/``Conv2d`` of ``model`` (in registration order, the
    data flow of a chain such as an MLP or a LeNet) when its input width is a multiple of the
    layer's units: equal for a layer feeding a layer, ``units * positions`` for a convolution
    feeding a ``Linear`` through a flatten (channel-major blocks). A unit ``j`` scores
    ``rms(input j) * ||consumer weights reading j||``, with ``input_rms`` (the teacher's
    root-mean-square input per consumer input; 1 when not given); the
    ``max(1, round(unit_ratio * units))`` best are kept. A layer no next layer reads this way
    (the logits) keeps every unit.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    keeps: dict[str, tuple[torch.Tensor, str]] = {}
    for name, layer_plan in plan.layers.items():
        if layer_plan.unit_ratio >= 1 or name not in names or names.index(name) + 1 >= len(names):
            continue
        producer, consumer_name = model.get_submodule(name), names[names.index(name) + 1]
        consumer = model.get_submodule(consumer_name)
        units = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
        width = _consumer_input_width(consumer)
        if width % units or (isinstance(consumer, nn.Conv2d) and (width != units or consumer.groups != 1)):
            continue
        weight = importance(consumer.weight, (input_rms or {}).get(consumer_name))  # |w| * rms(input)
        per_input = weight.pow(2).transpose(0, 1).flatten(1).sum(dim=1)  # (width,)
        score = per_input.view(units, -1).sum(dim=1)
        kept = torch.zeros(units, dtype=torch.bool)
        kept[torch.argsort(score, descending=True, stable=True)[: max(1, round(layer_plan.unit_ratio * units))]] = True
        keeps[name] = (kept, consumer_name)
    return keeps


def _allowed_weights(weight: torch.Tensor, rows: torch.Tensor | None, columns: torch.Tensor | None) -> torch.Tensor | None:
    """0/1 tensor shaped like ``weight``: output rows in ``rows`` and inputs in ``columns`` (blocks
    of ``in / len(columns)`` inputs per unit) kept; ``None`` when both are ``None``."""
    if rows is None and columns is None:
        return None
    allowed = torch.ones_like(weight)
    if rows is not None:
        allowed = allowed * rows.to(weight.dtype).view((-1,) + (1,) * (weight.dim() - 1))
    if columns is not None:
        cols = columns.to(weight.dtype).repeat_interleave(weight.shape[1] // columns.numel())
        allowed = allowed * cols.view((1, -1) + (1,) * (weight.dim() - 2))
    return allowed


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


class PruneMask(nn.Module):
    """Parametrization multiplying the weight by a mask (a buffer, kept in ``state_dict``).

    With ``straight_through`` set, the gradient reaches pruned weights too (as if the mask were
    not there), so that a schedule re-choosing the mask by magnitude can let them grow back.
    ``input_scale`` (see :mod:`._importance`) weights the magnitudes whenever the mask is
    chosen again (:meth:`reselect`).
    """

    def __init__(self, mask: torch.Tensor, input_scale: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.straight_through = False
        self.input_scale = input_scale
        self.allowed = allowed  # 0/1, the weights of kept units (``unit_ratio``); None: all

    def reselect(self, weight: torch.Tensor, ratio: float) -> None:
        """Keep the ``1 - ratio`` share of ``weight`` with the highest importance (never a
        weight outside ``allowed``)."""
        self.mask.copy_(allowed_mask(importance(weight, self.input_scale), ratio, self.allowed))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        masked = weight * self.mask
        return _exactly(masked, weight) if self.straight_through else masked


class HalfPrecision(nn.Module):
    """Parametrization rounding a tensor to float16 values (kept as float32) in the forward
    pass, with the identity gradient: what the artifact stores in 2 bytes a value.

    >>> HalfPrecision()(torch.tensor([0.1, 1e6])).tolist()  # the float16 values nearest
    [0.0999755859375, 65504.0]
    """

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        rounded = torch.clamp(value, -FP16_MAX, FP16_MAX).to(torch.float16).to(value.dtype)
        return _exactly(rounded, value)


def _exactly(value: torch.Tensor, gradient_of: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, bit for bit, with the gradient of ``gradient_of``."""
    return value.detach() + (gradient_of - gradient_of.detach())


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
            scale = _exactly(rounded, scale)
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
        return _exactly(torch.round(clamped), clamped) * scale  # LSQ's gradients for weight and scale

    def extra_repr(self) -> str:
        return f"bits={self.bits}" + (", learned scales" if self.learned else "")


def apply_plan(model: nn.Module, plan: CompressionPlan, quantizer: str = "amax",
               input_scales: dict[str, torch.Tensor] | None = None, bias_bits: int = 32,
               input_rms: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Factorize (``rank_ratio < 1``), then register mask and fake-quant parametrizations on every
    layer of ``plan`` (on both factors of a factorized one), in place. ``quantizer`` is
    ``"amax"`` or ``"lsq"`` (learned scales). ``input_scales`` (layer name: per-input scale,
    from :func:`layer_input_scales`) weights the magnitudes the masks keep; a factorized
    layer's second factor is pruned by magnitude alone. ``bias_bits=16`` rounds the layers'
    biases to float16 values (:class:`HalfPrecision`), which the artifact stores in 2 bytes.

    A layer planned with ``unit_ratio < 1`` keeps only the units :func:`unit_keeps` chooses
    (scored with ``input_rms``): the weights of the other units, and the weights of the next
    layer that read them when that layer is in the plan, are pruned; the layer's planned
    ``prune_ratio`` share of weights is then chosen among the rest (it prunes at least that)."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
    if bias_bits not in BIAS_BITS:
        raise ValueError(f"bias_bits must be one of {', '.join(map(str, BIAS_BITS))}, got {bias_bits!r}")
    keeps = unit_keeps(model, plan, input_rms)
    read_by = {consumer: kept for kept, consumer in keeps.values()}
    for name, layer_plan in plan.layers.items():
        layer = model.get_submodule(name)
        if layer_plan.rank_ratio < 1:
            layer = factorize(layer, rank_for(layer, layer_plan.rank_ratio))
            replace_submodule(model, name, layer)
        modules = weight_modules(layer)
        for position, module in enumerate(modules):
            allowed = _allowed_weights(module.weight.detach(),
                                       keeps[name][0] if name in keeps and position == len(modules) - 1 else None,
                                       read_by.get(name) if position == 0 else None)
            if layer_plan.prune_ratio > 0 or allowed is not None:
                scale = (input_scales or {}).get(name) if position == 0 else None
                mask = allowed_mask(importance(module.weight, scale), layer_plan.prune_ratio, allowed)
                parametrize.register_parametrization(module, "weight", PruneMask(mask, scale, allowed))
            if layer_plan.weight_bits < 32:
                learned = quantizer == "lsq"
                parametrize.register_parametrization(
                    module, "weight", FakeQuant(layer_plan.weight_bits, learned, module.weight.detach() if learned else None))
            if bias_bits == 16 and getattr(module, "bias", None) is not None:
                parametrize.register_parametrization(module, "bias", HalfPrecision())
    return model


def bake(model: nn.Module) -> nn.Module:
    """Remove all parametrizations in place, keeping the compressed weights as plain parameters.

    Unlike ``parametrize.remove_parametrizations``, this leaves the parametrized class alone, so
    baking a ``copy.deepcopy`` of a model does not break the original (the copies share it).
    """
    for module in [m for m in model.modules() if parametrize.is_parametrized(m)]:
        originals = {name: module.parametrizations[name].original for name in module.parametrizations}
        baked = {name: getattr(module, name).detach().clone() for name in originals}
        del module.parametrizations
        module.__class__ = module.__class__.__bases__[0]
        for name, value in baked.items():
            module.register_parameter(name, nn.Parameter(value, requires_grad=originals[name].requires_grad))
    return model
