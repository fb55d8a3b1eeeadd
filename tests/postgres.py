"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb, start, hand out URLs, stop.

The cluster lives entirely in one temporary folder (data, unix socket, log) and listens on a
free loopback TCP port. As root (this machine and CI) the server runs as the ``postgres``
system user, because ``initdb`` and ``postgres`` refuse to run as root.

Example::

    cluster = start_cluster(tempfile.mkdtemp())
    try:
        url = cluster.create_database("study")   # postgresql+psycopg://slimtune:...@127.0.0.1:PORT/study
        storage = optuna.storages.RDBStorage(url)
    finally:
        cluster.stop()

In pytest, use the session fixture ``postgres`` (a :class:`Cluster`), stopped and removed at the
end of the session whatever happened.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = "install the PostgreSQL server with `apt-get install -y postgresql` (Debian/Ubuntu)"
SERVER_USER = "postgres"  # the OS user that runs the server when we are root
SUPERUSER = "postgres"    # the database superuser created by initdb
ROLE = "slimtune"         # the login role tests connect as

# Settings for a disposable cluster: no durability (fast), small footprint, no background noise.
FAST_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
COMMON_SETTINGS = {
    "max_connections": "100",
    "shared_buffers": "32MB",
    "dynamic_shared_memory_type": "posix",
    "autovacuum": "off",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


# Stops the server if the process that started it dies without stopping it (even by SIGKILL):
# it blocks on a pipe whose only writer is that process, and acts when the pipe closes.
_WATCHDOG = """
import json, os, shutil, signal, subprocess, sys
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
stop_cmd, pid_file, cwd, remove_dir = json.loads(sys.argv[1])
sys.stdin.buffer.read()
orphaned = os.path.exists(pid_file)
if orphaned:
    try:
        subprocess.run(stop_cmd, cwd=cwd, capture_output=True, timeout=40)
    except Exception:
        pass
    try:
        pid = int(open(pid_file).readline())
        os.kill(pid, signal.SIGKILL)
    except Exception:
        pass
if orphaned and remove_dir:
    shutil.rmtree(cwd, ignore_errors=True)
"""


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing or the cluster could not be started."""


def find_bindir() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Tried in order: ``pg_config --bindir``, ``/usr/lib/postgresql/<newest>/bin``, ``$PATH``.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", Path(path).parent.name)) or (0,)

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found via `pg_config --bindir`, "
        f"/usr/lib/postgresql/*/bin or PATH; {INSTALL_HINT}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as_prefix() -> list[str]:
    """Command prefix that runs a server tool as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(f"running as root but there is no `{SERVER_USER}` system user to run the "
                                  f"server as; {INSTALL_HINT} (it creates that user)") from None
    if shutil.which("runuser"):
        return ["runuser", "-u", SERVER_USER, "--"]
    if shutil.which("setpriv"):
        return ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups", "--"]
    raise PostgresUnavailable("running as root, and neither `runuser` nor `setpriv` is available to drop to "
                              f"the `{SERVER_USER}` user")


@dataclass
class Cluster:
    """A running throwaway cluster. Connect as :attr:`user` over TCP, or use the URL helpers."""

    bindir: Path
    base_dir: Path
    port: int
    password: str
    superuser_password: str
    run_as: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    user: str = ROLE
    superuser: str = SUPERUSER
    _running: bool = field(default=False, repr=False)
    remove_when_orphaned: bool = False
    _watchdog: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "socket"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "server.log"

    @property
    def running(self) -> bool:
        return self._running

    # -- URLs -------------------------------------------------------------------------------
    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL for the ``slimtune`` role on database ``dbname``."""
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

    def bad_password_url(self, dbname: str = "postgres") -> str:
        """Like :meth:`url` but with a wrong password (authentication must fail)."""
        return f"postgresql+psycopg://{self.user}:wrong-{self.password[:6]}@{self.host}:{self.port}/{dbname}"

    def superuser_conninfo(self, dbname: str = "postgres") -> str:
        """libpq conninfo for the superuser over the unix socket (trust authentication)."""
        return f"host={self.socket_dir} port={self.port} user={self.superuser} dbname={dbname}"

    # -- administration ---------------------------------------------------------------------
    def execute_as_superuser(self, *statements: str, dbname: str = "postgres") -> None:
        """Run SQL statements as the superuser, in autocommit mode (CREATE DATABASE needs it)."""
        import psycopg

        with psycopg.connect(self.superuser_conninfo(dbname), autocommit=True, connect_timeout=10) as conn:
            for statement in statements:
                conn.execute(statement)

    def create_database(self, name: str) -> str:
        """A fresh, empty database ``name`` owned by the ``slimtune`` role; returns its URL."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]{0,62}", name):
            raise ValueError(f"database name {name!r}: use letters, digits, '_' and '-' (at most 63)")
        self.execute_as_superuser(f'CREATE DATABASE "{name}" OWNER "{self.user}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self.execute_as_superuser(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def server_log(self, tail: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def _stop_command(self) -> list[str]:
        return self.run_as + [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast",
                              "-w", "-t", "30"]

    def _start_watchdog(self) -> None:
        args = json.dumps([self._stop_command(), str(self.data_dir / "postmaster.pid"), str(self.base_dir),
                           self.remove_when_orphaned])
        self._watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, args], stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          cwd=self.base_dir, start_new_session=True)

    def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m fast``); idempotent. Kills the postmaster if that fails."""
        if self._running:
            self._running = False
            try:
                subprocess.run(self._stop_command(), cwd=self.base_dir, capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                pass
            self._kill_leftover_postmaster()
        if self._watchdog is not None:
            watchdog, self._watchdog = self._watchdog, None
            try:
                watchdog.stdin.close()  # type: ignore[union-attr]
                watchdog.wait(timeout=10)
            except (OSError, subprocess.SubprocessError):
                watchdog.kill()

    def _kill_leftover_postmaster(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return
        for sig, wait_s in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):  # immediate shutdown, then kill
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run_tool(cmd: list[str], cwd: Path, what: str, log_file: Path | None = None, timeout: float = 120) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PostgresUnavailable(f"{what} timed out after {timeout:.0f} s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        log = ""
        if log_file is not None and log_file.exists():
            log = "\nserver log:\n" + log_file.read_text(errors="replace")[-3000:]
        raise PostgresUnavailable(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                                  f"{(proc.stdout + proc.stderr).strip()[-3000:]}{log}")


def start_cluster(base_dir: str | os.PathLike[str], durable: bool = False, remove_when_orphaned: bool = False,
                  start_attempts: int = 3) -> Cluster:
    """Create and start a cluster whose files all live in ``base_dir`` (made if missing).

    ``durable=False`` (tests) turns fsync and synchronous commit off; ``durable=True`` keeps the
    server's defaults (benchmarks). The caller stops it with :meth:`Cluster.stop` and removes
    ``base_dir``. If the calling process ends without stopping it (an exception past the
    caller, SIGTERM, even SIGKILL), an exit hook or a watchdog process stops the server, and
    with ``remove_when_orphaned`` the watchdog also deletes ``base_dir``.
    """
    bindir = find_bindir()
    run_as = _run_as_prefix()
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    (base / "socket").mkdir(exist_ok=True)
    if run_as:
        server = pwd.getpwnam(SERVER_USER)
        for path in (base, base / "socket"):
            os.chown(path, server.pw_uid, server.pw_gid)
        probe = subprocess.run(run_as + ["test", "-w", str(base), "-a", "-x", str(base)], capture_output=True)
        if probe.returncode != 0:
            raise PostgresUnavailable(f"the `{SERVER_USER}` user cannot reach {base} (a parent folder is not "
                                      "traversable); use a base folder under a world-traversable path such as /tmp")
    cluster = Cluster(bindir=bindir, base_dir=base, port=0, password=secrets.token_hex(12),
                      superuser_password=secrets.token_hex(12), run_as=run_as,
                      remove_when_orphaned=remove_when_orphaned)

    pwfile = base / "superuser.pw"
    pwfile.write_text(cluster.superuser_password + "\n")
    pwfile.chmod(0o600)
    if run_as:
        os.chown(pwfile, server.pw_uid, server.pw_gid)
    try:
        _run_tool(run_as + [str(bindir / "initdb"), "-D", str(cluster.data_dir), "-U", SUPERUSER,
                            f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
                            "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                  cwd=base, what="initdb")
    finally:
        pwfile.unlink(missing_ok=True)

    settings = {**COMMON_SETTINGS, **({} if durable else FAST_SETTINGS),
                "listen_addresses": "127.0.0.1", "unix_socket_directories": str(cluster.socket_dir)}
    with open(cluster.data_dir / "postgresql.auto.conf", "a") as conf:  # owned by the server user already
        conf.write("".join(f"{key} = '{value}'\n" for key, value in settings.items()))

    last_error: PostgresUnavailable | None = None
    for _ in range(start_attempts):  # the free port can be taken between finding it and binding it
        cluster.port = free_port()
        try:
            _run_tool(run_as + [str(bindir / "pg_ctl"), "start", "-D", str(cluster.data_dir), "-w", "-t", "60",
                                "-l", str(cluster.log_file), "-o", f"-p {cluster.port}"],
                      cwd=base, what="pg_ctl start", log_file=cluster.log_file)
        except PostgresUnavailable as exc:
            last_error = exc
            cluster._running = True
            cluster.stop()  # in case the postmaster came up half way
            continue
        cluster._running = True
        cluster._start_watchdog()
        break
    else:
        assert last_error is not None
        raise last_error
    atexit.register(cluster.stop)

    try:
        cluster.execute_as_superuser(
            f"CREATE ROLE \"{cluster.user}\" LOGIN CREATEDB PASSWORD '{cluster.password}'")
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A running PostgreSQL cluster for the whole test session (stopped and deleted at the end).

    Fails (does not skip) when the server is not installed: CI installs it.
    """
    base = Path(tempfile.mkdtemp(prefix="slimtune-pg-"))
    cluster: Cluster | None = None
    try:
        try:
            cluster = start_cluster(base, remove_when_orphaned=True)
        except PostgresUnavailable as exc:
            pytest.fail(f"cannot start a throwaway PostgreSQL cluster: {exc}", pytrace=False)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
