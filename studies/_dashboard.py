"""optuna-dashboard on a slimtune study database: a study note per study, and the server.

:func:`annotate_studies` writes, for every slimtune study (one with a stored spec), a study
note that the dashboard shows on the study's page: the teacher's accuracy and size, a short
summary of the spec, and how to read the two objectives. A note is rewritten only when its
text changes, and never over a note that someone edited in the dashboard.
:func:`serve_dashboard` serves the dashboard until Ctrl-C (or SIGTERM), read-only unless told
otherwise (then it refreshes the notes first). The search writes its own study's note
(:func:`annotate_study`), so that a read-only dashboard shows it.

Example:
    >>> import optuna
    >>> from slimtune.spaces import parse_spec
    >>> storage = optuna.storages.InMemoryStorage()
    >>> study = optuna.create_study(storage=storage, study_name="demo", directions=keys.DIRECTIONS)
    >>> study.set_user_attr(keys.SPEC, parse_spec({"study": {"name": "demo"}, "model": {"preset": "cnn-digits"},
    ...                                            "data": {"preset": "digits"}}).to_dict())
    >>> annotate_studies(storage), annotate_studies(storage)
    ({'demo': 'written'}, {'demo': 'unchanged'})
    >>> print(study_note(study).splitlines()[0])
    ## slimtune study `demo`
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import signal
import socket
import sys
import threading
import warnings
from types import FrameType, ModuleType
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

import optuna
import sqlalchemy

from slimtune.spaces import Metric, SpecError, metric_of, parse_spec, per_layer_knobs, upgrade_stored_spec

from . import _keys as keys
from ._figures import front_figure, layer_names, plans_figure
from ._selection import pareto_trials
from ._storage import mask_url, open_storage

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
# Study system attr: hash of the note text slimtune wrote last, so a note edited in the dashboard is kept.
NOTE_HASH_ATTR = "slimtune:dashboard_note_sha256"
STATUSES = ("written", "unchanged", "kept")
# Ids of slimtune's custom plots on a study's dashboard page (replaced in place at each refresh).
FRONT_PLOT_ID = "slimtune-front"
PLANS_PLOT_ID = "slimtune-plans"


def _dashboard() -> ModuleType:
    try:
        import optuna_dashboard
    except ImportError:
        raise SpecError("dashboard", "optuna-dashboard", "pip install optuna-dashboard", "is not installed") from None
    return optuna_dashboard


def _ref(section: dict[str, Any], name_key: str) -> str:
    if section.get("given"):
        return f"`{section['given']}` (given to slimtune.search as a Python object)"
    if section.get("preset"):
        text = f"preset `{section['preset']}`"
    else:
        text = f"`{section.get(name_key)}`"
    if section.get("kwargs"):
        text += " with " + ", ".join(f"{k}={v!r}" for k, v in section["kwargs"].items())
    if section.get("checkpoint"):
        text += f", checkpoint `{section['checkpoint']}`"
    return text


def _spec_lines(raw: dict[str, Any]) -> list[str]:
    try:
        spec = parse_spec(upgrade_stored_spec(raw))
    except SpecError as exc:  # a spec stored by another slimtune version: show what is there
        return [f"- stored spec cannot be read by this slimtune ({exc})"]
    space = spec.space
    layer_knobs = {k.name for k in per_layer_knobs()}
    per_layer = [f"`{n}` {k.describe()}" for n, k in space.knobs.items() if n in layer_knobs]
    global_ = [f"`{n}` {k.describe()}" for n, k in space.knobs.items() if n not in layer_knobs]
    lines = [
        f"- model: {_ref(raw.get('model', {}), 'factory')}; data: {_ref(raw.get('data', {}), 'module')}",
        f"- sampler `{spec.search.sampler}`, seed {spec.seed}, target {spec.trials} finished trials",
        f"- floor: `max_accuracy_drop` = {spec.max_accuracy_drop:g}"
        + (f"; feasible: `feasible_drop` = {spec.feasible_drop:g} (trials further below the teacher "
           "are off the Pareto front)" if spec.feasible_drop is not None else ""),
        f"- fine-tune: {spec.finetune.epochs} epoch(s), batch size {spec.finetune.batch_size}",
        f"- layers: {', '.join(f'`{p}`' for p in space.layers)}"
        + (f", excluding {', '.join(f'`{p}`' for p in space.exclude)}" if space.exclude else ""),
        f"- per layer: {'; '.join(per_layer)}",
        f"- global: {'; '.join(global_)}",
    ]
    for pattern, fixed in space.overrides.items():
        lines.append(f"- layers `{pattern}`: " + ", ".join(f"`{k}` fixed {v}" for k, v in fixed.items()))
    return lines


def _shown(metric: Metric, score: Any) -> str:
    """A stored score as the metric reads (``97.31%``, ``0.2500``); ``?`` when it is not a number."""
    if not isinstance(score, (int, float)) or isinstance(score, bool):
        return "?"
    return metric.format_score(float(score))


def study_note(study: optuna.Study) -> str | None:
    """The Markdown note slimtune keeps on a study; ``None`` for a study that is not slimtune's."""
    attrs = study.user_attrs
    raw = attrs.get(keys.SPEC)
    if not isinstance(raw, dict):
        return None
    teacher = attrs.get(keys.TEACHER) or {}
    drop = raw.get("study", {}).get("max_accuracy_drop")
    metric = metric_of(raw)
    objective = (f"`{metric.objective_name}` ↑ (maximize): validation {metric.label} of the compressed, "
                 "fine-tuned student" if metric.maximize else
                 f"`{metric.objective_name}` ↑ (maximize): minus the validation {metric.label} of the compressed, "
                 f"fine-tuned student (the {metric.label} itself is minimized)")
    lines = [
        f"## slimtune study `{study.study_name}`",
        "",
        f"**Objectives.** {objective}, read back from its packed artifact; selection uses it. `size_bytes` ↓ (minimize): the "
        "byte length of the packed artifact that `slimtune export` writes (run-length index of the kept "
        "weights, their integer codes, float16 scales, LZMA2), not a formula. Trial user attrs carry `test_accuracy` (reporting only), "
        "`compression_ratio` (teacher fp32 dense bytes / `size_bytes`), `mean_bits`, `sparsity`, the "
        "per-layer `plan` and `stop_reason` / `fail_reason`.",
        "",
        "### Teacher",
        "",
    ]
    if teacher:
        dense = teacher.get("dense_bytes")
        lines += [
            f"| val {metric.label} | test {metric.label} | fp32 dense bytes | source |",
            "|---|---|---|---|",
            f"| {_shown(metric, teacher.get('val_accuracy'))} | {_shown(metric, teacher.get('test_accuracy'))} | "
            f"{f'{dense:,}' if isinstance(dense, int) else '?'} | {teacher.get('source', '?')} |",
        ]
        if isinstance(teacher.get("val_accuracy"), (int, float)) and isinstance(drop, (int, float)):
            lines += ["", f"{metric.label[0].upper()}{metric.label[1:]} floor: a trial "
                          f"{'below' if metric.maximize else 'above'} {_shown(metric, teacher['val_accuracy'] - drop)} "
                          f"validation {metric.label} after an epoch is stopped and marked PRUNED."]
    else:
        lines.append("Not trained yet (the first trial of a search trains or loads it).")
    lines += ["", "### Spec", ""] + _spec_lines(raw)
    lines += ["", f"_Written by `slimtune dashboard`; spec fingerprint `{attrs.get(keys.FINGERPRINT, '?')}`._"]
    return "\n".join(lines) + "\n"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def annotate_study(storage: optuna.storages.BaseStorage, study_name: str) -> str | None:
    """Write or refresh the dashboard note of one study; its status (see :func:`annotate_studies`),
    or ``None`` for a study that is not slimtune's."""
    dashboard = _dashboard()
    study = optuna.load_study(study_name=study_name, storage=storage)
    text = study_note(study)
    if text is None:
        return None
    study_id = storage.get_study_id_from_name(study_name)
    system_attrs = storage.get_study_system_attrs(study_id)
    current = dashboard.get_note(study)
    if current == text:
        status = "unchanged"
    elif current and _sha(current) != system_attrs.get(NOTE_HASH_ATTR):
        status = "kept"
    else:
        dashboard.save_note(study, text)
        storage.set_study_system_attr(study_id, NOTE_HASH_ATTR, _sha(text))
        status = "written"
    if study.metric_names is None and len(study.directions) == len(keys.METRIC_NAMES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(keys.METRIC_NAMES)
    return status


def publish_figures(study: optuna.Study, storage_url: str | None = None) -> list[str]:
    """Attach slimtune's Pareto front and the per-layer plans of its Pareto trials to ``study`` as
    optuna-dashboard custom plots (``save_plotly_graph_object``), replacing the previous ones;
    the ids written. ``storage_url`` goes into the export commands that the points show.

    Example:
        >>> study = optuna.create_study(directions=keys.DIRECTIONS)
        >>> _ = study.tell(study.ask(), [0.9, 1000.0])
        >>> publish_figures(study)
        ['slimtune-front']
    """
    dashboard = _dashboard()
    front = front_figure(study, storage_url)  # no height: the page's plot box is 450 px high
    front.update_layout(margin=dict(t=100, b=50), legend=dict(orientation="v", x=0.99, xanchor="right", y=0.02,
                                                              yanchor="bottom", bgcolor="rgba(255,255,255,0.85)"))
    written = [dashboard.save_plotly_graph_object(study, front, graph_object_id=FRONT_PLOT_ID)]
    pareto = pareto_trials(study)
    if pareto and layer_names(pareto):
        plans, _ = plans_figure(pareto)
        plans.update_layout(height=None, title=dict(text="per-layer plans of the Pareto trials, smallest first",
                                                    font=dict(size=14)), margin=dict(t=80))
        written.append(dashboard.save_plotly_graph_object(study, plans, graph_object_id=PLANS_PLOT_ID))
    return written


def annotate_studies(storage: optuna.storages.BaseStorage) -> dict[str, str]:
    """Write or refresh the dashboard note of every slimtune study in ``storage``.

    Returns ``{study name: status}`` for the slimtune studies, status one of :data:`STATUSES`:
    ``written`` (new or changed text), ``unchanged`` (nothing written), ``kept`` (the note was
    edited in the dashboard since slimtune wrote it; it is left as it is). Other studies are
    skipped. A slimtune study without metric names gets ``val_accuracy`` / ``size_bytes``.
    The search calls :func:`annotate_study` on its own study, so a read-only dashboard shows notes too.
    """
    statuses: dict[str, str] = {}
    for frozen in storage.get_all_studies():
        if keys.SPEC not in frozen.user_attrs:
            continue
        status = annotate_study(storage, frozen.study_name)
        if status is not None:
            statuses[frozen.study_name] = status
    return statuses


_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def read_only_app(app: Any) -> Any:
    """A WSGI wrapper refusing every request that could change a study (anything but GET, HEAD,
    OPTIONS) with ``403`` and a line saying how to allow it: the dashboard's create, delete and edit
    buttons then do nothing to the database."""
    body = b"slimtune dashboard is read-only: restart it with --allow-write to create, edit or delete studies\n"

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD", "GET").upper() in _SAFE_METHODS:
            return app(environ, start_response)
        start_response("403 Forbidden", [("Content-Type", "text/plain; charset=utf-8"),
                                          ("Content-Length", str(len(body)))])
        return [body]

    return guarded


def _check_port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SpecError("--port", port, "an integer port in 1..65535")
    return port


def _make_server(host: str, port: int, app: Any) -> WSGIServer:
    """Bind ``host:port`` (before anything is written) or raise a :class:`SpecError` saying why."""

    class Server(WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as optuna-dashboard's bottle does

    try:
        return make_server(host, port, app, server_class=Server)
    except (OSError, UnicodeError) as exc:
        raise _bind_error(host, port, exc) from None


def _bind_error(host: str, port: int, exc: Exception) -> SpecError:
    if isinstance(exc, (socket.gaierror, UnicodeError)):
        return SpecError("--host", host, "an address of this machine such as 127.0.0.1 (the default), ::1 or "
                         "0.0.0.0", "cannot be resolved")
    code = getattr(exc, "errno", None)
    if code == errno.EADDRINUSE:
        return SpecError("--port", port, "a free port, e.g. --port 8081", f"is in use on {host}")
    if code == errno.EACCES:
        return SpecError("--port", port, "a port of 1024 or more (lower ones need privileges)", "is not permitted")
    if code == errno.EADDRNOTAVAIL:
        return SpecError("--host", host, "an address of this machine such as 127.0.0.1", "is not an address here")
    return SpecError("--port", port, "a free port on an address of this machine",
                     f"cannot be served on {host} ({getattr(exc, 'strerror', None) or exc})")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve_until_signal(server: WSGIServer) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM. The first signal lets the request in progress finish
    and stops the loop (``shutdown`` from a helper thread: raising inside a request would be
    swallowed by wsgiref); a second one raises ``KeyboardInterrupt`` at once. SIGINT is handled
    explicitly because a process started in the background inherits it ignored."""
    if threading.current_thread() is not threading.main_thread():
        server.serve_forever()
        return
    stopping = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()
        threading.Thread(target=server.shutdown, name="slimtune-dashboard-stop", daemon=True).start()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_dashboard(storage_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                    allow_write: bool = False) -> None:
    """Serve optuna-dashboard on the studies at ``storage_url``.

    Read-only unless ``allow_write``: the database is opened read-only (see
    ``open_storage(read_only=True)``) and the page cannot create, edit or delete studies
    (:func:`read_only_app`); notes are what the searches wrote. With ``allow_write`` the page may
    change studies, and slimtune first refreshes every study's note (:func:`annotate_studies`).

    Blocks until Ctrl-C or SIGTERM, then returns. A missing SQLite file, an unreachable database,
    a port in use or an address that is not this machine's raise :class:`SpecError` (the CLI
    exits 2) before anything is written. Binds to loopback unless ``host`` says otherwise. The
    app is ``optuna_dashboard.wsgi(storage)`` on wsgiref, as ``optuna_dashboard.run_server`` runs it.
    """
    port = _check_port(port)
    if not isinstance(host, str) or not host:
        raise SpecError("--host", host, "an address of this machine such as 127.0.0.1")
    dashboard = _dashboard()
    storage = open_storage(storage_url, read_only=not allow_write, create=False)
    app = dashboard.wsgi(storage)
    server = _make_server(host, port, app if allow_write else read_only_app(app))
    try:
        where = mask_url(storage_url)
        if allow_write:
            statuses: dict[str, str] | None
            try:
                statuses = annotate_studies(storage)
            except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as exc:
                print(f"warning: study notes not written ({type(exc).__name__}); serving the studies as they are",
                      file=sys.stderr)
                statuses = None
            for name in statuses or {}:  # studies of older releases get their plots too
                try:
                    publish_figures(optuna.load_study(study_name=name, storage=storage), storage_url)
                except Exception as exc:  # a view: the dashboard serves without it
                    print(f"warning: no plots written for study {name} ({type(exc).__name__}: {str(exc)[:200]})",
                          file=sys.stderr)
            if statuses:
                notes = ", ".join(f"{name} ({status})" for name, status in statuses.items())
                print(f"study notes: {notes}", file=sys.stderr)
            elif statuses is not None:
                print(f"no slimtune studies in {where} yet; the dashboard shows them as searches create them",
                      file=sys.stderr)
            print("serving with --allow-write: the page can create, edit and delete studies", file=sys.stderr)
        else:
            print("serving read-only: the page cannot create, edit or delete studies (restart with --allow-write "
                  "to let it)", file=sys.stderr)
        if not _is_loopback(host):
            what = "read, edit and delete" if allow_write else "read"
            print(f"warning: serving on {host}: anyone who reaches it can {what} the studies "
                  "(optuna-dashboard has no login)", file=sys.stderr)
        shown = f"[{host}]" if ":" in host else host
        print(f"optuna-dashboard for {where}: http://{shown}:{port}/dashboard  (Ctrl-C to stop)", flush=True)
        _serve_until_signal(server)
    finally:
        server.server_close()
    print("dashboard stopped", file=sys.stderr)
