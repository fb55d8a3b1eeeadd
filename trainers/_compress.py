"""Compressing a model by a plan: every registered method, in order, on every layer of the plan.

Each method (``slimtune.trainers.methods``) changes a layer with
``torch.nn.utils.parametrize`` parametrizations (masks, fake quantization) or replaces it (two
low-rank factors, under the layer's own name), so the model stays a normal module; :func:`bake`
removes the parametrizations, leaving the compressed weights as plain parameters.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from slimtune.spaces import CompressionPlan, LayerPlan
    >>> layer = nn.Sequential(nn.Linear(8, 4))
    >>> plan = CompressionPlan({"0": LayerPlan(prune_ratio=0.5, weight_bits=4)}, kd_alpha=0.9,
    ...                        feature_kd_weight=0.0, lr=1e-3)
    >>> _ = apply_plan(layer, plan)
    >>> int((layer[0].weight == 0).sum()) >= 16
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.spaces import MISSING, CompressionPlan, SpecError, Values, declaration

from .methods import ApplyContext, methods, replace_submodule


def method_options(options: Mapping[str, Any] | None = None) -> dict[str, Values]:
    """Each method's options: those given (a spec's ``methods``, or partial dicts), the rest at
    their *neutral* values (the method as it was before the option existed: magnitude masks,
    ``amax`` scales, float32 biases), so that :func:`apply_plan` without options is the plain method.

    >>> method_options({"quantize": {"quantizer": "lsq"}})["quantize"].bias_bits
    32
    """
    out: dict[str, Values] = {}
    given = dict(options or {})
    for method in methods():
        base = {s.key: (s.default if s.neutral is MISSING else s.neutral) for s in declaration(method.name).options}
        chosen = given.get(method.name)
        values = dict(getattr(chosen, "_values", chosen) or {})
        unknown = sorted(set(values) - set(base))
        if unknown:
            raise SpecError(f"method.{method.name}.{unknown[0]}", values[unknown[0]], f"keys {sorted(base)}",
                            "is not a known key")
        out[method.name] = Values(f"method.{method.name}", {**base, **values})
    return out


def apply_plan(model: nn.Module, plan: CompressionPlan, options: Mapping[str, Any] | None = None,
               input_rms: dict[str, torch.Tensor] | None = None, output_layer: str | None = None,
               example_input: torch.Tensor | None = None) -> nn.Module:
    """Compress ``model`` in place by ``plan``: each method prepares the whole model, then applies
    itself to every layer of the plan, in method order (``lowrank``, ``units``, ``prune``,
    ``quantize``, then any registered method). ``options`` are the methods' options (a spec's
    ``methods``; see :func:`method_options`), ``input_rms`` the teacher's root-mean-square input per
    layer (``TrialContext`` measures it when a method needs it), ``example_input`` a few of the
    data's inputs (the ranks of tensors that tracing the model does not tell)."""
    context = ApplyContext(plan, method_options(options), input_rms, output_layer, example_input=example_input)
    for method in methods():
        method.prepare(model, context)
    for name, values in plan.layers.items():
        for method in methods():
            replacement = method.apply(model, name, model.get_submodule(name), values, context)
            if replacement is not None:
                replace_submodule(model, name, replacement)
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
