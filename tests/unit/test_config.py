"""gateway.yaml and profiles: env expansion, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.profiles import Mode, load_profile
from gateway.config.settings import load_config
from gateway.config.yamlfile import ConfigError, expand_env

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_ENV = {
    "KEYCLOAK_ISSUER": "http://localhost:8888/realms/nextcloud-mcp",
    "MCP_CLIENT_ID": "nextcloud-mcp-server",
    "MCP_CLIENT_SECRET": "s3cret",
    "NEXTCLOUD_URL": "http://localhost:8080",
}


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


MINIMAL = "public_url: http://127.0.0.1:8080\nupstream: {url: http://127.0.0.1:9000/mcp}\nprofile: dev\n"


def test_env_expansion_with_defaults() -> None:
    env = {"A": "x"}
    assert expand_env("${A}-${B:-dflt}-$${A}", where="f: k", env=env) == "x-dflt-${A}"
    with pytest.raises(ConfigError, match=r"f: k: environment variable B is not set"):
        expand_env("${B}", where="f: k", env=env)


def test_env_value_cannot_inject_yaml(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("UP", "http://h:1/mcp}\nprofile: evil")
    path = write(tmp_path, "g.yaml", "public_url: http://127.0.0.1:8080\nupstream: {url: '${UP}'}\nprofile: dev\n")
    cfg = load_config(path).config
    assert cfg.profile == "dev"  # the value stayed a value
    assert cfg.upstream.url == "http://h:1/mcp}\nprofile: evil"


def test_minimal_config_defaults(tmp_path) -> None:
    settings = load_config(write(tmp_path, "g.yaml", MINIMAL))
    cfg = settings.config
    assert cfg.resource == "http://127.0.0.1:8080/mcp"
    assert cfg.policy.engine == "embedded" and cfg.policy.entrypoint == "mcp/gateway/decision"
    assert (settings.bundle_dir / "gateway.rego").is_file()


@pytest.mark.parametrize(
    "text,message",
    [
        (MINIMAL + "listne: {}\n", r"g.yaml: listne: unknown key"),
        (MINIMAL + "listen: {port: eighty}\n", r"g.yaml: listen.port: "),
        ("public_url: http://127.0.0.1:8080\nprofile: dev\n", r"g.yaml: upstream: required key is missing"),
        (MINIMAL + "upstream: {url: ftp://x}\n", r"g.yaml: upstream.url: .*http"),
        (MINIMAL + "policy: {engine: wasmer}\n", r"g.yaml: policy.engine"),
        (MINIMAL + "policy: {engine: opa}\n", r"g.yaml: .*opa_url is required"),
        (MINIMAL + "mcp_path: mcp/\n", r"g.yaml: mcp_path"),
        (MINIMAL + "policy: {bundle: ./nowhere}\n", r"g.yaml: policy.bundle: directory .* does not exist"),
        ("public_url: [\n", r"g.yaml: not valid YAML"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, "g.yaml", text))


@pytest.mark.parametrize("alg", ["none", "HS256"])
def test_profile_refuses_none_and_hmac(tmp_path, alg) -> None:
    path = write(tmp_path, "p.yaml", f"name: p\nissuer: http://idp\njwt: {{algorithms: [{alg}]}}\n")
    with pytest.raises(ConfigError, match=r"p.yaml: jwt.algorithms: .*never accepted"):
        load_profile(str(path), tmp_path, resource="http://gw/mcp", public_url="http://gw")


def test_profile_placeholders_and_policy_view(tmp_path) -> None:
    path = write(
        tmp_path,
        "p.yaml",
        "name: p\nissuer: http://idp\naudience: {accept: ['{resource}', '{public_url}', 'cid'], missing: 'claim:client_id'}\n",
    )
    profile = load_profile(str(path), tmp_path, resource="http://gw/mcp", public_url="http://gw")
    view = profile.policy_view()
    assert view["audience"]["accept"] == ["http://gw/mcp", "http://gw", "cid"]
    assert view["audience"]["missing"] == "claim:client_id"
    assert "client_secret" not in str(view)


def test_profile_exchange_mode_needs_exchange_section(tmp_path) -> None:
    path = write(tmp_path, "p.yaml", "name: p\nissuer: http://idp\nmode: exchange\n")
    with pytest.raises(ConfigError, match=r"p.yaml: .*exchange. section is required"):
        load_profile(str(path), tmp_path, resource="r", public_url="u")


def test_unknown_shipped_profile_lists_the_shipped_ones(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"no shipped profile named 'okta' \(shipped: dev, keycloak, nextcloud-oidc\)"):
        load_profile("okta", tmp_path, resource="r", public_url="u")


def test_shipped_profiles_load(monkeypatch) -> None:
    for k, v in SHIPPED_ENV.items():
        monkeypatch.setenv(k, v)
    kc = load_profile("keycloak", ROOT, resource="http://gw/mcp", public_url="http://gw")
    assert kc.mode is Mode.EXCHANGE and kc.audience.accept == ("nextcloud-mcp-server",)
    assert kc.exchange is not None and kc.exchange.audience == ("nextcloud",) and not kc.exchange.resource
    nc = load_profile("nextcloud-oidc", ROOT, resource="http://gw/mcp", public_url="http://gw")
    assert nc.mode is Mode.PASSTHROUGH and nc.jwt.typ == ("at+jwt",)
    assert nc.audience.accept == ("nextcloud-mcp-server", "http://gw", "http://gw/mcp")


def test_shipped_profile_without_its_variables_names_them(monkeypatch) -> None:
    monkeypatch.delenv("KEYCLOAK_ISSUER", raising=False)
    with pytest.raises(ConfigError, match=r"keycloak.yaml: issuer: environment variable KEYCLOAK_ISSUER is not set"):
        load_profile("keycloak", ROOT, resource="r", public_url="u")
