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
- ``deploy-objective`` (a study with ``[objective] deploy``): the third objective against size,
  coloured by the validation metric, the Pareto trials on all three ringed;
- ``sensitivity-chart`` (when the study measured a sensitivity pass, ``[search.seed]``): the
  metric's drop when one layer alone is compressed at each knob value, per layer;
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
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from slimtune.spaces import Metric

from . import _keys as keys
from ._figures import (
    DROPS, FRONT_COLOR, TEACHER_COLOR, accuracy_floor, export_command, front_figure, layer_names, pct,
    plans_figure,
)
from ._frames import pareto_frame, study_metric
from ._record import TrialRecord
from ._selection import pareto_trials, within_drop
from ._sensitivity import clean_sensitivity, sensitivity_figure, stored_calibration, stored_sensitivity
from ._storage import mask_url

TRIALS_TABLE = "trials-table"
PARETO_DIV = "pareto-front"
HEATMAPS_DIV = "layer-heatmaps"
HYPERVOLUME_DIV = "hypervolume"
IMPORTANCES_DIV = "importances"
SENSITIVITY_DIV = "sensitivity-chart"
DEPLOY_DIV = "deploy-objective"
_PLOT_CONFIG = {"displaylogo": False, "responsive": True}

# Sorting the trial table by a click on its header: a few lines of our own, so the page stays offline.
_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var up = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) { var v = row.cells[col].getAttribute("data-key"); return v === "" ? NaN : Number(v); }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (isNaN(x) || isNaN(y)) {
          if (isNaN(x) && isNaN(y)) { return a.cells[col].textContent.localeCompare(b.cells[col].textContent); }
          return isNaN(x) ? 1 : -1;
        }
        return up ? x - y : y - x;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""

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
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " ▲"; }
table.sortable th[aria-sort="descending"]::after { content: " ▼"; }
.scroll { max-height: 520px; overflow: auto; }
@media (max-width: 900px) { .grid { grid-template-columns: 1fr; } }
"""


# ---------------------------------------------------------------------------------------------
# small formatting helpers


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


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
                             color=FRONT_COLOR), hovertemplate="after trial #%{x}: %{y:.4f}<extra></extra>"))
    fig.add_trace(go.Scatter(name="trial that grew it", x=[n for n, i in zip(numbers, improved) if i],
                             y=[v for v, i in zip(volumes, improved) if i], mode="markers",
                             marker=dict(color=FRONT_COLOR, size=7),
                             hovertemplate="trial #%{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(template="plotly_white", margin=dict(l=70, r=20, t=20, b=50), showlegend=False,
                      xaxis=dict(title=dict(text="trial number")),
                      yaxis=dict(title=dict(text="hypervolume (accuracy × decades)"), rangemode="tozero"))
    return fig


DEPLOY_LABELS = {"latency_ms": "latency of its integer ONNX (ms)", "onnx_bytes": "bytes of its integer ONNX file"}


def _deploy_figure(complete: list[FrozenTrial], on_front: set[int], objective: str, metric: Metric) -> Any:
    """The third objective against size, every complete trial coloured by its validation metric,
    the Pareto trials (on all three objectives) ringed in red: the 3-objective view."""
    import plotly.graph_objects as go

    shown = [t for t in complete if len(t.values) > 2]
    scale = 100 if metric.percent else 1
    fig = go.Figure(go.Scatter(
        x=[t.values[1] for t in shown], y=[t.values[2] for t in shown], mode="markers",
        marker=dict(size=[12 if t.number in on_front else 8 for t in shown],
                    color=[scale * (metric.value(t.values[0]) or 0) for t in shown], colorscale="Viridis",
                    reversescale=not metric.maximize, showscale=True,
                    colorbar=dict(title=dict(text=f"val {metric.label}" + (" (%)" if metric.percent else ""))),
                    line=dict(color=[FRONT_COLOR if t.number in on_front else "white" for t in shown], width=2)),
        customdata=[[t.number, metric.format_score(t.values[0]), "Pareto" if t.number in on_front else ""]
                    for t in shown],
        hovertemplate="trial #%{customdata[0]} %{customdata[2]}<br>val %{customdata[1]}<br>%{x:,} bytes"
                      f"<br>{objective} %{{y:.4g}}<extra></extra>"))
    fig.update_layout(template="plotly_white", margin=dict(l=80, r=20, t=20, b=50),
                      xaxis=dict(title=dict(text="packed artifact (bytes, log)"), type="log"),
                      yaxis=dict(title=dict(text=DEPLOY_LABELS.get(objective, objective))))
    return fig


def _deploy_section(study: optuna.Study, complete: list[FrozenTrial], front: list[FrozenTrial], metric: Metric) -> str:
    """The 3-objective view of a study with ``[objective] deploy``; ``""`` for a 2-objective study."""
    if len(study.directions) < 3:
        return ""
    names = study.metric_names or []
    objective = names[2] if len(names) > 2 else "deploy"
    body = (_figure_html(_deploy_figure(complete, {t.number for t in front}, objective, metric), DEPLOY_DIV, 420)
            if complete else "<p class=\"note\">No complete trial yet.</p>")
    return ("<section id=\"deploy\"><h2>Third objective: " + _esc(objective) + "</h2><p class=\"note\">Each "
            "complete trial's " + _esc(DEPLOY_LABELS.get(objective, objective)) + ", measured on the worker that ran "
            "it, against its packed size; colour: validation metric; ringed in red: the Pareto trials on all three "
            "objectives (those the tables above list).</p>" + body + "</section>")


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
    colors = dict(zip(importances, [FRONT_COLOR, TEACHER_COLOR]))
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


def _pareto_table(frame: pd.DataFrame, metric: Metric) -> str:
    if frame.empty:
        return "<p class=\"note\">No complete trials yet, so no Pareto front.</p>"

    def shown(value: Any) -> str:  # the frame holds metric values
        return metric.format(None if pd.isna(value) else value)

    columns = [("trial", "trial", lambda v: f"#{int(v)}"),
               (metric.column("val"), f"val {metric.label}", shown),
               (metric.column("test"), f"test {metric.label}", shown),
               ("size_bytes", "size (bytes)", lambda v: f"{int(v):,}"),
               ("compression_ratio", "ratio", lambda v: "" if pd.isna(v) else f"{v:.1f}×"),
               ("mean_bits", "mean bits", lambda v: "" if pd.isna(v) else f"{v:.2f}"),
               ("sparsity", "sparsity", lambda v: pct(v, 1)),
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


def _cell(text: str, key: Any = None, numeric: bool = True) -> str:
    """A table cell; ``key`` is what the sort compares (a number, or empty to sort by text)."""
    data = "" if key is None or (isinstance(key, float) and math.isnan(key)) else f"{key}"
    return f"<td class=\"{'num' if numeric else ''}\" data-key=\"{_esc(data)}\">{_esc(text)}</td>"


def _trials_table(trials: list[FrozenTrial], metric: Metric) -> str:
    """Every trial, sortable by a click on a column: state, accuracies, size, ratio, bits,
    sparsity, seconds, why it stopped."""
    if not trials:
        return "<p class=\"note\">No trials yet.</p>"
    head = ("trial", "state", f"val {metric.label}", f"test {metric.label}", "size (bytes)", "ratio", "mean bits",
            "sparsity", "seconds", "refines", "stop reason")
    show = metric.format_score
    rows = []
    for trial in trials:
        record = TrialRecord.of(trial)
        val = record.val_accuracy if record.val_accuracy is not None else record.last_val_accuracy
        seconds = record.seconds.get("total")
        if seconds is None and trial.datetime_start and trial.datetime_complete:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        cells = [_cell(f"#{trial.number}", trial.number), _cell(trial.state.name.lower(), None, numeric=False),
                 _cell(show(val), val), _cell(show(record.test_accuracy), record.test_accuracy),
                 _cell(f"{record.size_bytes:,}" if record.size_bytes else "", record.size_bytes),
                 _cell(f"{record.compression_ratio:.1f}×" if record.compression_ratio else "", record.compression_ratio),
                 _cell(f"{record.mean_bits:.2f}" if record.mean_bits is not None else "", record.mean_bits),
                 _cell(pct(record.sparsity, 1), record.sparsity),
                 _cell(f"{seconds:.1f}" if seconds is not None else "", seconds),
                 _cell(f"#{record.refines}" if record.refines is not None else "", record.refines),
                 _cell(record.reason or "", None, numeric=False)]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = "".join(f"<th class=\"{'' if label in ('state', 'stop reason') else 'num'}\">{_esc(label)}</th>"
                     for label in head)
    return (f"<div class=\"scroll\"><table id=\"{TRIALS_TABLE}\" class=\"sortable\"><thead><tr>{header}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _time_facts(trials: list[FrozenTrial]) -> str | None:
    """Trial time in total and per trial, and the wall clock from the first start to the last end."""
    seconds = [TrialRecord.of(t).seconds.get("total") for t in trials]
    seconds = [s for s in seconds if isinstance(s, (int, float))]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if not seconds and not ends:
        return None
    parts = []
    if seconds:
        parts.append(f"{sum(seconds):,.0f} s of trial time over {len(seconds)} trials (median "
                     f"{statistics.median(seconds):.1f} s a trial)")
    if starts and ends:
        parts.append(f"{(max(ends) - min(starts)).total_seconds():,.0f} s from the first start to the last end")
    return " · ".join(parts)


def _picks(study: optuna.Study, storage_url: str, metric: Metric) -> str:
    """What ``slimtune export --max-drop`` picks for 0.5 and 1 point, and the command."""
    from slimtune.spaces import SpecError

    rows = []
    for drop in DROPS:
        command = export_command(study.study_name, storage_url, max_drop=drop)
        try:
            trial = within_drop(study, drop)
        except SpecError as exc:
            rows.append(f"<tr><th>within {metric.drop_text(drop)}</th><td>no trial yet ({_esc(exc)})</td></tr>")
            continue
        record = TrialRecord.of(trial)
        ratio = f", {record.compression_ratio:.1f}×" if record.compression_ratio else ""
        rows.append(f"<tr><th>within {metric.drop_text(drop)}</th><td>trial <b>#{trial.number}</b>: val "
                    f"{metric.format_score(record.val_accuracy)}, test "
                    f"{metric.format_score(record.test_accuracy)}, {record.size_bytes:,} bytes{ratio}"
                    f"<br><code>{_esc(command)}</code></td></tr>")
    return f"<table class=\"facts\" id=\"picks\">{''.join(rows)}</table>"


def _others_table(trials: list[FrozenTrial], metric: Metric) -> str:
    rows = []
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            continue
        record = TrialRecord.of(trial)
        history = record.val_history
        reason = record.reason or ""
        rows.append(f"<tr><td class=\"num\">#{trial.number}</td><td>{_esc(trial.state.name)}</td>"
                    f"<td class=\"num\">{metric.format_score(history[-1]) if history else ''}</td>"
                    f"<td class=\"num\">{pct(record.sparsity, 1)}</td><td>{_esc(reason)}</td></tr>")
    if not rows:
        return "<p class=\"note\">None: every trial completed.</p>"
    return ("<table id=\"stopped-table\"><thead><tr><th class=\"num\">trial</th><th>state</th>"
            f"<th class=\"num\">last val {metric.label}</th><th class=\"num\">sparsity</th><th>reason</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _sensitivity_section(study: optuna.Study, storage_url: str, metric: Metric) -> str:
    """The per-layer sensitivity chart, when the study measured a pass (``[search.seed]``); else ``""``."""
    try:
        stored = stored_sensitivity(study._storage, study.study_name)
    except TypeError:  # not a database (an in-memory study): no blobs
        stored = None
    if stored is None:
        return ""
    data = clean_sensitivity(stored)
    if data is None:
        body = "<p class=\"note\">The stored pass holds no readable layer.</p>"
    else:
        fig, height = sensitivity_figure(data, metric)
        cost = (f" It measured {sum(len(l['points']) for l in data['layers'].values())} plans on "
                f"{int(data['samples']):,} validation samples in {data['seconds']:.1f} s."
                if "samples" in data and "seconds" in data else "")
        wave = stored_calibration(study._storage, study.study_name)
        calibrated = (f" Its estimates were {wave['factor']:.1f}x what the first {int(wave['seeds'])} seeds lost "
                      f"fine-tuned (counted up to 10x), so {int(wave['plans'])} calibrated plans followed, "
                      f"estimated up to {wave['factor']:.1f}x the floor." if wave is not None else "")
        body = (f"<p class=\"note\">What compressing one layer alone costs, without fine-tuning: the teacher with only "
                f"that layer at a knob's value, packed and scored on validation samples; the seeded plans are "
                f"allocated from it.{_esc(cost)}{_esc(calibrated)}</p>" + _figure_html(fig, SENSITIVITY_DIV, height))
    return f"<section id=\"sensitivity\"><h2>Per-layer sensitivity</h2>{body}</section>"


def render_report(study: optuna.Study, storage_url: str, *, now: _dt.datetime | None = None) -> str:
    """The HTML report of ``study`` as one string (see the module docstring for its contents)."""
    if len(study.directions) not in (2, 3):
        from slimtune.spaces import SpecError

        raise SpecError("--study", study.study_name, "a slimtune study (objectives: val accuracy, size, and maybe "
                        "a deploy figure)", "is not a slimtune study")
    now = now or _dt.datetime.now(_dt.timezone.utc)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    ordered_front = pareto_trials(study)
    counts: Counter[str] = Counter(t.state.name for t in trials)
    spec = study.user_attrs.get(keys.SPEC) or {}
    teacher = study.user_attrs.get(keys.TEACHER) or {}
    max_drop = spec.get("study", {}).get("max_accuracy_drop")
    floor = accuracy_floor(study)
    name = study.study_name
    metric = study_metric(study)
    show = metric.format_score  # scores in the study, the metric shown

    states = " ".join(f"<span class=\"state\">{_esc(s.lower())} {counts[s]}</span>"
                      for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING") if counts.get(s)) or "none yet"
    try:
        from importlib.metadata import version

        tool_version = version("slimtune")
    except Exception:
        tool_version = study.user_attrs.get(keys.VERSION, "?")
    facts = [("study", f"<b>{_esc(name)}</b>"), ("storage", f"<code>{_esc(mask_url(storage_url))}</code>")]
    if teacher:
        facts += [("teacher", f"val {show(teacher.get('val_accuracy'))} · test {show(teacher.get('test_accuracy'))}"
                              + ("" if metric.name == "accuracy" else f" ({metric.label})")),
                  ("teacher size", f"{teacher.get('dense_bytes', 0):,} bytes fp32 dense"
                                   + (f" ({teacher['parameters']:,} parameters)" if teacher.get("parameters") else "")),
                  ("teacher source", _esc(teacher.get("source", "")))]
    else:
        facts.append(("teacher", "not recorded yet"))
    if floor is not None:
        facts.append((f"{metric.label} floor", f"{show(floor)} (teacher val {'−' if metric.maximize else '+'} "
                                               f"max_accuracy_drop {max_drop:g}; trials beyond it are pruned)"))
    feasible_drop = spec.get("study", {}).get("feasible_drop")
    if teacher.get("val_accuracy") is not None and feasible_drop is not None:
        facts.append(("feasible", f"val {'≥' if metric.maximize else '≤'} {show(teacher['val_accuracy'] - feasible_drop)} "
                                  f"(teacher val {'−' if metric.maximize else '+'} "
                                  f"feasible_drop {feasible_drop:g}); the Pareto front holds feasible trials only"))
    refinements = [t for t in study.get_trials(deepcopy=False) if TrialRecord.of(t).refines is not None]
    if refinements:
        facts.append(("refined", f"{len(refinements)} Pareto plan(s) trained again, longer, as new trials "
                                 "(the Pareto table's <i>refines</i> column); each refined trial is off the front"))
    if spec.get("study", {}).get("sampler"):
        facts.append(("sampler", _esc(spec["study"]["sampler"])))
    spent = _time_facts(trials)
    if spent:
        facts.append(("time", _esc(spent)))
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

    pareto_fig = front_figure(study, storage_url)
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
        f"{_pareto_table(pareto_frame(study) if complete else pd.DataFrame(), metric)}"
        "<h3 style=\"font-size:16px;margin:18px 0 6px\">What <code>export --max-drop</code> picks</h3>"
        "<p class=\"note\">The smallest Pareto trial whose validation accuracy is within the drop of the "
        "teacher's, and the command that writes it.</p>"
        f"{_picks(study, storage_url, metric)}</section>")

    if ordered_front and layer_names(ordered_front):
        heat_fig, heat_height = plans_figure(ordered_front)
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
    if complete and dense and (not metric.maximize or metric.logged):
        hv = (f"<p class=\"note\">Not drawn: {_esc(metric.label)} is "
              f"{'a value the model logs' if metric.logged else 'minimized'} and has no natural reference point "
              "for an area; the Pareto front above shows the trade-off.</p>")
    elif complete and dense:
        hv = _figure_html(_hypervolume_figure(trials, float(dense)), HYPERVOLUME_DIV, 340)
    else:
        hv = "<p class=\"note\">Needs complete trials and the teacher's size.</p>"
    sections.append(_deploy_section(study, complete, ordered_front, metric))
    sections.append(_sensitivity_section(study, storage_url, metric))
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
        "and for size on a <b>log10 scale</b> (a change from 10 kB to 20 kB counts as much as one from 100 kB "
        "to 200 kB); optuna-dashboard's own importance chart uses raw bytes, which lets the largest trials "
        "dominate, so the two can disagree. Only parameters whose value varies; few trials give rough "
        "estimates.</p>"
        f"{imp}</section>")

    sections.append("<section id=\"trials\"><h2>All trials</h2><p class=\"note\">Click a column to sort by it. "
                    "Seconds: the trial's own time (sampling, compression, fine-tune, packing, evaluation, storage); "
                    "a pruned trial shows its last validation accuracy.</p>" + _trials_table(trials, metric) + "</section>")
    sections.append("<section id=\"stopped\"><h2>Pruned and failed trials</h2>" + _others_table(trials, metric)
                    + "</section>")

    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{_esc(name)} · slimtune report</title><style>{_CSS}</style>"
        f"<script type=\"text/javascript\">{_plotly_js()}</script></head>\n<body><main>"
        f"<header><h1><span class=\"tool\">slimtune report ·</span> {_esc(name)}</h1>"
        f"<p class=\"sub\">{_esc(mask_url(storage_url))} · generated {_esc(now.strftime('%Y-%m-%d %H:%M %Z').strip())}"
        "</p></header>\n" + "\n".join(sections) + f"\n</main><script>{_SORT_JS}</script></body></html>\n")


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
