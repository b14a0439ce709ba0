"""A RabbitMQ node of the test's own, so a chaos test can restart a real broker.

The shared broker on 5672 is never stopped; this second node of the installed RabbitMQ has its
own name, ports, data, logs and Erlang cookie under a temporary directory, no plugins (the
management listener would clash on 15672) and an empty config file (the system one binds 5672).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType

from queuegate.settings import Settings
from tests.faults import RECONNECT_INTERVAL

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
"""The scripts themselves: /usr/sbin's wrappers switch to the rabbitmq user and drop our env."""

PORTS = range(20000, 32000)
"""Below Linux's ephemeral range, so no outgoing connection holds the port across a restart."""

BOOT_TIMEOUT = 60.0


def _free_port() -> int:
    while True:
        port = random.choice(PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


class PrivateBroker:
    """One RabbitMQ node: ``start()``, ``restart()`` on the same data, ``stop()``.

    ``port`` and ``dist_port`` default to free ones; ``config`` is its rabbitmq.conf and
    ``advanced`` its advanced.config (Erlang terms); nodes given the same ``cookie`` may join
    one cluster (tests/rabbit_cluster.py).
    """

    def __init__(
        self,
        root: Path,
        *,
        port: int | None = None,
        dist_port: int | None = None,
        config: str = "",
        advanced: str = "[].",
        cookie: str | None = None,
    ) -> None:
        self.root = root
        self.node = f"qgt-{uuid.uuid4().hex[:8]}@localhost"
        self.port = port or _free_port()
        self.pid_file = root / "node.pid"
        root.mkdir(parents=True, exist_ok=True)
        (root / "rabbitmq.conf").write_text(config)
        (root / "advanced.config").write_text(advanced)
        (root / "enabled_plugins").write_text("")
        (root / "rabbitmq-env.conf").write_text("")
        if cookie is not None:
            cookie_file = root / ".erlang.cookie"
            cookie_file.write_text(cookie)
            cookie_file.chmod(0o400)
        self.env = {
            **os.environ,
            "HOME": str(root),  # the Erlang cookie shared by this node and rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port or _free_port()),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self._server: subprocess.Popen[bytes] | None = None

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> None:
        """Boot the node and return once it accepts AMQP connections (listeners open last)."""
        with (self.root / "server.out").open("ab") as out:
            self._server = subprocess.Popen(
                [RABBITMQ_BIN / "rabbitmq-server"],
                env=self.env,
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self._server.poll() is not None or time.monotonic() > deadline:
                    self._server.kill()  # a node that booted too slowly must not linger
                    self._server.wait()
                    self._server = None
                    raise RuntimeError(
                        f"RabbitMQ node {self.node} did not start; see {self.root}/server.out"
                    ) from None
                time.sleep(0.1)  # nothing announces the listener: poll its port

    def stop(self) -> None:
        """Stop the node and wait for its VM to exit (``stop <pid file>`` waits for it)."""
        if self._server is None:
            return
        subprocess.run(
            [RABBITMQ_BIN / "rabbitmqctl", "-n", self.node, "-q", "stop", self.pid_file],
            env=self.env,
            check=False,
            capture_output=True,
            timeout=BOOT_TIMEOUT,
        )
        try:
            self._server.wait(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()
        self._server = None

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` against this node; its output, or RuntimeError with it."""
        done = subprocess.run(
            [RABBITMQ_BIN / "rabbitmqctl", "-n", self.node, "-q", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=BOOT_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def kill(self) -> None:
        """SIGKILL the node's VM, as a crash would, and reap it."""
        if self._server is None:
            return
        os.kill(int(self.pid_file.read_text().strip()), signal.SIGKILL)
        self._server.wait(timeout=BOOT_TIMEOUT)
        self._server = None

    def restart(self) -> None:
        """A full stop and start of the node on the same data directory."""
        self.stop()
        self.start()

    def __enter__(self) -> PrivateBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def on_node(settings: Settings, broker: PrivateBroker) -> Settings:
    """``settings`` whose components use the private node and reconnect to it quickly."""
    url = f"{broker.amqp_url}?reconnect_interval={RECONNECT_INTERVAL}"
    return settings.model_copy(update={"amqp_url": url})
