"""Settings: file + environment, clear errors naming the file and the key, admin key hygiene."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from meterline.config import PlanConfig, UpstreamConfig, load_settings
from meterline.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meterline.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_need_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METERLINE_CONFIG", raising=False)
    settings = load_settings()
    assert settings.database_url == "sqlite:///meterline.db"
    assert settings.credit_value == Decimal("0.01")
    assert settings.admin_key is None


def test_spec_example_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream-secret")
    path = write(
        tmp_path,
        """
database_url = "sqlite:///meterline.db"
currency = "USD"
credit_value = "0.01"

[[upstreams]]
name = "openai"
provider = "openai"
base_url = "https://api.openai.com/v1"
api_key = "${OPENAI_API_KEY}"
models = ["*"]

[plans.free]
daily_tokens = 50000
overage = "block"

[prices."my-finetune"]
input = "0.30"
output = "1.20"
cache_read = "0.03"
cache_write = "0.375"
""",
    )
    settings = load_settings(path)
    assert settings.upstreams[0].api_key is not None
    assert settings.upstreams[0].api_key.get_secret_value() == "sk-upstream-secret"
    assert "sk-upstream-secret" not in repr(settings)
    assert settings.prices["my-finetune"].cache_write == Decimal("0.375")
    assert settings.plans["free"].daily_tokens == 50000


def test_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'database_url = "sqlite:///from-file.db"\n')
    monkeypatch.setenv("METERLINE_DATABASE_URL", "sqlite:///from-env.db")
    assert load_settings(path).database_url == "sqlite:///from-env.db"
    monkeypatch.setenv("METERLINE_CONFIG", str(path))
    monkeypatch.delenv("METERLINE_DATABASE_URL")
    assert load_settings().database_url == "sqlite:///from-file.db"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("database_url = \n", "not valid TOML"),
        ("credit_value = 0.01\n", "credit_value"),
        ('credit_value = "-1"\n', "credit_value: credit_value must be greater than 0"),
        ('currency = "usd"\n', "currency"),
        ('database_url = "mysql://x"\n', "database_url"),
        ('colour = "red"\n', "colour"),
        ("[prices.m]\ninput = 0.3\n", "prices.m.input"),
        ('[prices.m]\ninput = "-1"\n', "prices.m.input"),
        ("[plans.free]\nrpm = -5\n", "plans.free.rpm"),
        ('[plans.free]\noverage = "maybe"\n', "plans.free.overage"),
        ('[[upstreams]]\nname = "x"\n', "upstreams.0.base_url"),
        (
            '[[upstreams]]\nname = "x"\nbase_url = "http://h"\napi_key = "${NOT_SET_ANYWHERE}"\n',
            "NOT_SET_ANYWHERE",
        ),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "meterline.toml" in caught.value.message
    assert expected in caught.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


@pytest.mark.parametrize("key", ["admin", "changeme", "ChangeMe", "password", "sk-1234", "short-key"])
def test_known_default_or_weak_admin_keys_are_refused(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ADMIN_KEY", key)
    with pytest.raises(ConfigError, match="admin_key"):
        load_settings()


def test_a_strong_admin_key_is_accepted_and_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLINE_ADMIN_KEY", "ml_admin_9f8e7d6c5b4a39281706")
    settings = load_settings()
    assert settings.admin_key is not None
    assert "9f8e7d6c5b4a" not in repr(settings)


README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented_in_the_readme() -> None:
    """An operator learns the settings from the README: each one is named there, as `name` in the text or
    as a key of the example files (``name = …``, ``[name]``, ``[[name]]``, ``[name.…]``)."""
    from meterline.config import Settings

    text = README.read_text(encoding="utf-8")
    missing = [
        name
        for name in Settings.model_fields
        if f"`{name}`" not in text
        and f"`{name} =" not in text
        and re.search(rf"^\s*(\[\[?{name}[\].]|{name}\s*=)", text, re.MULTILINE) is None
    ]
    assert missing == [], f"settings not documented in README.md: {', '.join(missing)}"


@pytest.mark.parametrize("name", ["upgrade_url", "referral_url"])
def test_the_dashboards_button_urls_are_web_addresses_or_paths_of_this_server(name: str) -> None:
    for good in ("https://example.com/pricing?plan=pro", "http://billing.internal/plans", "/pricing"):
        assert getattr(load_settings(**{name: good}), name) == good
    for bad in (
        "javascript:alert(1)",
        "//evil.example/x",
        "/\\evil.example",
        "https://",
        "ftp://x/y",
        "pricing",
    ):
        option = name.replace("_", "-")
        with pytest.raises(ConfigError, match=rf"{name} \(from --{option}\): must be an http"):
            load_settings(**{name: bad})


def test_every_plan_setting_is_documented() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    for name in PlanConfig.model_fields:
        assert f"`{name}" in readme or f"\n{name} = " in readme, f"plan setting {name} is not in README.md"


def _readme_upstreams() -> str:
    """The README's TOML example of upstreams with ``api``, ``query``, ``headers`` and ``aliases``."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]]
    (block,) = [b for b in blocks if 'api = "azure"' in b]
    return block


def test_readme_upstream_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-secret-key")
    monkeypatch.setenv("TEAM_TOKEN", "team-secret-token")
    azure, proxied = load_settings(write(tmp_path, _readme_upstreams())).upstreams
    assert azure.wire_api == "openai"
    assert azure.query == {"api-version": "2024-10-21"}
    assert azure.models == ("gpt-4o", "text-embedding-3-large")  # the aliases' models by default
    # A query string in base_url is kept as query, to come after the path.
    assert (proxied.base_url, proxied.query) == ("https://llm-proxy.internal/v1", {"tenant": "acme"})
    assert proxied.headers["X-Team"].get_secret_value() == "team-secret-token"
    assert "team-secret-token" not in repr(proxied)


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ('api = "azure"\n', "api-version"),
        ('models = ["gpt-4o-mini"]\naliases = { "gpt-4o" = "dep" }\n', "does not serve: gpt-4o"),
        ('aliases = { "gpt-*" = "dep" }\n', "not patterns"),
        ('headers = { "Bad Header" = "x" }\n', "valid HTTP header name"),
        ('headers = { "Content-Type" = "text/plain" }\n', "set by the gateway"),
        ('headers = { "X-A" = "a\\r\\nX-B: b" }\n', "line break"),
    ],
)
def test_bad_upstream_settings_say_what_to_fix(tmp_path: Path, upstream: str, expected: str) -> None:
    path = write(tmp_path, f'[[upstreams]]\nname = "u"\nbase_url = "https://h/v1"\n{upstream}')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "upstreams.0" in caught.value.message
    assert expected in caught.value.message


def test_every_upstream_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    undocumented = [
        name
        for name in UpstreamConfig.model_fields
        if f"\n{name} = " not in readme and f"# {name} = " not in readme and f"`{name}`" not in readme
    ]
    assert undocumented == []


@pytest.mark.parametrize("value", [" Bearer x", "Bearer x\n", "Bearer\tx"])
def test_otel_header_values_with_spaces_or_control_characters_are_refused_by_name(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(otel_endpoint="http://collector:4318", otel_headers={"Authorization": value})
    assert "Authorization" in str(refused.value)
    assert value.strip() not in str(refused.value)  # the secret itself is never repeated


def test_a_minute_limit_that_would_not_block_is_refused(tmp_path: Path) -> None:
    limit = '{ meter = "calls", window = "minute", max = 5, policy = "overage" }'
    with pytest.raises(ConfigError, match="always blocks"):
        load_settings(write(tmp_path, f"[plans.p]\nlimits = [{limit}]\n"))
