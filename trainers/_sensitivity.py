"""The sensitivity pass: what compressing one layer alone costs the teacher, before any fine-tune.

For each compressed layer and each ``(knob, value)`` of ``slimtune.spaces.sensitivity_grid``, the
teacher is compressed by a plan that changes only that from the *base* plan, its batch norms folded
as a trial's would be, then packed (the artifact's byte length, as every trial's size) and evaluated
on the first ``samples`` validation samples, on the device the fine-tunes use (``[runtime]
accelerator``). The base plan holds every knob no trial samples at its value
(``slimtune.spaces.unsampled_values``: a fixed ``weight_bits`` is in the base and in every point);
``dense_score`` is the teacher's own score there (it differs from ``base_score`` only when such
fixed values compress every plan). Plain data, stored once per study (JSON)::

    {"metric": "accuracy", "samples": 2000, "seconds": 1.9, "base_score": 0.97, "base_bytes": 81234,
     "dense_score": 0.97,
     "layers": {"fc1": {"bytes": 940800, "points": [{"knob": "weight_bits", "value": 4,
                                                     "score": 0.969, "bytes": 612345}, ...]}}}

``bytes`` of a layer is how much it can save at most: its weights' float32 bytes, less what its
fixed values already save (the packed base against the base with that layer left dense).
Deterministic: no randomness is drawn (masks and scales follow from the weights).

Example::

    sensitivity = sensitivity_pass(context, samples=2000)   # context: a TrialContext
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from lightning.pytorch.utilities.data import extract_batch_size

from slimtune.spaces import NO_NEUTRAL, CompressionPlan, LayerPlan, global_knobs, sensitivity_grid, unsampled_values

from ._compress import apply_plan
from ._fold import fold_batchnorm
from ._lightning import runtime_device
from ._pack import pack_model
from ._teacher import evaluate
from .methods import weight_tensors


def _neutral_globals(space: Any) -> dict[str, float]:
    """Global knob values for a plan that is only applied, never trained (they change nothing here)."""
    out = {}
    for decl in global_knobs():
        knob = space.knobs[decl.name]
        out[decl.name] = decl.neutral if decl.neutral is not NO_NEUTRAL else (
            knob.fixed if knob.fixed is not None else knob.low)
    return out


class PassOutOfTime(RuntimeError):
    """The pass reached the search's deadline before it measured every point."""


def _validation_batches(dm: Any, samples: int) -> list[Any]:
    """The data module's own validation batches up to the first ``samples`` samples: its loader's
    collate function, batch size and any streaming dataset, as the trials evaluate them."""
    batches: list[Any] = []
    seen = 0
    for batch in dm.val_dataloader():
        batches.append(batch)
        seen += extract_batch_size(batch)
        if seen >= samples:
            break
    return batches


def sensitivity_pass(ctx: Any, samples: int, deadline: float | None = None) -> dict[str, Any]:
    """Measure every layer's grid on ``ctx`` (a ``TrialContext``); see the module docstring.
    Raises :class:`PassOutOfTime` once ``time.monotonic()`` passes ``deadline`` between points."""
    started = time.perf_counter()
    spec = ctx.spec
    batches = _validation_batches(ctx.datamodule, samples)
    globals_ = _neutral_globals(spec.space)
    fixed = unsampled_values(spec.space, ctx.layer_names, ctx.output_layer, ctx.inert)
    device = runtime_device(spec.runtime)
    meta = ctx.artifact_meta()

    def compressed(changes: dict[str, dict[str, Any]], start: dict[str, dict[str, Any]]) -> torch.nn.Module:
        plan = CompressionPlan({n: LayerPlan({**start[n], **changes.get(n, {})}) for n in ctx.layer_names}, **globals_)
        model = apply_plan(copy.deepcopy(ctx.teacher), plan, spec.methods, ctx.input_rms, ctx.output_layer,
                           ctx.example_input).eval()
        fold_batchnorm(model, ctx.folded)
        return model

    def measure(changes: dict[str, dict[str, Any]], start: dict[str, dict[str, Any]] = fixed) -> tuple[float, int]:
        if deadline is not None and time.monotonic() >= deadline:
            where = next(iter(changes), None)
            raise PassOutOfTime(f"the search's time ran out after {time.perf_counter() - started:.0f} s"
                                + (f", before layer {where} was measured" if where else ""))
        model = compressed(changes, start).to(device)  # the fine-tunes' device: a pass is many evaluations
        with torch.no_grad():
            score = spec.metric.score(evaluate(model, batches, spec.metric))
        return score, len(pack_model(model.cpu(), meta))  # packed after evaluating, as a trial's model

    def layer_bytes(name: str) -> int:
        """What the layer's weights take in the base plan: float32, less what its fixed values save
        (an estimate: a fixed unit share saves in the next layer's weights too, counted here)."""
        full = 4 * sum(getattr(m, t).numel() for m, t in weight_tensors(ctx.teacher.get_submodule(name)))
        if not fixed[name]:
            return full
        unfixed = len(pack_model(compressed({}, {**fixed, name: {}}), meta))  # this layer alone left dense
        return max(1, min(full, full - (unfixed - unevaluated)))  # a fixed act_bits adds its scales' bytes

    base_score, base_bytes = measure({})
    dense_score = measure({}, {name: {} for name in fixed})[0] if any(fixed.values()) else base_score
    # the base as layer_bytes packs its variants: never evaluated (input ranges unobserved in both)
    unevaluated = len(pack_model(compressed({}, fixed), meta)) if any(fixed.values()) else base_bytes
    layers: dict[str, Any] = {}
    grid = sensitivity_grid(spec.space, ctx.layer_names, ctx.output_layer, ctx.inert)
    for name, changes in grid.items():
        points = []
        for knob, value in changes:
            score, size = measure({name: {knob: value}})
            points.append({"knob": knob, "value": value, "score": score, "bytes": size})
        layers[name] = {"bytes": layer_bytes(name), "points": points}
    return {"metric": spec.metric.name, "samples": sum(extract_batch_size(b) for b in batches),
            "seconds": time.perf_counter() - started, "base_score": base_score, "base_bytes": base_bytes,
            "dense_score": dense_score,
            "layers": layers}
