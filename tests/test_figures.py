"""slimtune's own figures of a study: the front as people read it, in the report and on the
optuna-dashboard page (refreshed as trials finish), checked as data and in headless Chromium."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from slimtune.search._runner import LiveFigures
from slimtune.studies import FRONT_PLOT_ID, PLANS_PLOT_ID, front_figure, keys, pareto_trials, publish_figures

from .conftest import copy_database
from .test_report import CHROMIUM, CHROMIUM_ARGS

STUDY = "digits-test"
PLOT_PREFIX = "dashboard:plot_data:"  # optuna-dashboard's study system attrs for custom plots
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _plot(study: optuna.Study, plot_id: str) -> dict | None:
    """A custom plot as optuna-dashboard stores it (its JSON in numbered chunks), or ``None``."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    prefix = f"{PLOT_PREFIX}{plot_id}:"
    chunks = {k: v for k, v in attrs.items() if k.startswith(prefix)}
    if not chunks:
        return None
    return json.loads("".join(chunks[f"{prefix}{i}"] for i in range(len(chunks))))


def _trace(plot: dict, name: str) -> dict:
    return next(t for t in plot["data"] if t.get("name") == name)


def _scripted_study(storage: str) -> optuna.Study:
    """A study shaped like slimtune's: a teacher record and trials with their record attrs."""
    study = optuna.create_study(study_name="scripted", storage=storage, directions=keys.DIRECTIONS)
    study.set_user_attr(keys.TEACHER, {"val_accuracy": 0.98, "test_accuracy": 0.979, "dense_bytes": 100_000})
    study.set_user_attr(keys.SPEC, {"study": {"name": "scripted", "max_accuracy_drop": 0.02}})
    return study


def _add(study: optuna.Study, val: float, size: float) -> optuna.trial.FrozenTrial:
    trial = study.ask()
    trial.set_user_attr(keys.TRIAL_TEST_ACCURACY, val - 0.001)
    trial.set_user_attr(keys.TRIAL_RATIO, 100_000 / size)
    study.tell(trial, [val, size])
    return study.trials[-1]


def test_the_front_reads_as_people_read_it() -> None:
    study = _scripted_study("sqlite:///:memory:")
    for val, size in ((0.975, 2_000), (0.97, 3_000), (0.979, 8_000), (0.96, 1_000)):
        _add(study, val, size)
    fig = json.loads(front_figure(study, "postgresql+psycopg://ann:s3cret@db/x").to_json())
    front = _trace(fig, "Pareto front")
    assert front["x"] == [1_000, 2_000, 8_000]  # smallest first; 3 000 B at 97 % is beaten by 2 000 B at 97.5 %
    assert _trace(fig, "test accuracy of the Pareto trials")["y"] == pytest.approx([0.959, 0.974, 0.978])
    assert fig["layout"]["xaxis"]["type"] == "log"
    ratio_axis = fig["layout"]["xaxis2"]
    assert ratio_axis["overlaying"] == "x" and ratio_axis["range"] == fig["layout"]["xaxis"]["range"]
    assert ratio_axis["ticktext"][:3] == ["1×", "2×", "5×"] and ratio_axis["tickvals"][0] == 100_000
    lines = sorted(shape["y0"] for shape in fig["layout"]["shapes"])
    assert lines == pytest.approx([0.96, 0.97, 0.975, 0.98])  # the floor, −1 pt, −0.5 pt, the teacher
    command = front["customdata"][0][-1]
    assert command == ("slimtune export --study scripted --storage 'postgresql+psycopg://ann:***@db/x' --trial 3 "
                       "--out trial-3.slim")


def test_live_figures_follow_the_study_every_few_finished_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = _scripted_study(url)
    live = LiveFigures(url, every=2, log=print)
    live.publish(study)  # the start of a run: the teacher, no trials
    assert _trace(_plot(study, FRONT_PLOT_ID), "Pareto front")["x"] == []
    live(study, _add(study, 0.97, 3_000))  # 1 finished: not yet
    assert _trace(_plot(study, FRONT_PLOT_ID), "Pareto front")["x"] == []
    live(study, _add(study, 0.975, 2_000))  # 2 finished: refreshed
    assert _trace(_plot(study, FRONT_PLOT_ID), "Pareto front")["x"] == [2_000]
    live(study, _add(study, 0.96, 1_000))
    live(study, _add(study, 0.979, 8_000))
    assert _trace(_plot(study, FRONT_PLOT_ID), "Pareto front")["x"] == [1_000, 2_000, 8_000]
    assert live.refreshes == 3 and live.seconds > 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(proc: subprocess.Popen, port: int, out: Path, err: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, err.read_text()
        try:
            if f"http://127.0.0.1:{port}/dashboard" in out.read_text():
                with _OPENER.open(f"http://127.0.0.1:{port}/api/studies", timeout=10):
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.2)


def test_the_dashboard_shows_the_front_a_search_wrote_and_cannot_delete_it(digits_study_db: Path,
                                                                           tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    db = copy_database(digits_study_db, tmp_path / "studies.db")
    url = f"sqlite:///{db}"
    study = optuna.load_study(study_name=STUDY, storage=url)
    expected = len(study.best_trials)
    assert expected >= 1 and expected == len(pareto_trials(study))
    assert _plot(study, FRONT_PLOT_ID) is not None and _plot(study, PLANS_PLOT_ID) is not None  # the search's
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    port = _free_port()
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "slimtune", "dashboard", "--storage", url, "--port", str(port)],
                                stdout=stdout, stderr=stderr, cwd=tmp_path)
    front_div = f"[id='user-defined-plot:{FRONT_PLOT_ID}']"
    try:
        _wait_until_serving(proc, port, out, err)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1400})
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"http://127.0.0.1:{port}/dashboard/studies/{study._study_id}")
                # the dashboard drops trace uids: find the front's SVG group by the trace bound to it
                drawn_js = (f"() => Array.from(document.querySelectorAll(\"{front_div} .scatterlayer .trace\"))"
                            ".filter(g => g.__data__ && g.__data__[0].trace.name === 'Pareto front')"
                            ".map(g => g.querySelectorAll('path.point').length)[0]")
                page.wait_for_function(drawn_js, timeout=60_000)
                page.wait_for_selector(f"[id='user-defined-plot:{PLANS_PLOT_ID}'] .main-svg", timeout=60_000)
                drawn = page.evaluate(drawn_js)
                in_data = page.evaluate(f"document.getElementById('user-defined-plot:{FRONT_PLOT_ID}').data"
                                        ".find(t => t.name === 'Pareto front').x.length")
                axes = page.locator(f"{front_div} .xtitle, {front_div} .x2title").all_text_contents()
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                status = page.evaluate("async id => (await fetch(`/api/studies/${id}`, {method: 'DELETE'})).status",
                                       study._study_id)
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (drawn, in_data) == (expected, expected)
    assert any("log scale" in a for a in axes) and any("compression ratio" in a for a in axes), axes
    assert status == 403
    assert optuna.get_all_study_names(url) == [STUDY]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert not errors, errors
    assert (tmp_path / "dashboard.png").stat().st_size > 20_000


def test_publishing_replaces_the_plots_in_place(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = _scripted_study(url)
    for val, size in ((0.975, 2_000), (0.97, 3_000)):
        _add(study, val, size)
    assert publish_figures(study, url) == [FRONT_PLOT_ID]  # no per-layer plans recorded: no plans plot
    chunks = [k for k in study._storage.get_study_system_attrs(study._study_id) if k.startswith(PLOT_PREFIX)]
    publish_figures(study, url)
    again = [k for k in study._storage.get_study_system_attrs(study._study_id) if k.startswith(PLOT_PREFIX)]
    assert sorted(again) == sorted(chunks)


def test_the_report_names_the_trial_export_picks_and_its_command() -> None:
    from slimtune.studies._report import render_report

    study = _scripted_study("sqlite:///:memory:")
    for val, size in ((0.977, 2_000), (0.971, 1_500), (0.979, 8_000)):
        _add(study, val, size)
    text = render_report(study, "sqlite:///s.db")
    assert ("trial <b>#0</b>: val 97.70%, test 97.60%, 2,000 bytes, 50.0×<br><code>slimtune export --study scripted "
            "--storage sqlite:///s.db --max-drop 0.005 --out scripted.slim</code>") in text
    assert "trial <b>#1</b>: val 97.10%" in text and "--max-drop 0.01 --out scripted.slim" in text
