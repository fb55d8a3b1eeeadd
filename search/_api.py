"""The Python API on objects: compress the model you hold, with the data module you have.

``slimtune.search(model, datamodule, study=..., ...)`` runs a search in this process and returns
a :class:`Study`; the model's current weights are the teacher (never trained again), and the
caller's model object is never changed. ``slimtune.load_study(name, storage)`` reopens one.

What other processes can do with such a study: ``studies``, ``pareto``, ``report``,
``dashboard`` and ``export`` (without ONNX) need nothing but the database. ``resume``,
``worker``, ``export --onnx`` and ``evaluate`` must build the model (and the data): they can
when the search was given ``factory="module:callable"`` (and ``data_module="module:Class"``)
importable there; otherwise they exit 2 saying to continue from Python, where
``slimtune.search`` with the same objects and study name joins the study.

Example::

    import slimtune
    study = slimtune.search(net, datamodule, study="my-net", storage="sqlite:///s.db", trials=40,
                            space={"weight_bits": {"choices": [2, 4, 8]}}, finetune={"epochs": 2})
    study.pareto()                       # the Pareto front, a DataFrame
    small, record = study.best(max_drop=0.005)
    study.export("my-net.slim", max_drop=0.005)
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from slimtune.spaces import DEFAULT_STORAGE, SpecError, parse_spec
from slimtune.studies import (
    TrialRecord, get_blob, is_in_memory, keys, load_existing_study, pareto_frame, study_metric, trials_frame,
    within_drop, write_report,
)
from slimtune.trainers import load_artifact

from ._cmd_export import _output_path, _staged, require_onnx_extra, write_onnx
from ._runner import SearchSummary, run_study
from ._signals import SearchFailed

# Spec sections a keyword argument may give (``finetune={"epochs": 2}``), and study keys.
SECTIONS = ("objective", "teacher", "finetune", "method", "search", "runtime")
STUDY_KEYS = ("seed", "max_accuracy_drop", "feasible_drop", "goal_drop")


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s tables merged in, key by key (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def spec_for_objects(model: torch.nn.Module, datamodule: Any, *, study: str, storage: str | None = None,
                     trials: int | None = None, space: Mapping[str, Any] | None = None,
                     spec: Mapping[str, Any] | None = None, factory: str | None = None,
                     factory_kwargs: Mapping[str, Any] | None = None, data_module: str | None = None,
                     data_kwargs: Mapping[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
    """The spec (plain data) that :func:`search` runs: ``spec``'s tables, then the keyword
    arguments; the model and the data as objects (``given``) or as the references given.

    >>> import torch
    >>> from slimtune.trainers import DigitsDataModule
    >>> data = spec_for_objects(torch.nn.Linear(2, 2), DigitsDataModule(), study="s", trials=3,
    ...                         finetune={"epochs": 1})
    >>> data["model"], data["study"]["trials"], data["finetune"]
    ({'given': 'torch.nn.modules.linear:Linear'}, 3, {'epochs': 1})
    """
    unknown = sorted(set(settings) - set(SECTIONS) - set(STUDY_KEYS))
    if unknown:
        raise SpecError(f"slimtune.search({unknown[0]}=...)", settings[unknown[0]],
                        f"keyword arguments {sorted(SECTIONS + STUDY_KEYS)} (or a spec= dict)",
                        "is not a known setting")
    if not isinstance(model, torch.nn.Module):
        raise SpecError("model", type(model).__name__, "an nn.Module (or a LightningModule) whose forward gives logits",
                        "is not a torch module")
    data = _merge({}, spec or {})
    given = {"storage": storage, "trials": trials, **{k: settings[k] for k in STUDY_KEYS if k in settings}}
    data = _merge(data, {"study": {"name": study, **{k: v for k, v in given.items() if v is not None}}})
    for section in SECTIONS:
        if section in settings:
            data = _merge(data, {section: settings[section]})
    if space is not None:
        data["space"] = dict(space)
    data["model"] = ({"factory": factory, "kwargs": dict(factory_kwargs or {})} if factory
                     else {"given": _qualname(model)})
    data["data"] = ({"module": data_module, "kwargs": dict(data_kwargs or {})} if data_module
                    else {"given": _qualname(datamodule)})
    return data


class Study:
    """A slimtune study, read from its database; the model it was searched from, when this
    process holds it (``template``), rebuilds the compressed models.

    ``pareto()`` and ``trials()`` are DataFrames as ``slimtune pareto`` prints them;
    ``best(max_drop)`` is the model ``export --max-drop`` would pick, with its record;
    ``export(path)`` writes its artifact; ``report(path)`` the HTML report.
    """

    def __init__(self, name: str, storage: str = DEFAULT_STORAGE, template: torch.nn.Module | None = None,
                 summary: SearchSummary | None = None, datamodule: Any = None) -> None:
        self.name, self.storage, self.summary = name, storage, summary
        self._template, self._datamodule = template, datamodule
        load_existing_study(name, storage)  # an unknown study or database is a SpecError here

    def __repr__(self) -> str:
        return f"Study({self.name!r}, {self.storage!r})"

    @property
    def optuna_study(self) -> optuna.Study:
        """The Optuna study itself (opened read-only)."""
        return load_existing_study(self.name, self.storage)

    def pareto(self) -> pd.DataFrame:
        """The Pareto-optimal trials, smallest first (``slimtune pareto``)."""
        return pareto_frame(self.optuna_study)

    def trials(self) -> pd.DataFrame:
        """Every trial, one row each."""
        return trials_frame(self.optuna_study)

    def _pick(self, trial: int | None, max_drop: float | None) -> optuna.trial.FrozenTrial:
        study = self.optuna_study
        if trial is None:
            return within_drop(study, 0.005 if max_drop is None else max_drop)
        chosen = [t for t in study.get_trials(deepcopy=False) if t.number == trial]
        if not chosen or not TrialRecord.of(chosen[0]).size_bytes:
            raise SpecError("trial", trial, "the number of a complete trial of study " + self.name)
        return chosen[0]

    def _artifact(self, trial: optuna.trial.FrozenTrial) -> bytes:
        blob = get_blob(self.optuna_study._storage, self.name, keys.artifact_blob_key(trial.number))
        if blob is None:
            raise SpecError("trial", trial.number, "a trial whose artifact is stored", "has no stored artifact")
        return blob

    def _need_given(self, section: str, keyword: str, what: str) -> None:
        held = self._template if section == "model" else self._datamodule
        if held is None and "given" in (self.optuna_study.user_attrs.get(keys.SPEC) or {}).get(section, {}):
            raise SpecError(section, None, f"slimtune.load_study({self.name!r}, storage, {keyword}=...) with the {what} "
                            "the study was searched from", f"is needed: the study's {section} was given as a Python object")

    def best(self, max_drop: float = 0.005, *, trial: int | None = None) -> tuple[torch.nn.Module, TrialRecord]:
        """The smallest Pareto trial within ``max_drop`` of the teacher's validation accuracy (or
        trial number ``trial``): its compressed model as stored (dequantized, in eval mode) and
        its record."""
        chosen = self._pick(trial, max_drop)
        self._need_given("model", "model", "model")
        model, _ = load_artifact(self._artifact(chosen), f"the stored artifact of trial {chosen.number} of study "
                                 f"{self.name}", template=self._template)
        return model, TrialRecord.of(chosen)

    def export(self, path: str | os.PathLike[str], *, max_drop: float | None = None, trial: int | None = None,
               onnx: str | os.PathLike[str] | None = None, onnx_float: str | os.PathLike[str] | None = None) -> Path:
        """Write the artifact of the trial :meth:`best` picks (the bytes its size counts); ``onnx``:
        also its integer ONNX, ``onnx_float``: its float ONNX (each checked in onnxruntime against
        the trial's recorded validation score, as ``slimtune export --onnx``)."""
        chosen = self._pick(trial, max_drop)
        out = _output_path(os.fspath(path), "path")
        onnx_outputs = [(option, _output_path(os.fspath(target), option), option == "onnx")
                        for option, target in (("onnx", onnx), ("onnx_float", onnx_float)) if target is not None]
        if onnx_outputs:
            self._need_given("model", "model", "model")
            self._need_given("data", "datamodule", "data module")
        blob = self._artifact(chosen)
        name = f"the stored artifact of trial {chosen.number} of study {self.name}"
        with contextlib.ExitStack() as stack:  # never half written
            for option, target, integer in onnx_outputs:
                require_onnx_extra(option, os.fspath(target))
                write_onnx(blob, stack.enter_context(_staged(target)), name, chosen.values[0],
                           study_metric(self.optuna_study), integer=integer, option=option,
                           template=self._template, datamodule=self._datamodule)
            stack.enter_context(_staged(out)).write_bytes(blob)
        return out

    def report(self, path: str | os.PathLike[str]) -> Path:
        """Write the study's HTML report (``slimtune report``)."""
        write_report(self.optuna_study, self.storage, path)
        return Path(path)


def search(model: torch.nn.Module, datamodule: Any, *, study: str, storage: str | None = None,
           trials: int | None = None, space: Mapping[str, Any] | None = None, spec: Mapping[str, Any] | None = None,
           factory: str | None = None, factory_kwargs: Mapping[str, Any] | None = None,
           data_module: str | None = None, data_kwargs: Mapping[str, Any] | None = None,
           timeout: float | None = None, threads: int | None = None, progress: bool = False, force: bool = False,
           **settings: Any) -> Study:
    """Search how to compress ``model`` (an ``nn.Module`` or a ``LightningModule`` whose forward
    gives logits) on ``datamodule`` (a ``LightningDataModule``), into study ``study`` at
    ``storage`` (default ``sqlite:///slimtune.db``, or ``spec``'s), until it holds ``trials``
    finished trials (default 20, or ``spec``'s); return the :class:`Study`.

    Settings come as a ``spec`` dict (the TOML spec's tables) and as keyword arguments, one per
    section (``finetune={"epochs": 2}``, ``method={"prune": {"schedule": "gradual"}}``) or study
    key (``seed``, ``max_accuracy_drop``, ``feasible_drop``); ``space`` is the ``[space]`` table.
    The same call again continues the study (``force=True`` continues it even when the spec
    changed, as ``search --force``). Bad settings raise :class:`~slimtune.spaces.SpecError`
    before anything is written. Messages (the teacher, warnings) go to stderr; ``progress``
    shows a progress bar too.
    """
    data = spec_for_objects(model, datamodule, study=study, storage=storage, trials=trials, space=space, spec=spec,
                            factory=factory, factory_kwargs=factory_kwargs, data_module=data_module,
                            data_kwargs=data_kwargs, **settings)
    parsed = parse_spec(data)
    if is_in_memory(parsed.storage):
        raise SpecError("storage", parsed.storage, "a database file or server, e.g. sqlite:///slimtune.db",
                        "lives in this call's memory only: the study would be gone when it returns")
    summary = run_study(parsed, force=force, timeout=timeout, threads=threads, progress=progress,
                        log=lambda message: print(message, file=sys.stderr), given=(model, datamodule))
    if summary.stopped_by is not None and summary.finished == 0:
        raise SearchFailed(f"the search of study {study} stopped before any trial finished ({summary.stopped_by})")
    print(_summary_line(summary), file=sys.stderr)
    return Study(study, parsed.storage, template=model, summary=summary, datamodule=datamodule)


def _summary_line(summary: SearchSummary) -> str:
    """What a run of :func:`search` leaves, as people count it: finished trials split into those
    on the front's side (complete) and those the floor stopped (pruned), and failures."""
    states = [t.state for t in load_existing_study(summary.study_name, summary.storage).get_trials(deepcopy=False)]
    counts = {state: states.count(state) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    return (f"study {summary.study_name}: {summary.finished}/{summary.target} finished trials "
            f"({counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} stopped below the accuracy floor"
            + (f", {counts[TrialState.FAIL]} failed" if counts[TrialState.FAIL] else "")
            + f"; {summary.ran} run now, {summary.seconds:.0f} s)")


def load_study(name: str, storage: str = DEFAULT_STORAGE, model: torch.nn.Module | None = None,
               datamodule: Any = None) -> Study:
    """Reopen study ``name`` at ``storage``; ``model`` (the uncompressed model it was searched
    from) lets :meth:`Study.best` rebuild a study whose model was given as an object, and
    ``datamodule`` (its data module) lets :meth:`Study.export` check an ONNX file on its data."""
    return Study(name, storage, template=model, datamodule=datamodule)
