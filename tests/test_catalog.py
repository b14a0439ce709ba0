"""The model catalog: loading, interpolation, validation, fallback chains."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from mockprovider.wire import VLLM_PREFIX
from queuegate.errors import ConfigError, UnknownModel
from router import Catalog, load_catalog


def deployment(name: str = "d", **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai",
        "model": f"up-{name}",
        "api_base": "http://127.0.0.1:9",
        "api_key_env": "KEY",
        "input_per_mtok": 1,
        "output_per_mtok": 2,
    } | fields


def catalog_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def models_yaml(tmp_path: Path, models: dict[str, Any]) -> Path:
    return catalog_yaml(tmp_path, yaml.safe_dump({"models": models}))


def chain_catalog(tmp_path: Path, fallbacks: dict[str, list[str]]) -> Catalog:
    """A catalog of one deployment per alias, with the given fallbacks."""
    models = {
        alias: {"fallbacks": its, "deployments": [deployment(f"{alias}-dep")]}
        for alias, its in fallbacks.items()
    }
    return load_catalog(models_yaml(tmp_path, models), {})


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_catalog(path, {})
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- loading -----------------------------------------------------------------------------------


def test_bundled_mock_catalog_points_every_deployment_at_the_mock() -> None:
    catalog = load_catalog(None, {})

    assert {"gpt-4o-mini", "claude-haiku", "local-llama", "flaky-gpt"} <= catalog.models.keys()
    deployments = [d for entry in catalog.models.values() for d in entry.deployments]
    # (the vLLM deployment at the path where the mock answers as vLLM's server)
    assert {d.api_base for d in deployments} == {
        "http://127.0.0.1:8089",
        "http://127.0.0.1:8089" + VLLM_PREFIX,
    }
    kinds = {alias: catalog.resolve(alias).deployments[0] for alias in catalog.models}
    assert (kinds["gpt-4o-mini"].provider, kinds["gpt-4o-mini"].model) == ("openai", "gpt-4o-mini")
    assert (kinds["claude-haiku"].provider, kinds["claude-haiku"].model) == (
        "anthropic",
        "claude-3-5-haiku-latest",
    )
    assert kinds["local-llama"].provider == "openai_compatible"
    assert kinds["local-llama"].api_key_env is None
    assert kinds["flaky-gpt"].model == "flaky-gpt"
    assert catalog.resolve("flaky-gpt").fallbacks == ["claude-haiku"]


def test_bundled_mock_catalog_follows_queuegate_mock_url() -> None:
    catalog = load_catalog(None, {"QUEUEGATE_MOCK_URL": "http://mock:9000"})

    assert catalog.resolve("claude-haiku").deployments[0].api_base == "http://mock:9000"


def test_catalog_fields_are_loaded_with_exact_decimal_prices(tmp_path: Path) -> None:
    path = catalog_yaml(
        tmp_path,
        """
        models:
          gpt-4o-mini:
            deployments:
              - name: openai-main
                provider: openai
                model: gpt-4o-mini
                api_base: https://api.openai.com
                api_key_env: OPENAI_API_KEY
                input_per_mtok: 0.15
                output_per_mtok: 0.60
                timeout: 12.5
        """,
    )

    deployment = load_catalog(path, {}).resolve("gpt-4o-mini").deployments[0]

    assert deployment.input_per_mtok == Decimal("0.15")
    assert deployment.output_per_mtok == Decimal("0.60")
    assert deployment.timeout == 12.5
    assert deployment.api_key_env == "OPENAI_API_KEY"


def test_variables_are_interpolated_with_defaults(tmp_path: Path) -> None:
    path = catalog_yaml(
        tmp_path,
        """
        models:
          m:
            deployments:
              - name: d-${REGION}
                provider: openai
                model: ${MODEL:-gpt-4o-mini}
                api_base: ${BASE}/
                api_key_env: KEY
                input_per_mtok: ${PRICE:-0.15}
                output_per_mtok: 0.6
                timeout: ${TIMEOUT:-30}
        """,
    )

    env = {"REGION": "eu", "BASE": "http://mock:1", "MODEL": "", "TIMEOUT": "5"}
    deployment = load_catalog(path, env).resolve("m").deployments[0]

    assert deployment.name == "d-eu"
    assert deployment.model == "gpt-4o-mini"  # empty counts as unset, as in the shell
    assert deployment.api_base == "http://mock:1/"
    assert deployment.input_per_mtok == Decimal("0.15")
    assert deployment.timeout == 5.0


def test_unset_variable_without_default_names_the_variable_and_field(tmp_path: Path) -> None:
    path = models_yaml(tmp_path, {"m": {"deployments": [deployment(api_base="${NOWHERE}")]}})

    message = load_error(path)

    assert "NOWHERE" in message
    assert "models.m.deployments.0.api_base" in message


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_catalog(tmp_path / "absent.yaml", {})

    bad = catalog_yaml(tmp_path, "models:\n  m: [unclosed\n")

    assert "invalid YAML at line 3" in load_error(bad)  # where the list was left open


@pytest.mark.parametrize("text", ["root:x:0:0:root:/root:/bin/bash\n", "", "- models\n"])
def test_a_file_that_is_no_catalog_says_so_and_what_to_give(tmp_path: Path, text: str) -> None:
    # Given a file of another kind given as the catalog (a path mistyped: /etc/passwd, an
    # empty file, a list); before, "Input should be a valid dictionary or instance of Catalog"
    said = load_error(catalog_yaml(tmp_path, text))
    assert "not a catalog (a YAML mapping with models: at its top)" in said, said
    assert "--catalog or QUEUEGATE_CATALOG" in said and "\n" not in said


# --- validation --------------------------------------------------------------------------------


def test_unknown_provider_names_the_field(tmp_path: Path) -> None:
    path = models_yaml(tmp_path, {"m": {"deployments": [deployment(provider="azure")]}})

    message = load_error(path)

    assert message.startswith(f"{path}: models.m.deployments.0.provider:")


def test_duplicate_deployment_names_are_refused(tmp_path: Path) -> None:
    same = deployment("same")
    path = models_yaml(tmp_path, {"a": {"deployments": [same]}, "b": {"deployments": [same]}})

    message = load_error(path)

    assert "models.b.deployments.0.name: duplicate deployment name 'same'" in message


def test_fallback_to_an_unknown_alias_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\.a\.fallbacks: unknown alias 'ghost'"):
        chain_catalog(tmp_path, {"a": ["ghost"]})


@pytest.mark.parametrize(
    ("fallbacks", "loop"),
    [
        ({"a": ["a"]}, "a -> a"),
        ({"a": ["b"], "b": ["c"], "c": ["a"]}, "a -> b -> c -> a"),
        ({"x": ["a"], "a": ["b"], "b": ["a"]}, "a -> b -> a"),
    ],
)
def test_fallback_cycles_are_refused(
    tmp_path: Path, fallbacks: dict[str, list[str]], loop: str
) -> None:
    with pytest.raises(ConfigError, match=f"fallback cycle {loop}"):
        chain_catalog(tmp_path, fallbacks)


def test_key_env_is_required_except_for_openai_compatible(tmp_path: Path) -> None:
    keyless = deployment(provider="anthropic", api_key_env=None)
    message = load_error(models_yaml(tmp_path, {"m": {"deployments": [keyless]}}))

    local = deployment(provider="openai_compatible", api_key_env=None)
    catalog = load_catalog(models_yaml(tmp_path, {"m": {"deployments": [local]}}), {})

    assert "models.m.deployments.0: api_key_env: required for provider anthropic" in message
    assert catalog.resolve("m").deployments[0].api_key_env is None


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"api_key": "sk-inline-secret"}, "api_key: Extra inputs are not permitted"),
        ({"input_per_mtok": -1}, "input_per_mtok"),
        ({"timeout": 0}, "timeout"),
        ({"api_base": "api.openai.com"}, "api_base"),
        ({"api_key_env": "sk-inline-secret"}, "api_key_env"),
    ],
)
def test_bad_deployment_fields_are_named_without_their_values(
    tmp_path: Path, fields: dict[str, Any], where: str
) -> None:
    path = models_yaml(tmp_path, {"m": {"deployments": [deployment(**fields)]}})

    message = load_error(path)

    assert f"models.m.deployments.0.{where}" in message
    assert "sk-inline-secret" not in message


def test_a_deployments_burst_defaults_to_half_a_second_of_its_rpm(tmp_path: Path) -> None:
    # Given deployments with an rpm alone, a small rpm, an explicit burst, and no rpm
    deployments = [
        deployment("busy", rpm=3000),
        deployment("slow", rpm=10),
        deployment("bursty", rpm=3000, burst=500),
        deployment("free"),
    ]
    catalog = load_catalog(models_yaml(tmp_path, {"m": {"deployments": deployments}}), {})

    # Expect half a second's worth (at least one request), the burst as set, and no bucket
    bursts = [d.request_burst for d in catalog.resolve("m").deployments]
    assert bursts == [25, 1, 500, None]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"burst": 10}, "models.m.deployments.0: burst: set rpm too"),
        ({"rpm": 100, "burst": 101}, "models.m.deployments.0: burst: 101 is more than rpm (100)"),
        ({"rpm": 100, "burst": 0}, "models.m.deployments.0.burst: Input should be greater"),
    ],
)
def test_a_burst_without_rpm_or_beyond_a_minute_of_it_is_refused(
    tmp_path: Path, fields: dict[str, Any], reason: str
) -> None:
    path = models_yaml(tmp_path, {"m": {"deployments": [deployment(**fields)]}})

    assert reason in load_error(path)


def test_an_alias_needs_a_deployment(tmp_path: Path) -> None:
    message = load_error(models_yaml(tmp_path, {"m": {"deployments": []}}))

    assert "models.m.deployments:" in message


# --- resolve and chain -------------------------------------------------------------------------


def test_resolve_unknown_alias_raises_unknown_model() -> None:
    with pytest.raises(UnknownModel, match="'gpt-9'") as caught:
        load_catalog(None, {}).resolve("gpt-9")

    assert caught.value.code == "unknown_model"


def test_chain_is_the_alias_then_its_fallbacks_breadth_first_without_repeats(
    tmp_path: Path,
) -> None:
    catalog = chain_catalog(
        tmp_path, {"a": ["b", "c"], "b": ["d", "c"], "c": ["d"], "d": [], "e": []}
    )

    assert catalog.chain("a", None) == ["a", "b", "c", "d"]
    assert catalog.chain("d", None) == ["d"]


def test_an_alias_chain_is_made_once_at_load_and_each_caller_gets_its_own_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A job asks for its chain six times: walking the fallbacks each time cost 10 µs a job.
    catalog = chain_catalog(tmp_path, {"a": ["b", "c"], "b": ["d"], "c": [], "d": []})

    def walked(*_: object) -> list[str]:
        raise AssertionError("the chain was walked again")

    monkeypatch.setattr(Catalog, "_expand", walked)
    chain = catalog.chain("a", None)
    chain.pop(0)  # the router takes a chain's aliases off as it tries them

    assert catalog.chain("a", None) == ["a", "b", "c", "d"]


def test_job_override_replaces_the_alias_fallbacks(tmp_path: Path) -> None:
    catalog = chain_catalog(tmp_path, {"a": ["b"], "b": [], "c": ["b"], "e": []})

    assert catalog.chain("a", ["e"]) == ["a", "e"]
    assert catalog.chain("a", ["c", "a", "c"]) == ["a", "c", "b"]
    assert catalog.chain("a", []) == ["a"]


def test_chain_names_the_first_unknown_alias(tmp_path: Path) -> None:
    catalog = chain_catalog(tmp_path, {"a": [], "b": []})

    with pytest.raises(UnknownModel, match="'nope'"):
        catalog.chain("nope", None)
    with pytest.raises(UnknownModel, match="'ghost1'"):
        catalog.chain("a", ["b", "ghost1", "ghost2"])


# --- numbers a worker can use ------------------------------------------------------------------

DEPLOYMENT_NUMBERS = [
    ("timeout: .inf", "timeout"),
    ("connect_timeout: .inf", "connect_timeout"),
    ("first_byte_timeout: .nan", "first_byte_timeout"),
    ("timeout: 1e9", "timeout"),
    ("breaker: {window: .inf}", "breaker.window"),
    ("breaker: {cooldown: .inf}", "breaker.cooldown"),
    ("breaker: {ratio: .nan}", "breaker.ratio"),
    ("retry: {max_delay: .inf}", "retry.max_delay"),
    ("retry: {base_delay: 1e300}", "retry.base_delay"),
    ("input_per_mtok: 1e300", "input_per_mtok"),
    ("output_per_mtok: .inf", "output_per_mtok"),
    ("cached_input_per_mtok: .nan", "cached_input_per_mtok"),
    ("cache_write_per_mtok: 10001", "cache_write_per_mtok"),
    ("cache_write_1h_per_mtok: 1e300", "cache_write_1h_per_mtok"),
    (f"rpm: {10**400}", "rpm"),
    (f"tpm: {10**13}", "tpm"),
    (f"weight: {10**400}", "weight"),
    (f"breaker: {{failures: {10**400}}}", "breaker.failures"),
]


@pytest.mark.parametrize(("field", "where"), DEPLOYMENT_NUMBERS)
def test_an_infinite_or_huge_number_in_a_deployment_is_refused_at_load(
    tmp_path: Path, field: str, where: str
) -> None:
    path = catalog_yaml(
        tmp_path,
        f"""
        models:
          m:
            deployments:
              - name: d
                provider: openai
                model: up
                api_base: http://127.0.0.1:9
                api_key_env: KEY
                input_per_mtok: 1
                output_per_mtok: 2
                {field}
        """,
    )

    assert f"models.m.deployments.0.{where}: Input should be" in load_error(path)


@pytest.mark.parametrize(
    ("field", "where"),
    [
        ("rate_limit_pause: .inf", "rate_limit_pause"),
        ("budget: {wait: .inf}", "budget.wait"),
        ("retry: {max_delay: .inf}", "retry.max_delay"),
        ("breaker: {window: 1e12}", "breaker.window"),
    ],
)
def test_an_infinite_or_huge_resilience_setting_is_refused_at_load(
    tmp_path: Path, field: str, where: str
) -> None:
    models = yaml.safe_dump({"models": {"m": {"deployments": [deployment()]}}})
    path = catalog_yaml(tmp_path, f"{models}resilience:\n  {field}\n")

    assert f"resilience.{where}: Input should be" in load_error(path)


def test_the_largest_durations_and_prices_still_load(tmp_path: Path) -> None:
    fields = {
        "timeout": 86_400,
        "input_per_mtok": 10_000,
        "breaker": {"window": 86_400, "cooldown": 86_400},
    }
    path = models_yaml(tmp_path, {"m": {"deployments": [deployment(**fields)]}})
    catalog = load_catalog(path, {})

    [loaded] = catalog.resolve("m").deployments
    assert loaded.timeout == 86_400 and loaded.input_per_mtok == Decimal(10_000)
