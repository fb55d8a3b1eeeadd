"""Which weights a pruning mask keeps: magnitude, optionally weighted by the layer's input.

A weight ``w[o, i, ...]`` scores ``|w| * input_scale[i]``, where ``input_scale`` is the
teacher's root-mean-square input to the layer per input feature (``Linear``) or input channel
(``Conv2d``), raised to ``finetune.prune_activation_power``. With every scale 1 this is plain
magnitude pruning. Inputs that are nearly always zero (MNIST's border pixels) then lose their
weights first, whatever those weights' size.

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(3, 1)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[0.5, 0.2, 0.3]]))
    >>> x = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]])  # input 0 is always zero
    >>> scales = layer_input_scales(nn.Sequential(layer), ["0"], x, power=1.0)
    >>> scales["0"]
    tensor([0., 1., 1.])
    >>> importance(layer.weight, scales["0"])
    tensor([[0.0000, 0.2000, 0.3000]])
"""

from __future__ import annotations

import torch
from torch import nn


def layer_input_scales(model: nn.Module, layer_names: list[str], inputs: torch.Tensor, power: float,
                       chunk: int = 1000) -> dict[str, torch.Tensor]:
    """``rms(input) ** power`` per input feature or channel of each layer, over ``inputs``.

    Layers other than ``Linear`` and ungrouped ``Conv2d`` are left out (their masks stay
    magnitude masks).
    """
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def tap(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = args[0].detach().float()
            per_feature = x.pow(2).sum(dim=(0, 2, 3)) if x.dim() == 4 else x.flatten(1).pow(2).sum(dim=0)
            squares[name] = squares.get(name, 0) + per_feature
            counts[name] = counts.get(name, 0) + x.numel() // per_feature.numel()
        return hook

    handles = []
    for name in layer_names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            handles.append(module.register_forward_hook(tap(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), chunk):
                model(inputs[start: start + chunk])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: (squares[name] / counts[name]).sqrt().pow(power) for name in squares}


def importance(weight: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """``|weight|``, times ``input_scale`` along the input dimension when it fits that dimension."""
    score = weight.detach().abs()
    if input_scale is None or weight.dim() < 2 or weight.shape[1] != input_scale.numel():
        return score
    return score * input_scale.view((1, -1) + (1,) * (weight.dim() - 2)).to(score)
