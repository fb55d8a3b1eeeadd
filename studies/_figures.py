"""The figures slimtune draws of a study, shared by the report and the dashboard: the Pareto front
as people read it (log size, compression ratio beside it, the teacher and the −0.5 / −1 point
lines) and the per-layer plans of the Pareto trials. Plain plotly figures; no torch here.

Example:
    >>> import optuna
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> study = optuna.create_study(directions=["maximize", "minimize"])
    >>> _ = study.tell(study.ask(), [0.9, 1000.0])
    >>> [trace.name for trace in front_figure(study).data]
    ['Pareto front']
"""

from __future__ import annotations

import math
import shlex
from collections import Counter
from typing import Any, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimtune.spaces import Metric, Panel, declarations, metric_of

from . import _keys as keys
from ._record import TrialRecord
from ._selection import pareto_trials
from ._storage import mask_url

PARETO_TRACE = "Pareto front"
PARETO_UID = "pareto"  # plotly draws the trace as <g class="trace scatter tracepareto">
TEST_TRACE = "test accuracy of the Pareto trials"
DROPS = (0.005, 0.01)  # the accuracy lines drawn under the teacher's: −0.5 and −1 point

FRONT_COLOR = "#d62728"
OTHER_COLOR = "#b8b8b8"
TEACHER_COLOR = "#1f77b4"
_RATIOS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def pct(value: Any, digits: int = 2) -> str:
    """``0.9812`` as ``"98.12%"``; ``""`` for a missing value."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.{digits}f}%"


def human_bytes(n: float) -> str:
    """``14480`` as ``"14.5 kB"``."""
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def accuracy_floor(study: optuna.Study) -> float | None:
    """The teacher's validation accuracy minus the spec's ``max_accuracy_drop`` (trials below it
    are pruned), or ``None`` before the teacher is recorded."""
    teacher_val = (study.user_attrs.get(keys.TEACHER) or {}).get("val_accuracy")
    max_drop = ((study.user_attrs.get(keys.SPEC) or {}).get("study") or {}).get("max_accuracy_drop")
    return teacher_val - max_drop if teacher_val is not None and max_drop is not None else None


def export_command(study_name: str, storage_url: str | None, *, trial: int | None = None,
                   max_drop: float | None = None) -> str:
    """The command that writes a trial's artifact (password masked)."""
    which = f"--trial {trial}" if trial is not None else f"--max-drop {max_drop:g}"
    out = f"trial-{trial}.slim" if trial is not None else f"{study_name}.slim"
    storage = f" --storage {shlex.quote(mask_url(storage_url))}" if storage_url else ""
    return f"slimtune export --study {shlex.quote(study_name)}{storage} {which} --out {shlex.quote(out)}"


def _hover(trial: FrozenTrial, study_name: str, storage_url: str | None, metric: Metric) -> list[Any]:
    record = TrialRecord.of(trial)
    deploy = record.deploy
    deployed = (f"<br>integer ONNX {int(deploy['onnx_bytes']):,} B, {deploy['latency_ms']:.4f} ms at batch "
                f"{int(deploy.get('batch', 1))}" if "onnx_bytes" in deploy and "latency_ms" in deploy else "")
    return [record.number, metric.value(record.test_accuracy), record.compression_ratio, record.mean_bits,
            record.sparsity, deployed, export_command(study_name, storage_url, trial=record.number)]


def _hover_template(metric: Metric) -> str:
    number = ".2%" if metric.percent else ".4f"
    return (f"trial #%{{customdata[0]}}<br>val {metric.label} %{{y:{number}}}<br>test {metric.label} "
            f"%{{customdata[1]:{number}}}<br>size %{{x:,.0f}} B<br>ratio %{{customdata[2]:.1f}}×<br>mean bits "
            "%{customdata[3]:.2f}<br>sparsity %{customdata[4]:.1%}%{customdata[5]}<br><i>%{customdata[6]}</i>"
            "<extra></extra>")


def _accuracy_range(accuracies: list[float], teacher_val: float | None, floor: float | None,
                    fig: Any, metric: Metric) -> tuple[list[float] | None, str]:
    """The y range (in the metric's units; reversed for a metric that is minimized, so better is
    up) that shows the trials and the reference lines near them, drawing the floor when it is
    near; and a note when it is too far below to draw. The arguments are scores."""
    if teacher_val is not None:
        accuracies = accuracies + [teacher_val, teacher_val - max(DROPS)]
    if not accuracies:
        return None, ""
    low, high = min(accuracies), max(accuracies)
    span = max(high - low, 0.005)
    note = ""
    if floor is not None and floor >= low - span:  # near the trials: draw it and keep it in view
        low = min(low, floor)
        fig.add_hline(y=metric.value(floor), line=dict(color="#999", dash="dash", width=1),
                      annotation_text=f"{metric.label} floor {metric.format_score(floor)}",
                      annotation_position="bottom right", annotation_font=dict(size=11, color="#777"))
    elif floor is not None:  # far below: a line there would squash the trials into a strip
        note = f" ({metric.label} floor {metric.format_score(floor)}, below the plotted range)"
    pad = 0.08 * max(high - low, 0.005)
    return [metric.value(low - pad), metric.value(high + pad)], note


def _ratio_axis(fig: Any, sizes: list[float], dense: float, teacher_val: float) -> None:
    """A second x axis on top that reads the same positions as compression ratios (teacher fp32
    bytes / artifact bytes), on the same log range as the size axis."""
    import plotly.graph_objects as go

    low, high = math.log10(min(sizes) / 1.6), math.log10(max(sizes) * 1.6)
    ticks = [r for r in _RATIOS if low <= math.log10(dense / r) <= high]
    fig.add_trace(go.Scatter(x=[dense], y=[teacher_val], xaxis="x2", mode="markers", marker=dict(opacity=0),
                             hoverinfo="skip", showlegend=False, uid="ratio-axis"))
    fig.update_layout(
        xaxis=dict(range=[low, high]),
        xaxis2=dict(type="log", overlaying="x", side="top", range=[low, high], showgrid=False,
                    tickvals=[dense / r for r in ticks], ticktext=[f"{r:g}×" for r in ticks],
                    title=dict(text="compression ratio (teacher fp32 bytes / artifact bytes)", font=dict(size=12))))


def front_figure(study: optuna.Study, storage_url: str | None = None) -> Any:
    """Validation accuracy against the packed size (log axis), with the ratio on a top axis: the
    Pareto trials (trace ``"Pareto front"``) and their test accuracy, the other complete trials,
    the teacher, lines at its accuracy and 0.5 and 1 point under it, and the accuracy floor.
    Hovering a point shows its details and the command that exports it."""
    import plotly.graph_objects as go

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    front = pareto_trials(study)
    counts: Counter[str] = Counter(t.state.name for t in trials)
    teacher = study.user_attrs.get(keys.TEACHER) or {}
    teacher_val, dense = teacher.get("val_accuracy"), teacher.get("dense_bytes")
    floor = accuracy_floor(study)
    name = study.study_name
    metric = metric_of(study.user_attrs.get(keys.SPEC))
    value, hover = metric.value, _hover_template(metric)
    number = ".2%" if metric.percent else ".4f"

    fig = go.Figure()
    front_numbers = {t.number for t in front}
    others = [t for t in complete if t.number not in front_numbers]
    if others:  # an empty trace would draw no group in the SVG
        fig.add_trace(go.Scatter(
            name=f"other complete trials ({len(others)})", uid="others", x=[t.values[1] for t in others],
            y=[value(t.values[0]) for t in others],
            mode="markers", marker=dict(color=OTHER_COLOR, size=8, line=dict(color="#8a8a8a", width=0.5)),
            customdata=[_hover(t, name, storage_url, metric) for t in others], hovertemplate=hover))
    fig.add_trace(go.Scatter(
        name=PARETO_TRACE, uid=PARETO_UID, x=[t.values[1] for t in front], y=[value(t.values[0]) for t in front],
        mode="lines+markers", line=dict(color=FRONT_COLOR, shape="hv", width=1.5, dash="dot"),
        marker=dict(color=FRONT_COLOR, size=11, line=dict(color="white", width=1)),
        customdata=[_hover(t, name, storage_url, metric) for t in front], hovertemplate=hover))
    tested = [t for t in front if TrialRecord.of(t).test_accuracy is not None]
    if tested:
        fig.add_trace(go.Scatter(
            name=TEST_TRACE, uid="pareto-test", x=[t.values[1] for t in tested],
            y=[value(TrialRecord.of(t).test_accuracy) for t in tested], mode="markers",
            marker=dict(color=FRONT_COLOR, size=10, symbol="circle-open", line=dict(width=1.5)),
            customdata=[[t.number] for t in tested],
            hovertemplate=f"trial #%{{customdata[0]}}<br>test {metric.label} %{{y:{number}}}<br>size %{{x:,.0f}} B"
                          "<extra></extra>"))
    if dense and teacher_val is not None:
        fig.add_trace(go.Scatter(
            name="teacher (fp32, dense)", uid="teacher", x=[dense], y=[value(teacher_val)], mode="markers",
            marker=dict(symbol="star", size=16, color=TEACHER_COLOR, line=dict(color="white", width=1)),
            customdata=[[value(teacher.get("test_accuracy"))]],
            hovertemplate=f"teacher<br>val {metric.label} %{{y:{number}}}<br>test {metric.label} "
                          f"%{{customdata[0]:{number}}}<br>fp32 dense %{{x:,.0f}} B<extra></extra>"))
    if teacher_val is not None:
        fig.add_hline(y=value(teacher_val), line=dict(color=TEACHER_COLOR, width=1, dash="dot"),
                      annotation_text=f"teacher {metric.format(value(teacher_val))}", annotation_position="top left",
                      annotation_font=dict(size=11, color=TEACHER_COLOR))
        for drop in DROPS:
            fig.add_hline(y=value(teacher_val - drop), line=dict(color="#bbb", width=1, dash="dash"),
                          annotation_text=f"{'−' if metric.maximize else '+'}{metric.drop_text(drop)}",
                          annotation_position="top left",
                          annotation_font=dict(size=11, color="#888"))
    y_range, floor_note = _accuracy_range([t.values[0] for t in complete], teacher_val, floor, fig, metric)
    sizes = [t.values[1] for t in complete] + ([dense] if dense else [])
    if sizes and dense and teacher_val is not None:
        _ratio_axis(fig, sizes, float(dense), value(teacher_val))
    not_plotted = [f"{counts[s]} {s.lower()}" for s in ("PRUNED", "FAIL", "RUNNING", "WAITING") if counts.get(s)]
    title = f"{len(complete)} complete trials, {len(front)} on the Pareto front"
    if not_plotted:
        title += f"; not plotted (no size): {', '.join(not_plotted)}"
    fig.update_layout(
        title=dict(text=title + floor_note, font=dict(size=14), y=0.98, yanchor="top"), template="plotly_white",
        hovermode="closest", margin=dict(l=70, r=20, t=110, b=60),
        legend=dict(orientation="h", yanchor="bottom", y=-0.35, x=0),
        xaxis=dict(type="log", title=dict(text="size of the packed artifact (bytes, log scale)")),
        yaxis=dict(title=dict(text=f"{metric.label} (validation; open circles: test)"),
                   tickformat=".1%" if metric.percent else "", range=y_range))
    return fig


def layer_names(trials: Sequence[FrozenTrial]) -> list[str]:
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


def plans_figure(ordered: list[FrozenTrial]) -> tuple[Any, int]:
    """One heat map per declared panel (``slimtune.spaces.Panel``) over layers and Pareto trials; a
    panel ``only_if_used`` is drawn when some trial moved its knob off its neutral value."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = layer_names(ordered)
    rows = [f"#{t.number} · {human_bytes(t.values[1])}" for t in ordered]
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
