"""``slimtune report``: one self-contained HTML file, checked as text and in a real headless Chromium."""

from __future__ import annotations

import html
import re
from pathlib import Path

import optuna
import pytest

from slimtune.search import main
from slimtune.studies import mask_url, write_report

from .conftest import SPEC_TOML

CHROMIUM = "/usr/bin/chromium"  # Debian's package; CI installs it (.ci/run). No skip when missing: fail loudly.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A real 4-trial digits study in a temporary SQLite file (the URL and its folder)."""
    folder = tmp_path_factory.mktemp("report")
    spec = folder / "study.toml"
    spec.write_text(SPEC_TOML)
    url = f"sqlite:///{folder / 'studies.db'}"
    assert main(["search", str(spec), "--storage", url, "--quiet", "--trials", "4"]) == 0
    return url, folder


def test_report_is_self_contained(study_db: tuple[str, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = study_db
    out = tmp_path / "r.html"
    capsys.readouterr()
    assert main(["report", "--study", "digits-test", "--storage", url, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert str(out) in printed and f"{len(text.encode('utf-8')):,} bytes" in printed
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file is moved into place"

    sources = re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?([^\"' >]+)", text, re.I)
    assert not [s for s in sources if re.match(r"(https?:)?//", s)], f"remote resources: {sources}"
    assert text.count("<script") >= 2 and len(text) > 1_000_000  # plotly.js embedded once, plus the figures
    assert mask_url(url) in text and "digits-test" in text
    for div in ("pareto-front", "layer-heatmaps", "hypervolume"):
        assert f'id="{div}"' in text


def test_password_is_masked(study_db: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = study_db
    study = optuna.load_study(study_name="digits-test", storage=url)
    shown = "postgresql+psycopg://ann:s3cret@db.example/slim"
    size = write_report(study, shown, tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert size == len(text.encode("utf-8"))
    assert "s3cret" not in text and "postgresql+psycopg://ann:***@db.example/slim" in text


def test_report_renders_in_headless_chromium(study_db: tuple[str, Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url, _ = study_db
    out = tmp_path / "report.html"
    assert main(["report", "--study", "digits-test", "--storage", url, "--out", str(out)]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    expected = len(study.best_trials)
    assert expected >= 1

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            remote: list[str] = []
            errors: list[str] = []
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "blob:"))
                    else remote.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.as_uri())
            page.wait_for_selector("#pareto-front .main-svg", timeout=30_000)
            # newPlot draws the traces after the frame: wait for the front's trace group (class "trace" + uid)
            page.wait_for_selector("#pareto-front .scatterlayer .trace.tracepareto", state="attached", timeout=30_000)
            page.wait_for_selector("#layer-heatmaps .main-svg", timeout=30_000)
            in_data = page.evaluate(
                "document.getElementById('pareto-front').data.find(t => t.name === 'Pareto front').x.length")
            assert page.evaluate("document.getElementById('pareto-front').data.find(t => t.name === 'Pareto front')"
                                 ".uid") == "pareto"
            drawn = page.locator("#pareto-front .scatterlayer .trace.tracepareto path.point").count()
            legend = page.locator("#pareto-front .legendtext").all_text_contents()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert (in_data, drawn) == (expected, expected)
    assert "Pareto front" in legend
    assert not remote, f"the report fetched {remote}"
    assert not errors, errors
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 1280 and height > 1500  # the whole page, every section


def test_unknown_study_exits_2_and_writes_nothing(study_db: tuple[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = study_db
    out = tmp_path / "nope.html"
    assert main(["report", "--study", "digits-tset", "--storage", url, "--out", str(out)]) == 2
    assert "'digits-tset' does not exist" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())
    missing_db = f"sqlite:///{tmp_path / 'missing.db'}"
    assert main(["report", "--study", "digits-test", "--storage", missing_db, "--out", str(out)]) == 2
    assert not list(tmp_path.iterdir())


def test_default_out_is_named_after_the_study(study_db: tuple[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = study_db
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--study", "digits-test", "--storage", url]) == 0
    assert (tmp_path / "digits-test-report.html").stat().st_size > 1_000_000


def test_report_shows_every_trial_the_time_and_what_export_picks(study_db: tuple[str, Path], tmp_path: Path) -> None:
    """The all-trials table sorts on a click (in Chromium), the picks of ``export --max-drop`` are
    the trials export chooses, with the command, and the importances say their size scale."""
    from playwright.sync_api import sync_playwright

    from slimtune.spaces import SpecError
    from slimtune.studies import within_drop

    url, _ = study_db
    out = tmp_path / "report.html"
    assert main(["report", "--study", "digits-test", "--storage", url, "--out", str(out)]) == 0
    study = optuna.load_study(study_name="digits-test", storage=url)
    text = out.read_text(encoding="utf-8")
    for drop in (0.005, 0.01):
        command = f"--max-drop {drop:g} --out digits-test.slim"
        try:
            number = within_drop(study, drop).number
        except SpecError as exc:  # nothing that close to the teacher in 4 short trials: it says so
            assert html.escape(str(exc), quote=True) in text and command not in text
            continue
        assert f"trial <b>#{number}</b>" in text and command in text
    assert "s of trial time over" in text and "from the first start to the last end" in text
    assert "log10 scale" in text and "raw bytes" in text

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(out.as_uri())
            rows = page.locator("#trials-table tbody tr")
            assert rows.count() == len(study.trials)
            page.locator("#trials-table th", has_text="size (bytes)").click()
            sizes = [s for s in page.locator("#trials-table tbody tr td:nth-child(5)").evaluate_all(
                "cells => cells.map(c => c.getAttribute('data-key'))")]
            page.locator("#trials-table th", has_text="size (bytes)").click()
            descending = page.locator("#trials-table tbody tr td:nth-child(5)").evaluate_all(
                "cells => cells.map(c => c.getAttribute('data-key'))")
        finally:
            browser.close()
    known = [float(s) for s in sizes if s]
    assert known == sorted(known) and sizes[len(known):] == [""] * (len(sizes) - len(known))  # no size: last
    assert [float(s) for s in descending if s] == sorted(known, reverse=True)
