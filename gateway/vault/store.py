"""Where the vault's grants live: one SQLite file (default), or Redis shared by replicas.

A grant is one user's (issuer, subject) sealed refresh token from one sign-in, with what the
user may see about it (scope, when it was stored and refreshed, which backends used it). Only
`sealed` is secret, and it is ciphertext (gateway/vault/crypto.py). Every write that replaces
a refresh token is a compare-and-swap on the grant's `version`, made while holding the user's
lock, which spans processes and replicas: a single-use refresh token is spent once, and the
rotated one is never overwritten. Uses are counted apart from the grant (an atomic increment),
so noting one never competes with a rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from gateway.config.settings import Vault as VaultConfig
from gateway.config.yamlfile import ConfigError
from gateway.mcp.jsonrpc import Refusal
from gateway.state.redis import RedisConnection


class VaultUnavailable(Refusal):
    def __init__(self, message: str) -> None:
        super().__init__(503, "vault_unavailable", message)


@dataclass(frozen=True)
class Grant:
    issuer: str
    subject: str
    grant_id: str
    kid: str
    sealed: str = field(repr=False)
    scope: str
    created_at: float
    updated_at: float
    version: int = 1
    #: backend id → {"count": n, "last": unix time}; read with the grant, written by `note_use`
    used_by: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def bound_to(self) -> str:
        """What the ciphertext is bound to (AEAD associated data)."""
        return f"{self.issuer}\n{self.subject}\n{self.grant_id}"

    def to_json(self) -> str:
        fields = asdict(self)
        del fields["used_by"]  # kept apart (note_use)
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Grant:
        return cls(**json.loads(raw))


def new_grant_id() -> str:
    return secrets.token_urlsafe(12)


def user_key(issuer: str, subject: str) -> str:
    return hashlib.sha256(f"{issuer}\n{subject}".encode("utf-8", "surrogatepass")).hexdigest()


class VaultStore(Protocol):
    name: str

    async def add(self, grant: Grant) -> None: ...

    async def grants(self, issuer: str, subject: str) -> list[Grant]:
        """The user's grants, newest first."""

    async def swap(self, old: Grant, new: Grant) -> bool:
        """Replace `old` by `new` (version + 1) if nobody changed it since it was read."""

    async def remove(self, grant: Grant) -> bool: ...

    async def note_use(self, issuer: str, subject: str, grant_id: str, backend: str, at: float) -> None:
        """One more use of a grant by `backend` (atomic; never touches the sealed token)."""

    async def all(self) -> list[Grant]: ...

    async def count(self) -> int: ...

    def lock(self, issuer: str, subject: str, timeout: float) -> contextlib.AbstractAsyncContextManager[None]:
        """Held by one release of this user at a time, in every process sharing the store."""

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...


class LockTimeout(Refusal):
    def __init__(self) -> None:
        super().__init__(503, "vault_busy", "another release for this user is still running; try again")


@contextlib.asynccontextmanager
async def _polled(take: Callable[[], Awaitable[bool]], release: Callable[[], Awaitable[Any]], timeout: float) -> AsyncIterator[None]:
    """Held once `take()` succeeds (tried every 50 ms for `timeout` seconds, then LockTimeout)."""
    deadline = time.monotonic() + timeout
    while not await take():
        if time.monotonic() > deadline:
            raise LockTimeout()
        await asyncio.sleep(0.05)
    try:
        yield
    finally:
        await release()


class SqliteVault:
    """One file, WAL mode: readable by several worker processes on one host. Calls run in a
    thread (one connection, serialised) so a slow disk never holds the event loop."""

    name = "sqlite"
    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS grants (
        issuer TEXT NOT NULL, subject TEXT NOT NULL, grant_id TEXT NOT NULL, kid TEXT NOT NULL,
        sealed TEXT NOT NULL, scope TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
        version INTEGER NOT NULL, PRIMARY KEY (issuer, subject, grant_id));
    CREATE TABLE IF NOT EXISTS uses (
        issuer TEXT NOT NULL, subject TEXT NOT NULL, grant_id TEXT NOT NULL, backend TEXT NOT NULL,
        count INTEGER NOT NULL, last REAL NOT NULL, PRIMARY KEY (issuer, subject, grant_id, backend));
    CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self._timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._guard = threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self._timeout, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA secure_delete=ON")  # a removed refresh token's ciphertext is overwritten
            db.executescript(self._SCHEMA)
            self.path.chmod(0o600)
            self._db = db
        return self._db

    async def _run(self, work: Any, *args: Any) -> Any:
        def call() -> Any:
            with self._guard:
                return work(self._connection(), *args)

        try:
            return await asyncio.to_thread(call)
        except sqlite3.Error as exc:
            raise VaultUnavailable(f"the vault's store cannot be used ({type(exc).__name__})") from None

    @staticmethod
    def _values(g: Grant) -> tuple[Any, ...]:
        return (g.issuer, g.subject, g.grant_id, g.kid, g.sealed, g.scope, g.created_at, g.updated_at, g.version)

    @staticmethod
    def _with_uses(db: sqlite3.Connection, where: str, args: tuple[Any, ...], order: str) -> list[Grant]:
        grants = [Grant(*row) for row in db.execute(f"SELECT * FROM grants {where} ORDER BY {order}", args).fetchall()]
        uses: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {}
        for issuer, subject, grant_id, backend, count, last in db.execute(f"SELECT * FROM uses {where}", args).fetchall():
            uses.setdefault((issuer, subject, grant_id), {})[backend] = {"count": count, "last": last}
        return [replace(g, used_by=uses.get((g.issuer, g.subject, g.grant_id), {})) for g in grants]

    async def add(self, grant: Grant) -> None:
        await self._run(lambda db: db.execute("INSERT INTO grants VALUES (?,?,?,?,?,?,?,?,?)", self._values(grant)))

    async def grants(self, issuer: str, subject: str) -> list[Grant]:
        return list(await self._run(self._with_uses, "WHERE issuer=? AND subject=?", (issuer, subject), "created_at DESC"))

    async def note_use(self, issuer: str, subject: str, grant_id: str, backend: str, at: float) -> None:
        await self._run(lambda db: db.execute(
            "INSERT INTO uses VALUES (?,?,?,?,1,?) ON CONFLICT(issuer, subject, grant_id, backend) "
            "DO UPDATE SET count=count+1, last=excluded.last", (issuer, subject, grant_id, backend, at)))

    async def swap(self, old: Grant, new: Grant) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cur = db.execute(
                "UPDATE grants SET kid=?, sealed=?, scope=?, updated_at=?, version=? "
                "WHERE issuer=? AND subject=? AND grant_id=? AND version=?",
                (new.kid, new.sealed, new.scope, new.updated_at, old.version + 1,
                 old.issuer, old.subject, old.grant_id, old.version))
            return cur.rowcount == 1

        return bool(await self._run(work))

    async def remove(self, grant: Grant) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            key = (grant.issuer, grant.subject, grant.grant_id)
            db.execute("DELETE FROM uses WHERE issuer=? AND subject=? AND grant_id=?", key)
            return db.execute("DELETE FROM grants WHERE issuer=? AND subject=? AND grant_id=?", key).rowcount == 1

        return bool(await self._run(work))

    async def all(self) -> list[Grant]:
        return list(await self._run(self._with_uses, "", (), "issuer, subject, created_at"))

    async def count(self) -> int:
        return int((await self._run(lambda db: db.execute("SELECT COUNT(*) FROM grants").fetchone()))[0])

    def lock(self, issuer: str, subject: str, timeout: float) -> contextlib.AbstractAsyncContextManager[None]:
        """A row per user in `locks`, taken when absent or expired (a crashed holder's expires)."""
        name, owner = user_key(issuer, subject), secrets.token_hex(8)

        def take(db: sqlite3.Connection) -> bool:
            now = time.time()
            cur = db.execute(
                "INSERT INTO locks VALUES (?,?,?) ON CONFLICT(name) DO UPDATE SET owner=excluded.owner, "
                "expires=excluded.expires WHERE locks.expires < ?", (name, owner, now + timeout + 30, now))
            return cur.rowcount == 1

        return _polled(lambda: self._run(take),
                       lambda: self._run(lambda db: db.execute("DELETE FROM locks WHERE name=? AND owner=?", (name, owner))), timeout)

    async def ready(self) -> bool:
        try:
            await self._run(lambda db: db.execute("SELECT 1").fetchone())
        except VaultUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)


_SWAP = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return 0 end
if cjson.decode(current)['version'] ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisVault:
    """Shared by replicas: one hash `<prefix>grants` (field `<user>:<grant id>` → the grant as
    JSON), a set of grant ids per user, a hash of use counts per user, swaps by a Lua
    compare-and-set, locks by SET NX PX."""

    name = "redis"

    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self._prefix = prefix
        self._redis = RedisConnection(url, timeout, lambda error: VaultUnavailable(f"the vault's store cannot be reached ({error})"))

    def _field(self, g: Grant) -> str:
        return f"{user_key(g.issuer, g.subject)}:{g.grant_id}"

    async def add(self, grant: Grant) -> None:
        await self._redis.call("hset", self._prefix + "grants", self._field(grant), grant.to_json())
        await self._redis.call("sadd", self._prefix + "user:" + user_key(grant.issuer, grant.subject), grant.grant_id)

    async def grants(self, issuer: str, subject: str) -> list[Grant]:
        user = user_key(issuer, subject)
        ids = await self._redis.call("smembers", self._prefix + "user:" + user)
        if not ids:
            return []
        fields = [f"{user}:{i.decode() if isinstance(i, bytes) else i}" for i in ids]
        raws = await self._redis.call("hmget", self._prefix + "grants", fields)
        uses = await self._uses(user)
        found = [Grant.from_json(r) for r in raws if r]
        found = [replace(g, used_by=uses.get(g.grant_id, {})) for g in found]
        return sorted(found, key=lambda g: g.created_at, reverse=True)

    async def _uses(self, user: str) -> dict[str, dict[str, dict[str, float]]]:
        """grant id → backend → {count, last}, from `<prefix>uses:<user>` (`<grant> <backend> count|last`)."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for name, value in (await self._redis.call("hgetall", self._prefix + "uses:" + user)).items():
            grant_id, _, rest = (name.decode() if isinstance(name, bytes) else name).partition(" ")
            backend, _, what = rest.rpartition(" ")
            out.setdefault(grant_id, {}).setdefault(backend, {"count": 0, "last": 0.0})[what] = float(value)
        return out

    async def note_use(self, issuer: str, subject: str, grant_id: str, backend: str, at: float) -> None:
        key, field = self._prefix + "uses:" + user_key(issuer, subject), f"{grant_id} {backend}"
        await self._redis.call("hincrby", key, f"{field} count", 1)
        await self._redis.call("hset", key, f"{field} last", at)

    async def swap(self, old: Grant, new: Grant) -> bool:
        stored = replace(new, version=old.version + 1)
        done = await self._redis.call("eval", _SWAP, 1, self._prefix + "grants", self._field(old), old.version, stored.to_json())
        return bool(done)

    async def remove(self, grant: Grant) -> bool:
        user = user_key(grant.issuer, grant.subject)
        removed = await self._redis.call("hdel", self._prefix + "grants", self._field(grant))
        await self._redis.call("srem", self._prefix + "user:" + user, grant.grant_id)
        uses = self._prefix + "uses:" + user
        stale = [n for n in await self._redis.call("hkeys", uses)
                 if (n.decode() if isinstance(n, bytes) else n).startswith(grant.grant_id + " ")]
        if stale:
            await self._redis.call("hdel", uses, *stale)
        return bool(removed)

    async def all(self) -> list[Grant]:
        raws = await self._redis.call("hvals", self._prefix + "grants")
        grants = [Grant.from_json(r) for r in raws]
        uses = {user: await self._uses(user) for user in {user_key(g.issuer, g.subject) for g in grants}}
        grants = [replace(g, used_by=uses[user_key(g.issuer, g.subject)].get(g.grant_id, {})) for g in grants]
        return sorted(grants, key=lambda g: (g.issuer, g.subject, g.created_at))

    async def count(self) -> int:
        return int(await self._redis.call("hlen", self._prefix + "grants"))

    def lock(self, issuer: str, subject: str, timeout: float) -> contextlib.AbstractAsyncContextManager[None]:
        """SET NX PX (expires if its holder dies); released only by its owner (a Lua compare-and-delete)."""
        key, owner = self._prefix + "lock:" + user_key(issuer, subject), secrets.token_hex(8)

        async def take() -> bool:
            return bool(await self._redis.call("set", key, owner, nx=True, px=int((timeout + 30) * 1000)))

        return _polled(take, lambda: self._redis.call("eval", _UNLOCK, 1, key, owner), timeout)

    async def ready(self) -> bool:
        return await self._redis.ready()

    async def aclose(self) -> None:
        await self._redis.aclose()


async def current_grant(store: VaultStore, issuer: str, subject: str, grant_id: str) -> Grant | None:
    """The grant as the store holds it now (read under the user's lock: a refresh may have
    rotated its token since it was listed), or None once removed."""
    return next((g for g in await store.grants(issuer, subject) if g.grant_id == grant_id), None)


def build_vault_store(config: VaultConfig, base_dir: Path, config_name: str) -> VaultStore:
    """The configured store; an SQLite file that cannot be opened or created stops start-up
    (`file: vault.path: ...`) rather than fail the first sign-in."""
    if config.store == "redis":
        assert config.url is not None  # the config model requires it
        return RedisVault(config.url, config.key_prefix, config.timeout)
    path = Path(config.path)
    store = SqliteVault(path if path.is_absolute() else base_dir / path, config.timeout)
    try:
        store._connection()
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(f"{config_name}: vault.path: cannot open {store.path} ({exc})") from None
    return store
