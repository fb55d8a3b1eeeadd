"""The study's stored sensitivity pass (``[search.seed]``), read as data, and its per-layer chart.

The pass is JSON in the ``sensitivity`` blob: per compressed layer, the validation score and the
packed bytes of the teacher (the whole model) with only that layer's knob changed from the values
every trial holds (fixed ones), one point per knob value. Read from the database, it is untrusted
data: :func:`stored_sensitivity` keeps only points of the expected shape. :func:`sensitivity_figure`
draws one panel per knob (bits, prune ratio, unit or rank share): the drop in the study's metric
against the knob's value, a line per layer, so the layers that tolerate nothing stand out.

Example:
    >>> from slimtune.spaces import metric
    >>> data = {"base_score": 0.9, "layers": {"fc1": {"bytes": 400, "points": [
    ...     {"knob": "weight_bits", "value": 2, "score": 0.7, "bytes": 60},
    ...     {"knob": "weight_bits", "value": 8, "score": 0.9, "bytes": 120}]}}}
    >>> fig, height = sensitivity_figure(clean_sensitivity(data), metric("accuracy"))
    >>> [trace.name for trace in fig.data], [round(y, 1) for y in fig.data[0].y]
    (['fc1'], [20.0, 0.0])
"""

from __future__ import annotations

import json
import math
from typing import Any

import optuna

from slimtune.spaces import Metric

from . import _keys as keys
from ._blobs import get_blob

KNOB_TITLES = {"weight_bits": "bits", "prune_ratio": "prune ratio", "unit_ratio": "share of units kept",
               "rank_ratio": "share of rank kept"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def clean_sensitivity(data: Any) -> dict[str, Any] | None:
    """``data`` with only well-formed layers and points (``None`` when nothing usable is left)."""
    if not isinstance(data, dict) or not _number(data.get("base_score")) or not isinstance(data.get("layers"), dict):
        return None
    layers: dict[str, Any] = {}
    for name, layer in data["layers"].items():
        if not isinstance(name, str) or not isinstance(layer, dict) or not isinstance(layer.get("points"), list):
            continue
        points = [p for p in layer["points"] if isinstance(p, dict) and isinstance(p.get("knob"), str)
                  and all(_number(p.get(k)) for k in ("value", "score", "bytes"))]
        if points:
            layers[name] = {"bytes": layer.get("bytes") if _number(layer.get("bytes")) else None, "points": points}
    if not layers:
        return None
    extra = {k: data[k] for k in ("samples", "seconds", "base_bytes", "dense_score") if _number(data.get(k))}
    return {"base_score": float(data["base_score"]), "layers": layers, **extra}


def stored_sensitivity(storage: optuna.storages.BaseStorage, study_name: str) -> dict[str, Any] | None:
    """The study's stored sensitivity pass as stored (``None``: there is none)."""
    blob = get_blob(storage, study_name, keys.SENSITIVITY_BLOB)
    if blob is None:
        return None
    try:
        return json.loads(blob)
    except (ValueError, UnicodeDecodeError):
        return {}  # stored but unreadable: there is a pass, and no chart of it


def stored_calibration(storage: optuna.storages.BaseStorage, study_name: str) -> dict[str, float] | None:
    """The study's calibrated wave (``[search.seed] calibrated``) as data: ``factor`` (how many
    times the pass overstated the first seeds' fine-tuned drops), ``seeds`` (how many it compared)
    and ``plans`` (how many it enqueued); ``None`` when there is none or it is unreadable."""
    blob = get_blob(storage, study_name, keys.CALIBRATION_BLOB)
    try:
        data = json.loads(blob) if blob is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not all(_number(data.get(k)) for k in ("factor", "seeds", "plans")):
        return None
    return {k: float(data[k]) for k in ("factor", "seeds", "plans")}


def sensitivity_figure(data: dict[str, Any], metric: Metric) -> tuple[Any, int]:
    """One panel per knob: the drop in ``metric`` (points of a percentage) when only one layer is
    compressed at a knob value, a line per layer (a :func:`clean_sensitivity` dict)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    knobs = list(dict.fromkeys(p["knob"] for layer in data["layers"].values() for p in layer["points"]))
    fig = make_subplots(rows=1, cols=len(knobs), subplot_titles=[KNOB_TITLES.get(k, k) for k in knobs],
                        shared_yaxes=True, horizontal_spacing=0.06)
    scale = 100 if metric.percent else 1
    unit = "points" if metric.percent else metric.label
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
    for index, (name, layer) in enumerate(data["layers"].items()):
        color = palette[index % len(palette)]
        shown = False
        for column, knob in enumerate(knobs, start=1):
            points = sorted((p for p in layer["points"] if p["knob"] == knob), key=lambda p: p["value"])
            if not points:
                continue
            fig.add_trace(go.Scatter(
                x=[p["value"] for p in points], y=[scale * (data["base_score"] - p["score"]) for p in points],
                customdata=[[name, p["bytes"]] for p in points], name=name, legendgroup=name,
                showlegend=not shown, mode="lines+markers", line=dict(color=color),
                hovertemplate=f"%{{customdata[0]}}: {KNOB_TITLES.get(knob, knob)} %{{x}}<br>drop %{{y:.2f}} {unit}"
                              "<br>model packed: %{customdata[1]:,} B<extra></extra>"), row=1, col=column)
            shown = True
    fig.update_yaxes(title_text=f"{metric.label} drop ({unit}), this layer alone", row=1, col=1)
    height = 380
    fig.update_layout(template="plotly_white", height=height, margin=dict(l=70, r=20, t=40, b=50),
                      legend=dict(orientation="h", y=-0.18))
    return fig, height
