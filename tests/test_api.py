"""The public API: the version, ``python -m slimtune``, sorted explicit ``__all__`` lists, no
reach into another package's private modules, and no import loops between modules."""

from __future__ import annotations

import tomllib
import ast
import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import slimtune

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"slimtune": "slimtune", "slimtune.search": "search", "slimtune.spaces": "spaces",
            "slimtune.studies": "studies", "slimtune.trainers": "trainers",
            "slimtune.trainers.methods": "trainers/methods"}


def test_the_version_comes_from_the_package_metadata() -> None:
    assert slimtune.__version__ == importlib.metadata.version("slimtune")
    for argv in ([sys.executable, "-m", "slimtune", "--version"], [str(Path(sys.executable).parent / "slimtune"),
                                                                  "--version"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == f"slimtune {slimtune.__version__}", done.stderr


@pytest.mark.parametrize("package", list(PACKAGES))
def test_each_package_has_an_explicit_sorted_all_of_names_it_has(package: str) -> None:
    tree = ast.parse((ROOT / PACKAGES[package] / "__init__.py").read_text())
    assigned = [node for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)]
    assert len(assigned) == 1 and isinstance(assigned[0].value, ast.List), "__all__ is a literal list"
    names = [ast.literal_eval(element) for element in assigned[0].value.elts]
    assert names == sorted(names) and len(set(names)) == len(names)
    module = importlib.import_module(package)
    assert all(hasattr(module, name) for name in names)


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """The slimtune modules that ``name`` imports, also inside functions (relative imports resolved)."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in _modules() else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m.startswith("slimtune")}


def test_no_module_imports_a_private_module_of_another_package() -> None:
    offenders = []
    for name, path in _modules().items():
        own = name if path.stem == "__init__" else name.rpartition(".")[0]
        for imported in _imports(name, path):
            parent, _, leaf = imported.rpartition(".")
            if leaf.startswith("_") and parent != own and not own.startswith(parent + "."):
                offenders.append(f"{name} -> {imported}")
    assert not offenders


def test_no_import_loops_between_modules() -> None:
    """Between a package's own modules (its ``__init__`` left out: it imports them all by design)."""
    modules = {name: path for name, path in _modules().items() if path.stem != "__init__"}
    graph = {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}
    loops = []
    for start in graph:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    loops.append(" -> ".join(trail + [start]))
                elif nxt not in trail:
                    stack.append((nxt, trail + [nxt]))
    assert not loops


def test_the_readme_spec_reference_is_the_declared_one() -> None:
    """Every declared setting appears in the README exactly as its declaration says (defaults, ranges, help)."""
    from slimtune.spaces import spec_reference

    readme = (ROOT / "README.md").read_text()
    assert f"```toml\n{spec_reference()}\n```" in readme


def test_every_knob_is_in_the_readme_space_section() -> None:
    from slimtune.spaces import knob_declarations, parse_spec

    readme = (ROOT / "README.md").read_text()
    defaults = parse_spec({"study": {"name": "x"}, "model": {"preset": "lenet300"}, "data": {"preset": "mnist"}})
    for name, knob in defaults.space.knobs.items():
        assert name in knob_declarations()
        line = next((line for line in readme.splitlines() if line.startswith(f"{name} = ")), None)
        assert line is not None, f"space knob {name} is not in the README"
        written = line.split("#")[0].split("=", 1)[1].strip()
        as_toml = tomllib.loads(f"v = {written}")["v"]
        from slimtune.spaces import parse_knob

        assert parse_knob(f"space.{name}", as_toml, knob_declarations()[name]) == knob, name
