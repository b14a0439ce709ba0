"""A PostgreSQL cluster of the test's own, so a chaos test can stop a real database.

The shared PostgreSQL on 5432 is never stopped; this one is created with the installed
``initdb`` in a temporary directory, listens on a free port on 127.0.0.1 only, trusts local
connections, and is stopped the way an operator or a crash would stop it: ``fast`` (sessions
ended by the server), ``immediate`` (a crash), or ``smart`` (refusing new connections while
the open ones finish). PostgreSQL refuses to run as root, so as root it runs as ``postgres``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Literal

from tests.chaos.private_broker import _free_port

TIMEOUT = 60.0
StopMode = Literal["smart", "fast", "immediate"]


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return found[-1].parent


class PrivatePostgres:
    """One cluster: ``start()``, ``stop(mode)``, ``start()`` again on the same data."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.data = root / "data"
        self._bin = _bin_dir()
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str | Path) -> None:
        subprocess.run(
            [*self._as, self._bin / tool, *map(str, args)],
            check=True,
            capture_output=True,
            timeout=TIMEOUT,
        )

    def start(self) -> None:
        """Start it and return once it accepts connections (``pg_ctl -w`` waits for that)."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l", self.root / "log", "-w", "start")

    def stop(self, mode: StopMode = "fast", *, wait: bool = True) -> None:
        """Stop it; ``wait=False`` returns at once (a smart stop waits for open sessions)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w" if wait else "-W", "stop")

    def is_running(self) -> bool:
        """Whether its server runs (``pg_ctl status`` exits 0; 3 when it does not)."""
        status = subprocess.run(
            [*self._as, self._bin / "pg_ctl", "-D", self.data, "status"],
            check=False,
            capture_output=True,
            timeout=TIMEOUT,
        )
        return status.returncode == 0

    def wait_stopped(self) -> None:
        """Return once a stop asked without waiting has finished."""
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def __enter__(self) -> PrivatePostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        subprocess.run(
            [*self._as, self._bin / "pg_ctl", "-D", self.data, "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            timeout=TIMEOUT,
        )
        shutil.rmtree(self.root, ignore_errors=True)
