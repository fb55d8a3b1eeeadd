"""Real file-system conditions for tests: a read-only mount and a full disk, in a private mount namespace.

``unshare -m`` gives the command its own view of the mounts; inside it a folder is bind-mounted
read-only (``EROFS`` for every write, root included) or replaced by a small ``tmpfs`` (``ENOSPC``
once it is full). Nothing outside the command sees either.

Example::

    result = run_read_only(folder, ["studies", "--storage", f"sqlite:///{folder}/s.db"])
    result.returncode, result.stderr
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "slimtune.search._cli"]


@lru_cache(maxsize=1)
def _namespaces() -> str | None:
    """``None`` when this machine lets us make mount namespaces, else why not."""
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"mount namespaces are refused here: {probe.stderr.strip()}"


def require_namespaces() -> None:
    """Skip, saying why, on a machine that forbids mount namespaces (a container without
    CAP_SYS_ADMIN); this machine and CI allow them."""
    why = _namespaces()
    if why is not None:
        pytest.skip(why)


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def run_read_only(folder: Path, argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``slimtune argv`` with ``folder`` mounted read-only (a real read-only file system)."""
    require_namespaces()
    quoted = shlex.quote(str(folder))
    script = f"mount --bind {quoted} {quoted} && mount -o remount,bind,ro {quoted} {quoted} && exec \"$@\""
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *CLI, *argv], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_on_full_disk(folder: Path, seed_files: list[Path], free_bytes: int, argv: list[str], cwd: Path,
                     timeout: float = 300) -> tuple[subprocess.CompletedProcess, Path]:
    """``slimtune argv`` with ``folder`` a small tmpfs holding copies of ``seed_files`` and only
    ``free_bytes`` free; afterwards the tmpfs's files are copied to ``folder/after`` (returned)."""
    require_namespaces()
    size = sum(p.stat().st_size for p in seed_files) + free_bytes + 64 * 1024
    after = folder.parent / f"{folder.name}-after"
    after.mkdir()
    copies = " && ".join(f"cp {shlex.quote(str(p))} {shlex.quote(str(folder))}/" for p in seed_files) or "true"
    where = shlex.quote(str(folder))
    fill = f"head -c $(( $(stat -f -c '%a*%S' {where}) - {free_bytes} )) /dev/zero > {where}/filler"
    script = (f"mount -t tmpfs -o size={size} tmpfs {where} && {copies} && {fill} && "
              f"{{ \"$@\"; code=$?; rm -f {where}/filler; cp -a {where}/. {shlex.quote(str(after))}/; exit $code; }}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *CLI, *argv], cwd=cwd, env=_env(),
                            capture_output=True, text=True, timeout=timeout)
    return result, after


def start_read_only(folder: Path, argv: list[str], cwd: Path, stdout: object, stderr: object) -> subprocess.Popen:
    """:func:`run_read_only`, started in the background (a server such as ``dashboard``)."""
    require_namespaces()
    quoted = shlex.quote(str(folder))
    script = f"mount --bind {quoted} {quoted} && mount -o remount,bind,ro {quoted} {quoted} && exec \"$@\""
    return subprocess.Popen(["unshare", "-m", "sh", "-c", script, "sh", *CLI, *argv], cwd=cwd, env=_env(),
                            stdout=stdout, stderr=stderr)
