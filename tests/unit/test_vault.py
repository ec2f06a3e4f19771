"""The vault's parts on their own: keys and sealing, the SQLite store's compare-and-swap and
lock, and the configuration that must stop start-up. (The whole vault, with a real IdP and
real stores, is tests/integration/test_vault.py.)"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.settings import ConfigError, load_config
from gateway.vault.crypto import Keyring, SealError, new_key_entry
from gateway.vault.store import Grant, LockTimeout, SqliteVault

K1 = "k1=" + base64.b64encode(b"1" * 32).decode()
K2 = "k2=" + base64.b64encode(b"2" * 32).decode()


def test_sealed_values_open_only_for_their_grant_and_under_a_known_key() -> None:
    ring = Keyring.parse(f"{K2}, {K1}", "test")
    assert ring.current == "k2" and ring.key_ids == ("k2", "k1")
    kid, blob = ring.seal({"refresh_token": "rt-secret"}, "iss\nalice\ng1")
    assert kid == "k2" and "rt-secret" not in blob
    assert ring.open(kid, blob, "iss\nalice\ng1") == {"refresh_token": "rt-secret"}
    with pytest.raises(SealError):  # copied to another user's row: does not open
        ring.open(kid, blob, "iss\nmallory\ng1")
    tampered = base64.b64encode(bytes([base64.b64decode(blob)[0] ^ 1]) + base64.b64decode(blob)[1:]).decode()
    with pytest.raises(SealError):
        ring.open(kid, tampered, "iss\nalice\ng1")
    with pytest.raises(SealError, match="not among the configured keys"):
        Keyring.parse(K1, "test").open(kid, blob, "iss\nalice\ng1")


@pytest.mark.parametrize("text,message", [
    ("", "no key"),
    ("k1", "is not kid=<base64 key>"),
    ("k1=" + base64.b64encode(b"short").decode(), "must be 32 bytes"),
    ("k1=%%%", "is not base64"),
    (f"{K1},{K1}", "given twice"),
    ("k\n1=abc", "is not kid="),
])
def test_bad_keys_are_refused_without_showing_them(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Keyring.parse(text, "gateway.yaml: vault.keys_env")
    assert message in str(caught.value) and str(caught.value).startswith("gateway.yaml: vault.keys_env: ")
    assert base64.b64encode(b"1" * 32).decode() not in str(caught.value)


def test_new_key_entries_parse() -> None:
    entry = new_key_entry("2026-12")
    assert Keyring.parse(entry, "t").current == "2026-12"
    with pytest.raises(ValueError):
        new_key_entry("bad\n")


def _grant(subject: str = "alice", grant_id: str = "g1", created: float = 1.0) -> Grant:
    return Grant("https://idp", subject, grant_id, "k1", "c2VhbGVk", "notes.read", created, created)


def test_sqlite_store_swaps_only_what_nobody_changed_and_locks_per_user(tmp_path: Path) -> None:
    async def run() -> None:
        store = SqliteVault(tmp_path / "v.db", timeout=2)
        await store.add(_grant())
        await store.add(_grant(grant_id="g2", created=2.0))
        [newest, oldest] = await store.grants("https://idp", "alice")
        assert (newest.grant_id, oldest.grant_id) == ("g2", "g1")
        rotated = Grant(**{**newest.__dict__, "sealed": "bmV3"})
        assert await store.swap(newest, rotated) is True
        assert await store.swap(newest, rotated) is False  # stale version: refused
        assert (await store.grants("https://idp", "alice"))[0].version == 2
        assert await store.count() == 2
        async with store.lock("https://idp", "alice", timeout=5):
            with pytest.raises(LockTimeout):
                async with store.lock("https://idp", "alice", timeout=0.2):
                    pass
            async with store.lock("https://idp", "bob", timeout=0.2):  # another user is not held
                pass
        async with store.lock("https://idp", "alice", timeout=0.2):  # released
            pass
        assert await store.remove(oldest) is True and await store.count() == 1
        await store.aclose()
        assert (tmp_path / "v.db").stat().st_mode & 0o077 == 0  # the file is the gateway's alone

    asyncio.run(run())


@pytest.mark.parametrize("store_kind", ["sqlite", "redis"])
def test_noting_a_use_never_competes_with_a_rotation(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> None:
    """A release reads the grant, refreshes (spending the refresh token at the IdP), then swaps
    in the rotated one. A use noted meanwhile (by another release, on another replica) must
    not make that swap fail: the rotated token would be lost and the grant dead. Uses are
    counted apart from the grant's version."""

    async def run() -> None:
        if store_kind == "redis":
            from gateway.vault.store import RedisVault

            store: Any = RedisVault(request.getfixturevalue("redis_server").url, f"unit-{id(tmp_path)}:", 2)
        else:
            store = SqliteVault(tmp_path / "v.db", timeout=2)
        await store.add(_grant())
        [read] = await store.grants("https://idp", "alice")
        await store.note_use("https://idp", "alice", "g1", "notes-sync", 5.0)
        await store.note_use("https://idp", "alice", "g1", "notes-sync", 6.0)
        assert await store.swap(read, Grant(**{**read.__dict__, "sealed": "cm90YXRlZA=="})) is True
        [after] = await store.grants("https://idp", "alice")
        assert after.sealed == "cm90YXRlZA==" and after.used_by == {"notes-sync": {"count": 2, "last": 6.0}}
        assert [g.used_by for g in await store.all()] == [after.used_by]
        await store.remove(after)
        await store.add(_grant())  # the same id again: no uses left behind
        assert (await store.grants("https://idp", "alice"))[0].used_by == {}
        await store.aclose()

    asyncio.run(run())


def test_key_rotation_waits_for_the_users_lock(tmp_path: Path) -> None:
    """rotate-key swaps sealed tokens: it must hold the user's lock like a release, or it could
    overwrite a token a gateway is rotating at that moment."""
    from gateway.vault.keeper import rotate_keys

    async def run() -> None:
        store = SqliteVault(tmp_path / "v.db", timeout=2)
        old = Keyring.parse(K1, "t")
        kid, sealed = old.seal({"refresh_token": "rt"}, "https://idp\nalice\ng1")
        await store.add(Grant("https://idp", "alice", "g1", kid, sealed, "", 1.0, 1.0))
        both = Keyring.parse(f"{K2},{K1}", "t")
        async with store.lock("https://idp", "alice", timeout=5):  # a release in progress
            with pytest.raises(LockTimeout):
                await rotate_keys(store, both, lock_timeout=0.3)
        assert await rotate_keys(store, both, lock_timeout=1) == (1, 0, [])
        [grant] = await store.grants("https://idp", "alice")
        assert grant.kid == "k2" and both.open(grant.kid, grant.sealed, grant.bound_to) == {"refresh_token": "rt"}
        await store.aclose()

    asyncio.run(run())


def _config(tmp_path: Path, **vault: object) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "public_url": "http://127.0.0.1:8080", "upstream": {"url": "http://127.0.0.1:9/mcp"}, "profile": "dev",
        "authorization_server": {"mode": "proxy"}, "vault": {"enabled": True, **vault}}))
    return path


def test_vault_configuration_that_cannot_be_honoured_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gateway.yaml: vault: .*keys_env or keys_file"):
        load_config(_config(tmp_path))
    with pytest.raises(ConfigError, match=r"vault: .*store: redis needs url"):
        load_config(_config(tmp_path, keys_env="K", store="redis"))
    with pytest.raises(ConfigError, match=r"vault.backends.x.client_secret"):
        load_config(_config(tmp_path, keys_env="K", backends={"x": {"client_secret": "short"}}))
    direct = _config(tmp_path, keys_env="K")
    data = yaml.safe_load(direct.read_text())
    data["authorization_server"] = {"mode": "direct"}
    direct.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"vault.enabled: .*authorization_server.mode: proxy"):
        load_config(direct)


def test_keys_come_from_a_file_beside_the_config_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.config.settings import Vault as VaultConfig

    (tmp_path / "keys").write_text(f"{K2}\n{K1}\n")
    ring = Keyring.from_config(VaultConfig(enabled=False, keys_file="keys"), tmp_path, "gateway.yaml")
    assert ring.key_ids == ("k2", "k1")
    with pytest.raises(ConfigError, match=r"^gateway.yaml: vault.keys_file: cannot read .*missing"):
        Keyring.from_config(VaultConfig(enabled=False, keys_file="missing"), tmp_path, "gateway.yaml")
    monkeypatch.setenv("TEST_KEYS", K1)
    assert Keyring.from_config(VaultConfig(enabled=False, keys_env="TEST_KEYS"), tmp_path, "gateway.yaml").current == "k1"
    monkeypatch.delenv("TEST_KEYS")
    with pytest.raises(ConfigError, match="vault.keys_env: the environment variable TEST_KEYS is not set"):
        Keyring.from_config(VaultConfig(enabled=False, keys_env="TEST_KEYS"), tmp_path, "gateway.yaml")


def test_a_vault_file_that_cannot_be_opened_stops_start_up(tmp_path: Path) -> None:
    from gateway.config.settings import Vault as VaultConfig
    from gateway.vault.store import build_vault_store

    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"^gateway.yaml: vault.path: cannot open .*a-file/vault.db"):
        build_vault_store(VaultConfig(path="a-file/vault.db"), tmp_path, "gateway.yaml")
    (tmp_path / "garbage.db").write_bytes(b"this is not an SQLite database at all" * 100)
    with pytest.raises(ConfigError, match=r"vault.path: cannot open .*garbage.db"):
        build_vault_store(VaultConfig(path="garbage.db"), tmp_path, "gateway.yaml")
