"""One self-contained HTML report of a study: Pareto front, per-layer choices, hypervolume, importances.

The page embeds plotly.js once and opens offline (no CDN, no network). It needs only the study
database: no torch here.

Sections, each figure in a ``<div>`` with a stable id:

- summary: study, storage URL (password masked), the stored spec, teacher accuracy and fp32 size,
  trial counts by state;
- ``pareto-front``: validation accuracy against size (log x axis): the Pareto trials as the trace
  ``"Pareto front"``, the other complete trials in grey, the teacher and the accuracy floor as
  references. Pruned and failed trials have no size, so they are counted in the title and listed in
  the last section instead of being plotted;
- the Pareto table (:func:`~slimtune.studies.pareto_frame`);
- ``layer-heatmaps``: per layer (model order) and Pareto trial: bits, achieved sparsity, KD temperature;
- ``hypervolume``: hypervolume of the complete trials against trial number, in
  (validation accuracy, log10 compression ratio) space with reference (0, ratio 1);
- ``importances``: fANOVA parameter importances for validation accuracy and for log10 size;
- stopped and failed trials with their reasons.

Example:
    >>> import os, tempfile, optuna
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> study = optuna.create_study(study_name="empty", directions=["maximize", "minimize"])
    >>> path = os.path.join(tempfile.mkdtemp(), "report.html")
    >>> write_report(study, "sqlite:///:memory:", path) > 1_000_000  # plotly.js is embedded once
    True
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from slimtune.spaces import Panel, declarations

from . import _keys as keys
from ._frames import pareto_frame
from ._record import TrialRecord
from ._selection import pareto_trials
from ._storage import mask_url

PARETO_DIV = "pareto-front"
HEATMAPS_DIV = "layer-heatmaps"
HYPERVOLUME_DIV = "hypervolume"
IMPORTANCES_DIV = "importances"
PARETO_TRACE = "Pareto front"
PARETO_UID = "pareto"  # plotly draws the trace as <g class="trace scatter tracepareto">

_FRONT_COLOR = "#d62728"
_OTHER_COLOR = "#b8b8b8"
_TEACHER_COLOR = "#1f77b4"
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}

_CSS = """
:root { --fg: #1d1d1f; --muted: #6b6b70; --line: #e3e3e6; --accent: #d62728; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       color: var(--fg); background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 8px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h1 .tool { color: var(--muted); font-weight: 400; }
h2 { font-size: 19px; margin: 0 0 10px; }
.sub { color: var(--muted); margin: 0 0 12px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 18px 20px;
          margin: 18px 0; }
.note { color: var(--muted); font-size: 13.5px; margin: 6px 0 10px; }
.grid { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 20px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-weight: 600; background: #f3f3f5; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { background: none; color: var(--muted); font-weight: 500; white-space: nowrap; }
pre.spec { margin: 0; padding: 10px 12px; background: #f6f6f8; border: 1px solid var(--line);
           border-radius: 6px; font-size: 12.5px; line-height: 1.4; max-height: 420px; overflow: auto; }
code { font-size: 13px; }
.state { display: inline-block; padding: 0 7px; margin-right: 4px; border-radius: 9px; background: #eee;
         font-size: 13px; }
.plot { width: 100%; }
@media (max-width: 900px) { .grid { grid-template-columns: 1fr; } }
"""


# ---------------------------------------------------------------------------------------------
# small formatting helpers


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: Any, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}%"


def _human_bytes(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value))


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def spec_as_toml(spec: dict[str, Any]) -> str:
    """A stored spec (nested dicts) as TOML text: one table per section, knobs as inline tables,
    per-pattern layer overrides as ``[space.layer."pattern"]`` tables.

    Example:
        >>> print(spec_as_toml({"study": {"name": "x", "trials": 3},
        ...                     "space": {"weight_bits": {"choices": [2, 4]}, "layer": {"fc3": {"weight_bits": 8}}}}))
        [study]
        name = "x"
        trials = 3
        <BLANKLINE>
        [space]
        weight_bits = { choices = [2, 4] }
        <BLANKLINE>
        [space.layer."fc3"]
        weight_bits = 8
    """
    blocks: list[str] = []
    for section, body in spec.items():
        if not isinstance(body, dict):
            blocks.append(f"{_toml_key(section)} = {_toml_value(body)}")
            continue
        lines = [f"[{_toml_key(section)}]"]
        nested: list[tuple[str, dict[str, Any]]] = []
        for key, value in body.items():
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                nested.extend((f"{_toml_key(section)}.{_toml_key(key)}.{json.dumps(k)}", v) for k, v in value.items())
            elif isinstance(value, dict) and not value and key == "layer":
                continue  # no per-pattern overrides
            else:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        blocks.append("\n".join(lines))
        for name, table in nested:
            blocks.append("\n".join([f"[{name}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]))
    return "\n\n".join(blocks)


def _figure_html(fig: Any, div_id: str, height: int) -> str:
    import plotly.io as pio

    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=_PLOT_CONFIG,
                       default_width="100%", default_height=f"{height}px")


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    # The bundle is embedded verbatim; a literal "</script" inside would end the element early.
    return get_plotlyjs().replace("</script", "<\\/script")


# ---------------------------------------------------------------------------------------------
# the figures


def _hover(trial: FrozenTrial) -> list[Any]:
    record = TrialRecord.of(trial)
    return [record.number, record.test_accuracy, record.compression_ratio, record.mean_bits, record.sparsity]


_HOVER = ("trial #%{customdata[0]}<br>val accuracy %{y:.2%}<br>test accuracy %{customdata[1]:.2%}<br>"
          "size %{x:,.0f} B<br>ratio %{customdata[2]:.1f}×<br>mean bits %{customdata[3]:.2f}<br>"
          "sparsity %{customdata[4]:.1%}<extra></extra>")


def _pareto_figure(study: optuna.Study, front: list[FrozenTrial], complete: list[FrozenTrial],
                   counts: Counter[str], teacher: dict[str, Any], floor: float | None) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    front_numbers = {t.number for t in front}
    others = [t for t in complete if t.number not in front_numbers]
    if others:  # an empty trace would draw no group in the SVG
        fig.add_trace(go.Scatter(
            name=f"other complete trials ({len(others)})", uid="others", x=[t.values[1] for t in others],
            y=[t.values[0] for t in others],
            mode="markers", marker=dict(color=_OTHER_COLOR, size=8, line=dict(color="#8a8a8a", width=0.5)),
            customdata=[_hover(t) for t in others], hovertemplate=_HOVER))
    ordered = front  # smallest first, as pareto_trials gives it
    fig.add_trace(go.Scatter(
        name=PARETO_TRACE, uid=PARETO_UID, x=[t.values[1] for t in ordered], y=[t.values[0] for t in ordered],
        mode="lines+markers", line=dict(color=_FRONT_COLOR, shape="hv", width=1.5, dash="dot"),
        marker=dict(color=_FRONT_COLOR, size=11, line=dict(color="white", width=1)),
        customdata=[_hover(t) for t in ordered], hovertemplate=_HOVER))
    if teacher.get("dense_bytes") and teacher.get("val_accuracy") is not None:
        fig.add_trace(go.Scatter(
            name="teacher (fp32, dense)", uid="teacher", x=[teacher["dense_bytes"]], y=[teacher["val_accuracy"]],
            mode="markers",
            marker=dict(symbol="star", size=16, color=_TEACHER_COLOR, line=dict(color="white", width=1)),
            customdata=[[teacher.get("test_accuracy")]],
            hovertemplate="teacher<br>val accuracy %{y:.2%}<br>test accuracy %{customdata[0]:.2%}<br>"
                          "fp32 dense %{x:,.0f} B<extra></extra>"))
    accuracies = [t.values[0] for t in complete] + ([teacher["val_accuracy"]] if "val_accuracy" in teacher else [])
    y_range = None
    floor_note = ""
    if accuracies:
        low, high = min(accuracies), max(accuracies)
        span = max(high - low, 0.005)
        if floor is not None and floor >= low - span:  # near the trials: draw it and keep it in view
            low = min(low, floor)
            fig.add_hline(y=floor, line=dict(color="#999", dash="dash", width=1),
                          annotation_text=f"accuracy floor {_pct(floor)}", annotation_position="bottom right",
                          annotation_font=dict(size=11, color="#777"))
        elif floor is not None:  # far below: a line there would squash the trials into a strip
            floor_note = f" (accuracy floor {_pct(floor)}, below the plotted range)"
        pad = 0.08 * max(high - low, 0.005)
        y_range = [low - pad, high + pad]
    not_plotted = [f"{counts[s]} {s.lower()}" for s in ("PRUNED", "FAIL", "RUNNING", "WAITING") if counts.get(s)]
    title = f"{len(complete)} complete trials, {len(front)} on the Pareto front"
    if not_plotted:
        title += f"; not plotted (no size): {', '.join(not_plotted)}"
    title += floor_note
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)), template="plotly_white", hovermode="closest",
        margin=dict(l=70, r=20, t=50, b=60), legend=dict(orientation="h", yanchor="bottom", y=-0.3, x=0),
        xaxis=dict(type="log", title=dict(text="size of the packed artifact (bytes, log scale)")),
        yaxis=dict(title=dict(text="validation accuracy"), tickformat=".1%", range=y_range))
    return fig


def _layer_names(trials: Sequence[FrozenTrial]) -> list[str]:
    names: list[str] = []
    for trial in trials:
        record = TrialRecord.of(trial)
        for name in record.plan.get("layers", {}):
            if name not in names:
                names.append(name)
        for name in record.layers:
            if name not in names:
                names.append(name)
    return names


def _panel_values(panel: Panel, ordered: list[FrozenTrial], layers: list[str]) -> list[list[Any]]:
    def value(trial: FrozenTrial, layer: str) -> Any:
        if panel.source == "plan":
            return TrialRecord.of(trial).plan.get("layers", {}).get(layer, {}).get(panel.key, panel.neutral)
        return TrialRecord.of(trial).layers.get(layer, {}).get(panel.key)

    return [[value(t, layer) for layer in layers] for t in ordered]


def _heatmap_figure(ordered: list[FrozenTrial]) -> tuple[Any, int]:
    """One heat map per declared panel (``slimtune.spaces.Panel``) over layers and Pareto trials; a
    panel ``only_if_used`` is drawn when some trial moved its knob off its neutral value."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = _layer_names(ordered)
    rows = [f"#{t.number} · {_human_bytes(t.values[1])}" for t in ordered]
    show_text = len(layers) * len(ordered) <= 600

    def text(values: list[list[Any]], fmt: str) -> list[list[str]]:
        return [[("" if v is None else format(v, fmt)) for v in row] for row in values]

    bit_ticks = [2, 3, 4, 6, 8, 16, 32]
    specs = []
    for panel in (p for d in declarations() for p in d.panels):
        values = _panel_values(panel, ordered, layers)
        if panel.only_if_used and not any(v is not None and v != panel.neutral for row in values for v in row):
            continue
        if panel.log2:
            z = [[(math.log2(v) if v else None) for v in row] for row in values]
            ticks = dict(tickvals=[math.log2(b) for b in bit_ticks], ticktext=[str(b) for b in bit_ticks])
        else:
            z = values
            ticks = dict(tickformat=".0%") if panel.text_format.endswith("%") else (
                dict(tickformat=".1f") if panel.low is not None else {})
        specs.append((panel.title, z, text(values, panel.text_format), panel.colorscale, ticks, panel.hover,
                      (panel.low, panel.high)))
    panels = len(specs)
    fig = make_subplots(rows=1, cols=panels, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[spec[0] for spec in specs])
    height = 190 + 30 * max(len(ordered), 2)
    margin = dict(l=120, r=20, t=40, b=100)
    below_labels = -46 / (height - margin["t"] - margin["b"])  # under the layer names, in paper units
    width = (1 - 0.04 * (panels - 1)) / panels  # of one panel, in paper units
    for col, (_, z, labels, scale, ticks, hover, (zmin, zmax)) in enumerate(specs, start=1):
        domain_start = (col - 1) * (width + 0.04)
        fig.add_trace(go.Heatmap(
            z=z, x=layers, y=rows, text=labels, texttemplate="%{text}" if show_text else None, colorscale=scale,
            zmin=zmin, zmax=zmax, xgap=1, ygap=1,
            hovertemplate="%{y}<br>layer %{x}<br>" + hover + "<extra></extra>",
            colorbar=dict(orientation="h", x=domain_start + width / 2, xanchor="center", y=below_labels,
                          yanchor="top", len=0.84 / panels, thickness=10, **ticks)), row=1, col=col)
    fig.update_layout(template="plotly_white", margin=margin, height=height)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", side="bottom")
    fig.update_annotations(font=dict(size=13))
    return fig, height


def hypervolume_2d(points: Sequence[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both coordinates maximized) above the reference (0, 0);
    points with a coordinate <= 0 add nothing.

    Example:
        >>> hypervolume_2d([(1.0, 2.0), (2.0, 1.0), (0.5, 0.5)])
        3.0
    """
    kept = sorted(((x, y) for x, y in points if x > 0 and y > 0), reverse=True)
    area, best_y = 0.0, 0.0
    for i, (x, y) in enumerate(kept):
        best_y = max(best_y, y)
        next_x = kept[i + 1][0] if i + 1 < len(kept) else 0.0
        area += (x - next_x) * best_y
    return area


def _hypervolume_figure(trials: list[FrozenTrial], dense_bytes: float) -> Any:
    import plotly.graph_objects as go

    points: list[tuple[float, float]] = []
    numbers, volumes, improved = [], [], []
    last = 0.0
    for trial in sorted(trials, key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and trial.values and trial.values[1] > 0:
            points.append((math.log10(dense_bytes / trial.values[1]), trial.values[0]))
        volume = hypervolume_2d(points)
        numbers.append(trial.number)
        volumes.append(volume)
        improved.append(volume > last + 1e-12)
        last = max(last, volume)
    fig = go.Figure()
    fig.add_trace(go.Scatter(name="hypervolume", x=numbers, y=volumes, mode="lines", line=dict(shape="hv",
                             color=_FRONT_COLOR), hovertemplate="after trial #%{x}: %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(name="trial that grew it", x=[n for n, i in zip(numbers, improved) if i],
                             y=[v for v, i in zip(volumes, improved) if i], mode="markers",
                             marker=dict(color=_FRONT_COLOR, size=7),
                             hovertemplate="trial #%{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(template="plotly_white", margin=dict(l=70, r=20, t=20, b=50), showlegend=False,
                      xaxis=dict(title=dict(text="trial number")),
                      yaxis=dict(title=dict(text="hypervolume (accuracy × decades)"), rangemode="tozero"))
    return fig


def _importances(complete: list[FrozenTrial], study: optuna.Study) -> tuple[dict[str, dict[str, float]] | None, str]:
    """fANOVA importances for val accuracy and log10 size, or ``None`` and why not."""
    if len(complete) < 2:
        return None, f"Parameter importances need at least 2 complete trials; this study has {len(complete)}."
    shared = set(complete[0].params)
    for trial in complete[1:]:
        shared &= set(trial.params)
    varying = sorted(p for p in shared if len({json.dumps(t.params[p]) for t in complete}) > 1)
    if not varying:
        return None, "Parameter importances need parameters whose values differ between complete trials; none do."
    targets = {
        "validation accuracy": lambda t: t.values[0],
        "size (log10 bytes)": lambda t: math.log10(max(t.values[1], 1.0)),
    }
    result: dict[str, dict[str, float]] = {}
    notes = []
    for label, target in targets.items():
        if len({round(target(t), 12) for t in complete}) < 2:
            notes.append(f"{label} is the same for every complete trial")
            continue
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            result[label] = optuna.importance.get_param_importances(study, evaluator=evaluator, params=varying,
                                                                    target=target)
        except Exception as exc:  # a report must not fail on a statistics corner case
            notes.append(f"{label}: {type(exc).__name__}: {exc}")
    if not result:
        return None, "Parameter importances could not be computed: " + "; ".join(notes) + "."
    return result, "; ".join(notes)


def _importance_figure(importances: dict[str, dict[str, float]]) -> tuple[Any, int]:
    import plotly.graph_objects as go

    first = next(iter(importances.values()))
    params = sorted(first, key=lambda p: first[p])  # bottom to top: most important at the top
    for values in importances.values():
        params += [p for p in values if p not in params]
    colors = dict(zip(importances, [_FRONT_COLOR, _TEACHER_COLOR]))
    fig = go.Figure()
    # Horizontal grouped bars stack traces bottom-up: add them in reverse so the first target's bar is
    # on top in each group, and reverse the legend to match.
    for label, values in reversed(list(importances.items())):
        color = colors[label]
        fig.add_trace(go.Bar(name=f"for {label}", y=params, x=[values.get(p, 0.0) for p in params], orientation="h",
                             marker_color=color, hovertemplate="%{y}: %{x:.3f}<extra>" + label + "</extra>"))
    height = 140 + 34 * len(params)
    fig.update_layout(template="plotly_white", barmode="group", height=height,
                      margin=dict(l=170, r=20, t=20, b=50),
                      legend=dict(orientation="h", y=1.02, yanchor="bottom", traceorder="reversed"),
                      yaxis=dict(ticksuffix="  "),
                      xaxis=dict(title=dict(text="importance (fANOVA, normalized to sum 1 per target)")))
    return fig, height


# ---------------------------------------------------------------------------------------------
# the page


def _facts_table(rows: list[tuple[str, str]]) -> str:
    return "<table class=\"facts\">" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _pareto_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "<p class=\"note\">No complete trials yet, so no Pareto front.</p>"
    columns = [("trial", "trial", lambda v: f"#{int(v)}"),
               ("val_accuracy", "val accuracy", _pct),
               ("test_accuracy", "test accuracy", _pct),
               ("size_bytes", "size (bytes)", lambda v: f"{int(v):,}"),
               ("compression_ratio", "ratio", lambda v: "" if pd.isna(v) else f"{v:.1f}×"),
               ("mean_bits", "mean bits", lambda v: "" if pd.isna(v) else f"{v:.2f}"),
               ("sparsity", "sparsity", lambda v: _pct(v, 1)),
               ("kd_alpha", "kd α", lambda v: "" if pd.isna(v) else f"{v:.2f}"),
               ("feature_kd_weight", "feature KD", lambda v: "" if pd.isna(v) else f"{v:.2f}"),
               ("l1_weight", "L1", lambda v: "" if pd.isna(v) else f"{v:.3g}"),
               ("refines", "refines", lambda v: "" if pd.isna(v) else f"#{int(v)}")]
    used = {"l1_weight": lambda col: col.fillna(0).any(), "refines": lambda col: col.notna().any()}
    columns = [c for c in columns if c[0] in frame.columns and used.get(c[0], lambda col: True)(frame[c[0]])]
    head = "".join(f"<th class=\"num\">{_esc(label)}</th>" for _, label, _ in columns)
    body = []
    for _, row in frame.iterrows():
        cells = "".join(f"<td class=\"num\">{_esc(fmt(row[col]) if row[col] is not None else '')}</td>"
                        for col, _, fmt in columns)
        body.append(f"<tr>{cells}</tr>")
    return f"<table id=\"pareto-table\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _others_table(trials: list[FrozenTrial]) -> str:
    rows = []
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            continue
        record = TrialRecord.of(trial)
        history = record.val_history
        reason = record.reason or ""
        rows.append(f"<tr><td class=\"num\">#{trial.number}</td><td>{_esc(trial.state.name)}</td>"
                    f"<td class=\"num\">{_pct(history[-1]) if history else ''}</td>"
                    f"<td class=\"num\">{_pct(record.sparsity, 1)}</td><td>{_esc(reason)}</td></tr>")
    if not rows:
        return "<p class=\"note\">None: every trial completed.</p>"
    return ("<table id=\"stopped-table\"><thead><tr><th class=\"num\">trial</th><th>state</th>"
            "<th class=\"num\">last val accuracy</th><th class=\"num\">sparsity</th><th>reason</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def render_report(study: optuna.Study, storage_url: str, *, now: _dt.datetime | None = None) -> str:
    """The HTML report of ``study`` as one string (see the module docstring for its contents)."""
    if len(study.directions) != 2:
        from slimtune.spaces import SpecError

        raise SpecError("--study", study.study_name, "a slimtune study (two objectives: val accuracy, size)",
                        "is not a slimtune study")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    ordered_front = pareto_trials(study)
    counts: Counter[str] = Counter(t.state.name for t in trials)
    spec = study.user_attrs.get(keys.SPEC) or {}
    teacher = study.user_attrs.get(keys.TEACHER) or {}
    max_drop = spec.get("study", {}).get("max_accuracy_drop")
    floor = None
    if teacher.get("val_accuracy") is not None and max_drop is not None:
        floor = teacher["val_accuracy"] - max_drop
    name = study.study_name

    states = " ".join(f"<span class=\"state\">{_esc(s.lower())} {counts[s]}</span>"
                      for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING") if counts.get(s)) or "none yet"
    try:
        from importlib.metadata import version

        tool_version = version("slimtune")
    except Exception:
        tool_version = study.user_attrs.get(keys.VERSION, "?")
    facts = [("study", f"<b>{_esc(name)}</b>"), ("storage", f"<code>{_esc(mask_url(storage_url))}</code>")]
    if teacher:
        facts += [("teacher", f"val {_pct(teacher.get('val_accuracy'))} · test {_pct(teacher.get('test_accuracy'))}"),
                  ("teacher size", f"{teacher.get('dense_bytes', 0):,} bytes fp32 dense"
                                   + (f" ({teacher['parameters']:,} parameters)" if teacher.get("parameters") else "")),
                  ("teacher source", _esc(teacher.get("source", "")))]
    else:
        facts.append(("teacher", "not recorded yet"))
    if floor is not None:
        facts.append(("accuracy floor", f"{_pct(floor)} (teacher val − max_accuracy_drop {max_drop:g}; "
                                        "trials below it are pruned)"))
    feasible_drop = spec.get("study", {}).get("feasible_drop")
    if teacher.get("val_accuracy") is not None and feasible_drop is not None:
        facts.append(("feasible", f"val ≥ {_pct(teacher['val_accuracy'] - feasible_drop)} (teacher val − "
                                  f"feasible_drop {feasible_drop:g}); the Pareto front holds feasible trials only"))
    refinements = [t for t in study.get_trials(deepcopy=False) if TrialRecord.of(t).refines is not None]
    if refinements:
        facts.append(("refined", f"{len(refinements)} Pareto plan(s) trained again, longer, as new trials "
                                 "(the Pareto table's <i>refines</i> column); each refined trial is off the front"))
    if spec.get("study", {}).get("sampler"):
        facts.append(("sampler", _esc(spec["study"]["sampler"])))
    facts += [("trials", states),
              ("generated", _esc(now.strftime("%Y-%m-%d %H:%M:%S %Z").strip())
               + f" · slimtune {_esc(tool_version)} · optuna {_esc(optuna.__version__)}")]
    spec_text = spec_as_toml(spec) if spec else "(no spec stored: not a study written by slimtune search)"

    sections: list[str] = []
    sections.append(
        "<section id=\"summary\"><h2>Summary</h2><div class=\"grid\">"
        f"<div>{_facts_table(facts)}</div>"
        f"<div><div class=\"note\" style=\"margin-top:0\">Spec stored with the study</div>"
        f"<pre class=\"spec\">{_esc(spec_text)}</pre></div></div></section>")

    pareto_fig = _pareto_figure(study, ordered_front, complete, counts, teacher, floor)
    sections.append(
        "<section id=\"front\"><h2>Pareto front</h2>"
        "<p class=\"note\">Validation accuracy (selection metric) against the byte length of the packed artifact. "
        "Red: the Pareto-optimal trials (no other trial is both smaller and more accurate), joined by their "
        "attainment steps; grey: the other complete trials; star: the teacher at fp32 dense size. Pruned trials "
        "(stopped below the accuracy floor) and failed trials have no artifact and therefore no size, so they "
        "are counted in the title and listed at the end, not plotted. Hover a point for its details.</p>"
        f"{_figure_html(pareto_fig, PARETO_DIV, 480)}"
        "<h3 style=\"font-size:16px;margin:18px 0 6px\">Pareto-optimal trials, smallest first</h3>"
        "<p class=\"note\">Ratio = teacher fp32 dense bytes / artifact bytes; mean bits weighted by weight count; "
        "test accuracy is for reporting only.</p>"
        f"{_pareto_table(pareto_frame(study) if complete else pd.DataFrame())}</section>")

    if ordered_front and _layer_names(ordered_front):
        heat_fig, heat_height = _heatmap_figure(ordered_front)
        heat = _figure_html(heat_fig, HEATMAPS_DIV, heat_height)
    else:
        heat = "<p class=\"note\">No Pareto trials with per-layer details yet.</p>"
    sections.append(
        "<section id=\"layers\"><h2>Per-layer choices on the front</h2>"
        "<p class=\"note\">Layers in model order, Pareto trials smallest first (as in the table). Bits and sparsity "
        "are what the packed model has; the KD temperature is the planned one (the output layer's is the logit "
        "temperature).</p>"
        f"{heat}</section>")

    dense = teacher.get("dense_bytes")
    if complete and dense:
        hv = _figure_html(_hypervolume_figure(trials, float(dense)), HYPERVOLUME_DIV, 340)
    else:
        hv = "<p class=\"note\">Needs complete trials and the teacher's size.</p>"
    sections.append(
        "<section id=\"progress\"><h2>Hypervolume</h2>"
        "<p class=\"note\">Area dominated by the complete trials so far, in (validation accuracy, log10 compression "
        "ratio) with both maximized and the reference point accuracy 0, ratio 1 (size = the teacher's fp32 dense "
        "bytes). Equivalently, minimizing (1 − val accuracy, log10 size bytes) with reference (1, log10 dense "
        "bytes). Units: accuracy × decades of compression; trials larger than the teacher add nothing. Pruned and "
        "failed trials leave it unchanged.</p>"
        f"{hv}</section>")

    importances, why = _importances(complete, study)
    if importances:
        imp_fig, imp_height = _importance_figure(importances)
        imp = _figure_html(imp_fig, IMPORTANCES_DIV, imp_height)
        if why:
            imp += f"<p class=\"note\">Not shown: {_esc(why)}.</p>"
    else:
        imp = f"<p class=\"note\">{_esc(why)}</p>"
    sections.append(
        "<section id=\"importance\"><h2>Parameter importances</h2>"
        "<p class=\"note\">fANOVA (optuna.importance, seed 0) over the complete trials, for validation accuracy "
        "and for log10 size; only parameters whose value varies. Few trials give rough estimates.</p>"
        f"{imp}</section>")

    sections.append("<section id=\"stopped\"><h2>Pruned and failed trials</h2>" + _others_table(trials) + "</section>")

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_esc(name)} · slimtune report</title><style>{_CSS}</style>"
        f"<script type=\"text/javascript\">{_plotly_js()}</script></head>\n<body><main>"
        f"<header><h1><span class=\"tool\">slimtune report ·</span> {_esc(name)}</h1>"
        f"<p class=\"sub\">{_esc(mask_url(storage_url))} · generated {_esc(now.strftime('%Y-%m-%d %H:%M %Z').strip())}"
        "</p></header>\n" + "\n".join(sections) + "\n</main></body></html>\n")


def write_report(study: optuna.Study, storage_url: str, out_path: str | os.PathLike[str]) -> int:
    """Write the HTML report of ``study`` to ``out_path`` and return the bytes written.

    The file is written next to its target under a temporary name and moved into place, so a
    reader never sees a half-written report. ``storage_url`` is shown with its password masked.
    """
    data = render_report(study, storage_url).encode("utf-8")
    target = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return len(data)
