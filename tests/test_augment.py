"""Shifted training images (``finetune.augment_shift``): exact translations, seeded, reachable from a
spec, and applied to the fine-tunes that ``augment_in`` names and to no other."""

from __future__ import annotations

import pytest
import torch

from slimtune.spaces import CompressionPlan, LayerPlan, SpecError, Values, parse_spec, regular_sections
from slimtune.trainers import TrialContext, run_trial
from slimtune.trainers._augment import random_shift

from .conftest import digits_spec_dict


def test_each_image_is_an_exact_translation_within_the_bound() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, 2, 9, 7)
    shifted = random_shift(x, 2, torch.Generator().manual_seed(1))
    assert shifted.shape == x.shape
    seen = set()
    for image, moved in zip(x, shifted):
        canvas = torch.nn.functional.pad(image, (2, 2, 2, 2))
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(moved, canvas[:, 2 - dy:2 - dy + 9, 2 - dx:2 - dx + 7])]
        assert len(matches) == 1  # one offset explains the image, zeros where it moved in
        seen.add(matches[0])
    assert len(seen) > 10  # offsets are drawn per image, not once per batch


def test_shift_is_seeded_and_zero_is_the_identity() -> None:
    x = torch.rand(8, 1, 8, 8)
    first = random_shift(x, 1, torch.Generator().manual_seed(3))
    assert torch.equal(first, random_shift(x, 1, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, random_shift(x, 1, torch.Generator().manual_seed(4)))
    assert random_shift(x, 0, torch.Generator()) is x
    with pytest.raises(ValueError, match=r"finetune.augment_shift needs image batches .* \(8, 64\)"):
        random_shift(x.flatten(1), 1, torch.Generator())


def test_spec_checks_and_stores_the_setting() -> None:
    base = parse_spec(digits_spec_dict())
    data = digits_spec_dict()
    data["finetune"].update(augment_shift=1, augment_in="refine")
    spec = parse_spec(data)
    assert (spec.finetune.augment_shift, spec.finetune.augment_in) == (1, "refine")
    assert parse_spec(spec.to_dict()).finetune == spec.finetune and spec.fingerprint() != base.fingerprint()
    off = digits_spec_dict()
    off["finetune"].update(augment_shift=0, augment_in="refine")  # the defaults ("refine" since 0.2) written out
    assert parse_spec(off).fingerprint() == base.fingerprint()
    # the neutral values (no shift, in all fine-tunes) are left out of the fingerprint: old studies keep theirs
    neutral = digits_spec_dict()
    neutral["finetune"].update(augment_shift=0, augment_in="all")
    finetune = next(section for section in regular_sections() if section.name == "finetune")
    part = finetune.fingerprint_part(parse_spec(neutral).to_dict()["finetune"])
    assert "augment_shift" not in part and "augment_in" not in part
    for key, value, allowed in (("augment_shift", 9, "[0, 8]"), ("augment_shift", -1, "[0, 8]"),
                                ("augment_in", "promote", '"all", "refine"')):
        bad = digits_spec_dict()
        bad["finetune"][key] = value
        with pytest.raises(SpecError, match=f"finetune.{key}") as err:
            parse_spec(bad)
        assert allowed in str(err.value)


def test_trials_shift_only_in_the_fine_tunes_augment_in_names(digits_teacher) -> None:  # type: ignore[no-untyped-def]
    teacher, dm = digits_teacher
    results, contexts = {}, {}
    for label, settings in (("plain", {}), ("all", {"augment_shift": 1, "augment_in": "all"}),
                            ("refine", {"augment_shift": 1, "augment_in": "refine"})):
        data = digits_spec_dict()
        data["finetune"].update(settings)
        ctx = contexts[label] = TrialContext.create(parse_spec(data), teacher, datamodule=dm)
        plan = CompressionPlan({n: LayerPlan(prune_ratio=0.5, weight_bits=4, kd_temperature=2.0)
                                for n in ctx.layer_names}, kd_alpha=0.7, feature_kd_weight=0.5, lr=2e-3)
        results[label] = run_trial(ctx, plan, seed=0)
        results[label + "+refined"] = run_trial(ctx, plan, seed=0, promote=lambda a, s: True, extra_epochs=1)
    # "refine": a search trial trains exactly as without shifts, a refinement does not
    assert results["refine"].val_history == results["plain"].val_history
    assert results["refine"].artifact == results["plain"].artifact
    assert results["refine+refined"].val_history != results["plain+refined"].val_history
    # "all": every fine-tune shifts, and the same seed gives the same shifted run
    assert results["all"].val_history != results["plain"].val_history
    again = run_trial(contexts["all"], plan, seed=0)
    assert again.val_history == results["all"].val_history and again.artifact == results["all"].artifact
    assert all(r.size_bytes == len(r.artifact) for r in results.values())


def test_teacher_trains_on_shifted_images_when_its_spec_says_so() -> None:
    from slimtune.trainers import build_datamodule, build_model, evaluate, train_teacher

    base = parse_spec(digits_spec_dict())
    data = digits_spec_dict()
    data["teacher"].update(augment_shift=1, epochs=2)
    spec = parse_spec(data)
    assert spec.teacher.augment_shift == 1 and parse_spec(spec.to_dict()).teacher == spec.teacher
    # off by default, and left out of the fingerprint when off (the normalized spec now holds every default)
    teacher_section = next(section for section in regular_sections() if section.name == "teacher")
    assert base.teacher.augment_shift == 0 and base.to_dict()["teacher"]["augment_shift"] == 0
    assert "augment_shift" not in teacher_section.fingerprint_part(base.to_dict()["teacher"])
    data["teacher"]["augment_shift"] = 9
    with pytest.raises(SpecError, match="teacher.augment_shift"):
        parse_spec(data)
    dm = build_datamodule(spec.data)
    weights = {}
    for shift in (0, 1, 1):
        plain = Values("teacher", {"epochs": 2, "batch_size": spec.teacher.batch_size, "lr": spec.teacher.lr,
                                   "augment_shift": shift})
        model = train_teacher(build_model(spec.model), dm, plain, seed=0)
        weights.setdefault(shift, []).append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert evaluate(model, dm.val_dataloader()) > 0.5
    assert torch.equal(weights[1][0], weights[1][1])  # seeded
    assert not torch.equal(weights[0][0], weights[1][0])  # the shifts changed the training


def test_shift_reference_benchmark_reads_a_real_study_and_refuses_bad_input(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys
    from pathlib import Path

    from slimtune.search import main

    from .conftest import SPEC_TOML

    script = Path(__file__).parents[1] / "benchmarks" / "shift_reference.py"
    url = f"sqlite:///{tmp_path / 'st.db'}"
    out = tmp_path / "ref.json"

    def refused(args: list[str], message: str) -> None:
        done = subprocess.run([sys.executable, str(script), "--storage", url, "--out", str(out), "--no-results-md", *args],
                              capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not out.exists()

    refused(["--study", "digits-test", "--epochs", "0"], "--epochs '0'")
    refused(["--study", "digits-test", "--shift", "9"], "--shift 9")
    refused(["--study", "digits-test"], "st.db does not exist")
    assert not (tmp_path / "st.db").exists()
    spec_file = tmp_path / "spec.toml"
    spec_file.write_text(SPEC_TOML)
    assert main(["search", str(spec_file), "--storage", url, "--trials", "2", "--quiet"]) == 0
    refused(["--study", "nope"], "nope")
    done = subprocess.run([sys.executable, str(script), "--storage", url, "--study", "digits-test", "--epochs", "1",
                           "--out", str(out), "--no-results-md"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["teacher"] for r in rows] == ["the study's own (8 epochs, no shifts)", "shifted by up to 1 px, 1 epochs"]
    assert all(0 <= r["test_error"] <= 1 for r in rows) and rows[1]["test_error"] != rows[0]["test_error"]
