"""The vault's encryption at rest: AES-256-GCM under operator keys that carry key ids.

Keys come as `kid=<base64 of 32 bytes>` entries (commas, spaces or lines between them), from
an environment variable or a file; the first one encrypts, every one decrypts. Rotating is:
put a new key first, run `mcp-authz-gateway vault rotate-key` (every grant re-encrypted under
it), then drop the old key. Each ciphertext is bound to its grant (issuer, subject, grant id as
associated data): a sealed refresh token copied to another user's row does not open.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config.settings import Vault as VaultConfig
from gateway.config.yamlfile import ConfigError

_KID = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")  # \Z, not $: `$` also matches before a final newline


class SealError(Exception):
    """A sealed value does not open: an unknown key id, or it was tampered with."""


class Keyring:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("no key")
        self.current = keys[0][0]
        self._keys = {kid: AESGCM(key) for kid, key in keys}

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    @classmethod
    def parse(cls, text: str, where: str) -> Keyring:
        """`kid=base64` entries; errors say where and what, never a key's bytes."""
        keys: list[tuple[str, bytes]] = []
        for n, entry in enumerate(re.split(r"[\s,]+", text.strip()), 1):
            if not entry:
                continue
            kid, sep, encoded = entry.partition("=")
            if not sep or not _KID.match(kid):
                raise ConfigError(f"{where}: entry {n} is not kid=<base64 key> (kid: letters, digits, '.', '_', '-')")
            try:
                key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_" if "-" in encoded or "_" in encoded else None,
                                       validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"{where}: key {kid} is not base64") from None
            if len(key) != 32:
                raise ConfigError(f"{where}: key {kid} must be 32 bytes (AES-256), it has {len(key)}")
            if any(kid == k for k, _ in keys):
                raise ConfigError(f"{where}: key id {kid} is given twice")
            keys.append((kid, key))
        if not keys:
            raise ConfigError(f"{where}: no key (kid=<base64 of 32 bytes>)")
        return cls(keys)

    @classmethod
    def from_config(cls, config: VaultConfig, base_dir: Path, config_name: str) -> Keyring:
        if config.keys_env:
            where = f"{config_name}: vault.keys_env"
            text = os.environ.get(config.keys_env)
            if not text:
                raise ConfigError(f"{where}: the environment variable {config.keys_env} is not set")
            return cls.parse(text, where)
        assert config.keys_file is not None  # the config model requires one of the two
        path = Path(config.keys_file)
        path = path if path.is_absolute() else base_dir / path
        where = f"{config_name}: vault.keys_file"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path} ({exc.strerror})") from None
        return cls.parse(text, where)

    def seal(self, plaintext: dict[str, str], bound_to: str) -> tuple[str, str]:
        """(key id, base64(nonce + ciphertext)) under the current key."""
        nonce = os.urandom(12)
        sealed = self._keys[self.current].encrypt(nonce, json.dumps(plaintext).encode(), bound_to.encode("utf-8", "surrogatepass"))
        return self.current, base64.b64encode(nonce + sealed).decode()

    def open(self, kid: str, blob: str, bound_to: str) -> dict[str, str]:
        aead = self._keys.get(kid)
        if aead is None:
            raise SealError(f"sealed under key {kid}, which is not among the configured keys")
        try:
            raw = base64.b64decode(blob)
            value = json.loads(aead.decrypt(raw[:12], raw[12:], bound_to.encode("utf-8", "surrogatepass")))
        except (InvalidTag, binascii.Error, ValueError):
            raise SealError("does not open (tampered with, or not this grant's)") from None
        if not isinstance(value, dict):
            raise SealError("does not hold a grant")
        return value


def new_key_entry(kid: str) -> str:
    """A fresh `kid=<base64>` entry (`vault new-key`)."""
    if not _KID.match(kid):
        raise ValueError("kid: letters, digits, '.', '_', '-' (at most 64)")
    return f"{kid}={base64.b64encode(os.urandom(32)).decode()}"
