"""deploy/: the manifests parse, carry what operators rely on, and agree with the code."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from typer.main import get_command

import queuegate.metrics
import router
from cli.main import app
from queuegate import tracing
from queuegate.management import BrokerAdmin
from queuegate.namespace import drop_namespace
from queuegate.registry import RESERVED_NAMES, TEAM_NAME
from queuegate.settings import Settings
from queuegate.tenancy import broker_user
from queuegate.topology import Topology
from router import load_catalog
from tests.support import running_gateway

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"


def _k8s() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in _k8s() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(deployment: str) -> dict[str, Any]:
    [container] = _one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _catalog_text() -> str:
    text: str = _one("ConfigMap", "queuegate-catalog")["data"]["catalog.yaml"]
    return text


def test_every_manifest_is_listed_and_has_kind_and_name() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for doc in _k8s():
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


def test_images_are_this_version_and_commands_exist() -> None:
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    [image] = kustomization["images"]
    assert (image["name"], image["newTag"]) == ("queuegate", version("queuegate"))
    pods = [d["spec"]["template"]["spec"] for d in _k8s() if d["kind"] in ("Deployment", "Job")]
    for pod in pods:
        for container in pod["containers"]:
            assert container["image"] == "queuegate"  # what kustomize names and tags
            assert container["args"][0] in commands
        assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("deployment", ["queuegate-worker", "queuegate-accounting"])
def test_probes_and_metrics_port_match_the_settings(deployment: str) -> None:
    container = _container(deployment)
    port = Settings().metrics_port_of("worker")
    [metrics] = container["ports"]
    assert (metrics["name"], metrics["containerPort"]) == ("metrics", port)
    assert int(_env(container)["QUEUEGATE_METRICS_PORT"]) == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    annotations = _one("Deployment", deployment)["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port


def test_workers_outlive_the_longest_provider_call_when_terminated(tmp_path: Path) -> None:
    catalog = _load_catalog(tmp_path)
    longest = max(d.timeout for m in catalog.models.values() for d in m.deployments)
    pod = _one("Deployment", "queuegate-worker")["spec"]["template"]["spec"]
    grace = float(_env(_container("queuegate-worker"))["QUEUEGATE_SHUTDOWN_GRACE"])
    assert longest < grace < pod["terminationGracePeriodSeconds"]


def _load_catalog(tmp_path: Path) -> Any:
    path = tmp_path / "catalog.yaml"
    path.write_text(_catalog_text())
    return load_catalog(path, {})


def test_catalog_keys_come_from_the_secret_which_holds_placeholders_only(tmp_path: Path) -> None:
    catalog = _load_catalog(tmp_path)
    secret = _one("Secret", "queuegate-secrets")["stringData"]
    for entry in catalog.models.values():
        for deployment in entry.deployments:
            assert deployment.api_key_env in secret
    for name, value in secret.items():
        if name.endswith("_KEY"):
            assert value == "REPLACE_ME"
        assert "REPLACE_ME" in value or "@" not in value, name


def test_disruption_budget_and_autoscaler_target_the_workers() -> None:
    worker = _one("Deployment", "queuegate-worker")
    labels = worker["spec"]["template"]["metadata"]["labels"]
    pdb = _one("PodDisruptionBudget", "queuegate-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    scaled = _one("ScaledObject", "queuegate-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "queuegate-worker"


def _team_queue_trigger() -> tuple[dict[str, str], re.Pattern[str]]:
    [trigger] = _one("ScaledObject", "queuegate-worker")["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    metadata: dict[str, str] = trigger["metadata"]
    auth = _one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    [ref] = auth["spec"]["secretTargetRef"]
    assert (ref["parameter"], ref["name"]) == ("host", "queuegate-secrets")
    metadata["host"] = _one("Secret", "queuegate-secrets")["stringData"][ref["key"]]
    return metadata, re.compile(metadata["queueName"])


def test_one_trigger_sums_the_depth_of_every_team_queue_and_no_other() -> None:
    metadata, pattern = _team_queue_trigger()
    # Regex matching and operations are KEDA's over the management API (http), not over AMQP.
    assert urlsplit(metadata["host"]).scheme == "http"
    assert urlsplit(metadata["host"]).port == 15672
    assert metadata["protocol"] == "http"
    assert (metadata["useRegex"], metadata["operation"]) == ("true", "sum")
    assert metadata["mode"] == "QueueLength"
    assert int(metadata["pageSize"]) >= 100 and int(metadata["value"]) > 0
    topology = Topology(Settings().namespace)
    teams = ["research", "a", "7", "team_b-2", "z" * 64, *(w + "x" for w in RESERVED_NAMES)]
    assert all(TEAM_NAME.fullmatch(team) for team in teams)
    for team in teams:
        # The broker's regex search (Erlang re) finds a match anywhere: the anchors must hold.
        assert pattern.search(topology.team_queue(team)), team
    others = [
        topology.results_queue("research", "nightly"),
        topology.replies_queue("research", "client-1"),
        topology.batch_lock_queue("research", "batch-1", "collect"),
        topology.batch_lock_queue("research", "batch-1", "submit"),
        topology.control_queue("research"),
        topology.shared_control_queue,
        topology.frontdoor_queue("p1"),
        topology.accounting_queue,
        topology.dead_queue,
        topology.team_dead_queue("research"),
        topology.jobs_exchange,
        Topology("staging").team_queue("research"),
        f"x{topology.team_queue('research')}",
        f"{topology.team_queue('research')}.x",  # no team name holds a dot
        topology.team_queue("Research"),
    ]
    for queue in others:
        assert not pattern.search(queue), queue


def _rabbitmq_cluster() -> dict[str, Any]:
    [cluster] = [d for d in _k8s() if d["kind"] == "RabbitmqCluster"]
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    return cluster


def test_the_broker_is_three_nodes_the_gateway_reaches_as_its_default_user() -> None:
    cluster = _rabbitmq_cluster()
    spec = cluster["spec"]
    assert spec["replicas"] == 3
    assert "rabbitmq_management" in spec["rabbitmq"]["additionalPlugins"]
    assert spec["resources"]["requests"] and spec["resources"]["limits"]
    admin = _one("Secret", spec["secretBackend"]["externalSecret"]["name"])["stringData"]
    conf = dict(
        line.split(" = ", 1) for line in admin["default_user.conf"].splitlines() if line.strip()
    )
    assert (conf["default_user"], conf["default_pass"]) == (admin["username"], admin["password"])
    secret = _one("Secret", "queuegate-secrets")["stringData"]
    for variable in ("QUEUEGATE_AMQP_URL", "QUEUEGATE_MANAGEMENT_URL"):
        url = urlsplit(secret[variable])
        # The operator's client Service carries the cluster's own name.
        assert url.hostname == cluster["metadata"]["name"] == admin["host"], variable
        assert (url.username, url.password) == (admin["username"], admin["password"]), variable
    assert urlsplit(secret["QUEUEGATE_AMQP_URL"]).port == int(admin["port"])


def test_the_cluster_has_the_broker_settings_compose_runs_with() -> None:
    wanted = _conf_lines((DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text())
    wanted.pop("load_definitions")  # compose's users; the operator makes the default user
    wanted.pop("management.tcp.port")  # the operator's, 15672
    config = _conf_lines(_rabbitmq_cluster()["spec"]["rabbitmq"]["additionalConfig"])
    assert wanted.items() <= config.items()
    assert config["queue_leader_locator"] == "balanced"  # team queues' leaders spread


def _conf_lines(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"]
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.mark.parametrize("deployment", ["worker.yaml", "accounting.yaml"])
def test_the_commented_tracing_variables_switch_traces_on(deployment: str) -> None:
    lines = (K8S / deployment).read_text().splitlines()
    commented = [line.split("# ", 1)[1] for line in lines if "# - {name: OTEL_" in line]
    env = {item["name"]: item["value"] for item in yaml.safe_load("\n".join(commented))}
    assert tracing.wanted_exporters(env) == ["otlp"]
    assert urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"]).port == 4318  # OTLP over HTTP
    assert 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1


def test_the_image_holds_every_package_the_distribution_lists() -> None:
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {
        words[1]
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if (words := line.split()) and words[0] == "COPY" and words[1] == words[-1]
    }
    assert packages and packages <= copied, packages - copied


def test_compose_checks_readiness_and_scrapes_on_the_metrics_port() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    port = Settings().metrics_port_of("worker")
    assert compose["x-queuegate"]["environment"]["QUEUEGATE_METRICS_PORT"] == str(port)
    for service in ("worker", "accounting"):
        check = " ".join(compose["services"][service]["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/readyz" in check
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [scrape] = prometheus["scrape_configs"][0]["dns_sd_configs"]
    assert scrape["port"] == port
    assert set(scrape["names"]) == {"worker", "accounting"}
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    patterns = [re.compile(p["pattern"]) for p in definitions["policies"]]
    assert any(p.match(f"{Settings().namespace}.jobs.research") for p in patterns)


def test_every_metric_the_dashboard_plots_is_exported() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "queuegate.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"queuegate_[a-z_]+", expr)}
    exported = {
        sample_name
        for metric in [
            *vars(queuegate.metrics).values(),
            *(make() for make in queuegate.metrics.ROLE_METRICS),
        ]
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
        for sample_name in _sample_names(family.name, family.type)
    }
    assert used and used <= exported, used - exported


def _sample_names(name: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{name}_total"}
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return {name}


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return compose


def _catalog_variables() -> set[str]:
    """The variables the bundled catalog reads (the mock provider's URL and key)."""
    text = (Path(router.__file__).parent / "catalogs" / "mock.yaml").read_text()
    return set(re.findall(r"\$\{(QUEUEGATE_[A-Z_]+)", text)) | set(
        re.findall(r"api_key_env: (QUEUEGATE_[A-Z_]+)", text)
    )


def test_every_queuegate_variable_in_compose_and_k8s_is_a_setting() -> None:
    fields = {f"QUEUEGATE_{name.upper()}" for name in Settings.model_fields}
    known = fields | _catalog_variables()
    named = set()
    for service in _compose()["services"].values():
        named |= {k for k in service.get("environment", {}) if k.startswith("QUEUEGATE_")}
    for doc in _k8s():
        if doc["kind"] == "Secret":
            named |= {k for k in doc["stringData"] if k.startswith("QUEUEGATE_")}
        if doc["kind"] in ("Deployment", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                named |= {k for k in _env(container) if k.startswith("QUEUEGATE_")}
    assert named and named <= known, named - known
    assert "QUEUEGATE_MANAGEMENT_URL" in named


def test_compose_reaches_the_broker_as_users_its_definitions_create() -> None:
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    users = {u["name"]: (u["password"], u["tags"]) for u in definitions["users"]}
    for service in _compose()["services"].values():
        env = service.get("environment", {})
        if "QUEUEGATE_AMQP_URL" not in env:
            continue
        settings = Settings(
            amqp_url=env["QUEUEGATE_AMQP_URL"], management_url=env["QUEUEGATE_MANAGEMENT_URL"]
        )
        # In the vhost its URL names, where its queues are and teams add puts its policies.
        allowed = {p["user"] for p in definitions["permissions"] if p["vhost"] == settings.vhost}
        for url in (settings.amqp_url, settings.management_url):
            parts = urlsplit(url)
            assert parts.hostname == "rabbitmq"
            assert parts.username in allowed
            assert users[parts.username][0] == parts.password
        # The operator commands (teams add) need an administrator of the management API.
        assert "administrator" in users[urlsplit(settings.management_url).username or ""][1]
        assert urlsplit(settings.management_url).port == 15672


def test_the_definitions_set_up_the_vhost_compose_connects_to_and_no_other() -> None:
    # Given the broker's definitions, and the vhost of every compose process's URL
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    vhosts = {
        Settings(amqp_url=service["environment"]["QUEUEGATE_AMQP_URL"]).vhost
        for service in _compose()["services"].values()
        if "QUEUEGATE_AMQP_URL" in service.get("environment", {})
    }

    # Expect one vhost, the one the definitions create, grant and bound its queues in: a
    # vhost changed in the URL alone would leave the gateway's user no rights there, and in
    # the definitions alone the default bounds on queues no process declares
    assert len(vhosts) == 1
    assert {v["name"] for v in definitions["vhosts"]} == vhosts
    assert {p["vhost"] for p in definitions["permissions"]} == vhosts
    assert {p["vhost"] for p in definitions["policies"]} == vhosts


def test_compose_switches_traces_on_and_sends_them_to_its_jaeger() -> None:
    compose = _compose()
    env = compose["x-queuegate"]["environment"]
    assert tracing.wanted_exporters(env) == ["otlp"]
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    jaeger = compose["services"][endpoint.hostname]
    assert jaeger["image"].startswith("jaegertracing/all-in-one")
    assert endpoint.port == 4318 and "4318:4318" in jaeger["ports"]  # OTLP over HTTP
    assert "16686:16686" in jaeger["ports"]  # the UI


def test_compose_services_wait_only_on_services_that_exist_and_commands_that_exist() -> None:
    compose = _compose()
    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    for name, service in compose["services"].items():
        for needed in service.get("depends_on", {}):
            assert needed in compose["services"], (name, needed)
        if "command" in service:
            assert service["command"][0] in commands, name
    teams = " ".join(compose["services"]["teams"]["entrypoint"])
    assert "--password-stdin" in teams


async def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, argv, check=False, env=env, capture_output=True, text=True, timeout=60
    )


async def test_the_compose_teams_and_submit_commands_serve_a_job(settings: Settings) -> None:
    """Compose's own commands, run here against the local services in a fresh namespace."""
    compose = _compose()
    teams = compose["services"]["teams"]
    script = teams["entrypoint"][-1].replace("$$", "$")  # Compose's escape of a literal $
    passwords = {k: v for k, v in teams["environment"].items() if not k.startswith("QUEUEGATE")}
    env = {
        **os.environ,
        **passwords,
        "QUEUEGATE_NAMESPACE": settings.namespace,
        "QUEUEGATE_DATABASE_SCHEMA": settings.database_schema,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    [header] = [
        line for line in (DEPLOY / "compose.yaml").read_text().splitlines() if "cli submit" in line
    ]
    words = shlex.split(header.lstrip("# "))
    cli_args = words[words.index("cli") + 1 :]
    submit_env = dict(w.split("=", 1) for w in words[words.index("-e") + 1 : words.index("cli")])
    try:
        # Given the teams service run twice, as on two `docker compose up`
        for _ in range(2):
            added = await _run(["sh", "-c", script], env)
            assert added.returncode == 0, added.stderr
        assert "exists: its credentials are unchanged" in added.stdout
        assert "research-laptop" not in added.stdout + added.stderr

        # When the header's submit runs while a worker serves the teams
        async with running_gateway(settings, teams=("research", "support")):
            submitted = await _run([sys.executable, "-m", "cli", *cli_args], {**env, **submit_env})
    finally:
        async with BrokerAdmin.of(settings) as admin:
            for team in ("research", "support"):
                await admin.delete_user(broker_user(settings.namespace, team))
        await drop_namespace(settings, ("research", "support"))

    # Expect the job served as team research
    assert submitted.returncode == 0, submitted.stderr
    assert "mock reply to: Hello" in submitted.stdout
