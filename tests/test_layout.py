"""Each package depends only downwards: the shared ground (queuegate) on nothing of ours, the
interfaces on everything below them. The CLI launches every part of the gateway, the front
door included (``queuegate api``), so it may import frontdoor; the front door never imports
the CLI.

Every import statement counts, at module level or inside a function, under TYPE_CHECKING or
not: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MIDDLE = {"producer", "workers", "router", "accounting", "mockprovider"}
ALLOWED: dict[str, set[str]] = {
    "queuegate": set(),
    "router": {"queuegate"},
    "workers": {"queuegate", "router"},
    "producer": {"queuegate"},
    "accounting": {"queuegate"},
    "mockprovider": {"queuegate"},
    "admin": {"queuegate", *MIDDLE},
    "cli": {"queuegate", "admin", "frontdoor", *MIDDLE},
    "frontdoor": {"queuegate", "admin", *MIDDLE},
}
"""What each package may import of ours; bench and tests may import anything."""
UNCONSTRAINED = {"bench", "tests"}


def _our_packages() -> set[str]:
    return {path.parent.name for path in ROOT.glob("*/__init__.py")}


def _imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in ``path``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_package_has_a_place_in_the_layers() -> None:
    unplaced = _our_packages() - ALLOWED.keys() - UNCONSTRAINED
    assert not unplaced, f"say in ALLOWED what {sorted(unplaced)} may import"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_the_layers_below_it(package: str) -> None:
    ours = _our_packages()
    modules = sorted((ROOT / package).rglob("*.py"))
    if package == "queuegate":
        assert len(modules) > 20  # the walk reads the real tree, not an empty one
    upward = {
        f"{module.relative_to(ROOT)} imports {name}"
        for module in modules
        for name in _imports(module) & ours
        if name != package and name not in ALLOWED[package]
    }
    assert not upward, "\n".join(sorted(upward))


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "lazy.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from router.catalog import Catalog\n"
        "def f():\n    import workers.worker\n    from . import sibling\n"
    )
    assert _imports(module) == {"typing", "router", "workers"}


REDIS_CLIENT_MAKERS = {
    "from_url",
    "from_pool",
    "master_for",
    "Redis",
    "StrictRedis",
    "Sentinel",
    "ConnectionPool",
    "BlockingConnectionPool",
}
"""What makes a Redis client or pool; only queuegate/redis_client.py may call it."""


def _client_makers(path: Path) -> set[str]:
    """The Redis client makers ``path`` calls, as ``line: name``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in REDIS_CLIENT_MAKERS:
                found.add(f"{node.lineno}: {name}")
    return found


def test_every_redis_client_of_the_gateway_comes_from_one_factory() -> None:
    # A client made any other way would not follow a Sentinel failover, nor wait for a
    # connection, nor send a command again after a broken connection.
    factory = ROOT / "queuegate" / "redis_client.py"
    assert _client_makers(factory)  # the check sees the factory's own calls
    elsewhere = {
        f"{module.relative_to(ROOT)}:{call}"
        for package in ALLOWED
        for module in sorted((ROOT / package).rglob("*.py"))
        if module != factory
        for call in _client_makers(module)
    }
    assert not elsewhere, "make them with queuegate.redis_client.redis_for:\n" + "\n".join(
        sorted(elsewhere)
    )


WORKER_NEVER_USES = (
    "httpx",
    "fastapi",
    "opentelemetry.sdk.trace",
    "pygments",
    "opentelemetry.sdk.metrics",
    "rich",
)
"""Libraries a worker process has no use for, each megabytes of its memory once imported
(httpx brings its own command line: click, rich, pygments): imported only where used.
OpenTelemetry's metrics SDK redis-py imports whenever it is installed, unless the entry
point marks it missing first (``cli.entry.leave_out_unused``); rich only the commands that
print tables and progress do, when they run (``cli.console.LazyConsole``)."""


def test_a_worker_process_imports_no_library_it_never_uses() -> None:
    # Given what ``queuegate worker`` imports (its entry point, the command line, then the
    # worker's parts)
    imports = "import cli.entry; cli.entry.leave_out_unused(); "
    imports += "import cli.main, queuegate.metrics_server, router, workers, sys; "
    imports += "from queuegate.settings import Settings; Settings(); "
    report = "print(' '.join(m for m in sys.argv[1:] if sys.modules.get(m) is not None))"
    ran = subprocess.run(
        [sys.executable, "-c", imports + report, *WORKER_NEVER_USES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    # Expect none of those loaded
    assert ran.stdout.split() == []


HTTP_SERVER = ("fastapi", "starlette", "uvicorn")
"""The front door's stack: the command line's batch commands check requests as its endpoints
do (``producer.batch.checks``, over ``queuegate.openai_request`` and
``queuegate.messages_request``) without it."""


def test_batch_submit_checks_requests_without_the_http_servers_stack(tmp_path: Path) -> None:
    # Given a batch file, and a --skipped path submit refuses once it has imported all it
    # uses, before it connects to anything
    batch = tmp_path / "b.jsonl"
    batch.write_text('{"custom_id": "a", "params": {}}\n')
    unwritable = tmp_path / "none" / "skipped.jsonl"
    argv = ["batch", "submit", str(batch), "--team", "alpha", "--skipped", str(unwritable)]
    imports = "import cli.entry; cli.entry.leave_out_unused(); import sys; "
    imports += "from typer.testing import CliRunner; from cli.main import app; "
    imports += f"ran = CliRunner().invoke(app, {argv!r}); "
    report = "print(ran.exception); "
    report += "print(' '.join(m for m in sys.argv[1:] if sys.modules.get(m) is not None))"
    # When it runs in a process of its own
    ran = subprocess.run(
        [sys.executable, "-c", imports + report, "producer.batch.checks", *HTTP_SERVER],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    # Expect it stopped where expected, its checks loaded, and nothing of the server's
    refusal, loaded = ran.stdout.splitlines()
    assert "has no directory" in refusal
    assert loaded.split() == ["producer.batch.checks"]


def test_the_tree_holds_no_stray_output_and_no_machine_paths() -> None:
    """The project speaks of itself alone: a log or scratch file left at the root, or a path of
    one machine written into a tracked file, would ship to every clone."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(tracked) > 100  # the listing reads the real tree
    at_root = {name for name in tracked if "/" not in name}
    assert at_root == {".gitignore", "Makefile", "README.md", "pyproject.toml"}
    machine = subprocess.run(
        [
            "git",
            "grep",
            "-lI",
            "-e",
            "/work/",
            "-e",
            "/root/",
            "--",
            ".",
            f":!{Path(__file__).relative_to(ROOT)}",
        ],
        cwd=ROOT,
        check=False,  # git grep exits 1 when it finds nothing, the case we want
        capture_output=True,
        text=True,
    ).stdout.split()
    assert machine == [], f"paths of one machine in {machine}"
