"""The clients of the gateway's authorization server: who they are and where codes may go.

Two ways in, both owned by the gateway and never forwarded to the IdP:
- RFC 7591 dynamic registration (`register`): metadata validated and bounded, a client id
  (and a secret for confidential clients, stored hashed) minted here.
- Client ID Metadata Documents (`MetadataDocuments`): a client id that is an https URL is
  fetched (pinned to a public address, bounded in size and time, no redirects), must name
  itself, and is cached as its HTTP caching headers say.

Redirect URIs: https, or http on a loopback host with any port (RFC 8252 §7.3); no
fragment, no wildcard, no credentials. A registered loopback URI matches the same URI on
any port; everything else matches exactly (RFC 9700 §4.1.3).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway.config.settings import ClientMetadataDocuments, Registration
from gateway.mcp.jsonstrict import StrictDecoder, has_lone_surrogate
from gateway.oauth.store import KeyValueStore, key_of

log = logging.getLogger(__name__)

AUTH_METHODS = ("none", "client_secret_post", "client_secret_basic")
GRANT_TYPES = ("authorization_code", "refresh_token")
LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")
_MAX_URI = 2_000
_MAX_URIS = 10
_TEXT_FIELDS = {"client_name": 200, "client_uri": _MAX_URI, "logo_uri": _MAX_URI, "tos_uri": _MAX_URI,
                "policy_uri": _MAX_URI, "software_id": 200, "software_version": 100, "scope": 2_000}


class OAuthError(Exception):
    """An RFC 6749/7591 error: `error` code, a description safe to show, the HTTP status."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class Client:
    client_id: str
    redirect_uris: tuple[str, ...]
    auth_method: str = "none"
    grant_types: tuple[str, ...] = ("authorization_code",)
    secret_hash: str | None = None
    #: how the client came: "registered" (RFC 7591) or "metadata_document" (CIMD)
    kind: str = "registered"
    metadata: dict[str, Any] = field(default_factory=dict)

    def redirect_allowed(self, uri: str) -> bool:
        return any(redirect_matches(registered, uri) for registered in self.redirect_uris)

    def secret_matches(self, secret: str | None) -> bool:
        if self.secret_hash is None or secret is None:
            return False
        return hmac.compare_digest(self.secret_hash, _hash_secret(secret))

    def to_json(self) -> str:
        return json.dumps({
            "client_id": self.client_id, "redirect_uris": list(self.redirect_uris), "auth_method": self.auth_method,
            "grant_types": list(self.grant_types), "secret_hash": self.secret_hash, "kind": self.kind,
            "metadata": self.metadata,
        })

    @classmethod
    def from_json(cls, raw: str) -> Client:
        data = json.loads(raw)
        return cls(client_id=data["client_id"], redirect_uris=tuple(data["redirect_uris"]), auth_method=data["auth_method"],
                   grant_types=tuple(data["grant_types"]), secret_hash=data.get("secret_hash"), kind=data.get("kind", "registered"),
                   metadata=data.get("metadata") or {})


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


def check_redirect_uri(value: Any) -> str:
    """A redirect URI the gateway will send codes to, or OAuthError(invalid_redirect_uri)."""
    bad = OAuthError("invalid_redirect_uri", "redirect URIs must be https, or http on a loopback address, without fragment or wildcard")
    if not isinstance(value, str) or not value or len(value) > _MAX_URI or any(c in value for c in "*\\ \t\r\n\x00"):
        raise bad
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise bad from None
    if parts.fragment or "#" in value or parts.username is not None or parts.password is not None or not host:
        raise bad
    if parts.scheme == "https" or (parts.scheme == "http" and _is_loopback(host)):
        return value
    raise bad


def redirect_matches(registered: str, requested: str) -> bool:
    """Exact match; a loopback http URI also matches on any port (RFC 8252 §7.3)."""
    if registered == requested:
        return True
    try:
        a, b = urlsplit(registered), urlsplit(requested)
        if a.scheme != "http" or b.scheme != "http" or not _is_loopback(a.hostname or "") or a.hostname != b.hostname:
            return False
        b.port  # noqa: B018 - a malformed port never matches
    except ValueError:
        return False
    strip = lambda p: urlunsplit((p.scheme, p.hostname or "", p.path, p.query, ""))  # noqa: E731
    return strip(a) == strip(b)


def _strings(value: Any, name: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise OAuthError("invalid_client_metadata", f"{name} must be a non-empty list of strings")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise OAuthError("invalid_client_metadata", f"{name}: not supported here: {', '.join(unknown)[:200]}")
    return tuple(dict.fromkeys(value))


def client_from_metadata(data: Any, *, client_id: str, kind: str) -> tuple[Client, str | None]:
    """Validate RFC 7591 client metadata; (the client, its new secret if confidential)."""
    if not isinstance(data, dict):
        raise OAuthError("invalid_client_metadata", "the client metadata must be a JSON object")
    uris = data.get("redirect_uris")
    if not isinstance(uris, list) or not uris or len(uris) > _MAX_URIS:
        raise OAuthError("invalid_redirect_uri", f"redirect_uris must list 1 to {_MAX_URIS} URIs")
    redirect_uris = tuple(check_redirect_uri(u) for u in uris)
    method = data.get("token_endpoint_auth_method", "client_secret_basic" if kind == "registered" else "none")
    if method not in AUTH_METHODS or (kind == "metadata_document" and method != "none"):
        allowed = "none" if kind == "metadata_document" else ", ".join(AUTH_METHODS)
        raise OAuthError("invalid_client_metadata", f"token_endpoint_auth_method must be one of: {allowed}")
    grants = _strings(data.get("grant_types", ["authorization_code"]), "grant_types", GRANT_TYPES)
    if "authorization_code" not in grants:
        raise OAuthError("invalid_client_metadata", "grant_types must include authorization_code")
    _strings(data.get("response_types", ["code"]), "response_types", ("code",))
    kept: dict[str, Any] = {}
    for name, limit in _TEXT_FIELDS.items():
        if name in data:
            if not isinstance(data[name], str) or len(data[name]) > limit:
                raise OAuthError("invalid_client_metadata", f"{name} must be a string of at most {limit} characters")
            kept[name] = data[name]
    if "application_type" in data:
        if data["application_type"] not in ("web", "native"):
            raise OAuthError("invalid_client_metadata", "application_type must be web or native")
        kept["application_type"] = data["application_type"]
    secret = secrets.token_urlsafe(32) if method != "none" else None
    client = Client(
        client_id=client_id, redirect_uris=redirect_uris, auth_method=method, grant_types=grants,
        secret_hash=_hash_secret(secret) if secret else None, kind=kind, metadata=kept,
    )
    return client, secret


def registration_response(client: Client, secret: str | None, issued_at: int) -> dict[str, Any]:
    """RFC 7591 §3.2.1: everything registered, plus the credentials minted."""
    body: dict[str, Any] = {
        **client.metadata,
        "client_id": client.client_id,
        "client_id_issued_at": issued_at,
        "redirect_uris": list(client.redirect_uris),
        "token_endpoint_auth_method": client.auth_method,
        "grant_types": list(client.grant_types),
        "response_types": ["code"],
    }
    if secret is not None:
        body |= {"client_secret": secret, "client_secret_expires_at": 0}
    return body


class Registry:
    """Registered clients in the store, and metadata-document clients fetched on demand."""

    def __init__(self, store: KeyValueStore, registration: Registration, documents: MetadataDocuments | None) -> None:
        self._store = store
        self._registration = registration
        self._documents = documents

    @property
    def documents_enabled(self) -> bool:
        return self._documents is not None

    async def register(self, body: bytes) -> dict[str, Any]:
        if len(body) > self._registration.max_bytes:
            raise OAuthError("invalid_client_metadata", f"the registration request is larger than {self._registration.max_bytes} bytes")
        try:  # strict, as every JSON the gateway reads from outside: no key twice, no NaN, no lone surrogate
            data = json.loads(body, cls=StrictDecoder)
            if has_lone_surrogate(body, data):
                raise ValueError("a lone surrogate")
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise OAuthError("invalid_client_metadata", "the registration request is not strict JSON (a key given twice, NaN, "
                             "invalid text)") from None
        client, secret = client_from_metadata(data, client_id=secrets.token_urlsafe(24), kind="registered")
        await self._store.put(key_of("client", client.client_id), client.to_json(), self._registration.ttl)
        return registration_response(client, secret, int(time.time()))

    async def find(self, client_id: str) -> Client | None:
        """The client, or None when unknown (a metadata document that fails is an OAuthError)."""
        if not client_id or len(client_id) > _MAX_URI:
            return None
        if client_id.startswith(("https://", "http://")):
            if self._documents is None:
                return None
            return await self._documents.client(client_id)
        raw = await self._store.get(key_of("client", client_id))
        if raw is None:
            return None
        try:
            return Client.from_json(raw)
        except (ValueError, KeyError, TypeError):
            log.error("registration %s… is malformed in the store; treated as unknown", client_id[:8])
            return None


# --- Client ID Metadata Documents ---------------------------------------------------------

_PATH_OK = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*\Z")


def _address_allowed(address: str, allow_private: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if allow_private:
        return not (ip.is_multicast or ip.is_unspecified)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback or ip.is_private)


class MetadataDocuments:
    """Fetches and caches Client ID Metadata Documents (bounded, pinned, no redirects)."""

    def __init__(self, config: ClientMetadataDocuments, *, max_entries: int = 1_000) -> None:
        self._config = config
        self._cache: OrderedDict[str, tuple[Client | OAuthError, float]] = OrderedDict()
        self._max = max_entries
        self._inflight: dict[str, asyncio.Future[tuple[Client | OAuthError, float]]] = {}
        self.fetches = 0

    def _check_url(self, url: str) -> tuple[str, str, int]:
        bad = OAuthError("invalid_client", "the client_id URL is not an acceptable metadata document URL")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise bad from None
        schemes = ("https", "http") if self._config.allow_http else ("https",)
        if (parts.scheme not in schemes or not parts.hostname or parts.username is not None or parts.password is not None
                or parts.fragment or "#" in url or not parts.path or parts.path == "/" or not _PATH_OK.match(parts.path)
                or any(seg in (".", "..") for seg in parts.path.split("/"))):
            raise bad
        return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)

    async def client(self, url: str) -> Client:
        cached = self._cache.get(url)
        if cached is not None and cached[1] > time.monotonic():
            self._cache.move_to_end(url)
            found = cached[0]
        else:
            # one fetch per URL at a time, whoever asks (no amplification by parallel requests)
            future = self._inflight.get(url)
            if future is None:
                future = asyncio.get_running_loop().create_future()
                self._inflight[url] = future
                try:
                    result = await self._fetch(url)
                    future.set_result(result)
                except BaseException as exc:  # noqa: BLE001 - handed to every waiter
                    future.set_exception(exc)
                    raise
                finally:
                    self._inflight.pop(url, None)
            found, ttl = await asyncio.shield(future)
            self._cache[url] = (found, time.monotonic() + ttl)
            self._cache.move_to_end(url)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if isinstance(found, OAuthError):
            raise found
        return found

    async def _fetch(self, url: str) -> tuple[Client | OAuthError, float]:
        """(client or the error to repeat, seconds to keep it); failures are kept a minute."""
        self.fetches += 1
        try:
            scheme, host, port = self._check_url(url)
            async with asyncio.timeout(self._config.timeout):
                address = await self._resolve(host, port)
                body, max_age = await self._get(url, scheme, host, port, address)
            data = json.loads(body, cls=StrictDecoder)
            if has_lone_surrogate(body, data):
                raise ValueError("a lone surrogate")
            if not isinstance(data, dict) or data.get("client_id") != url:
                raise OAuthError("invalid_client", "the metadata document's client_id is not its own URL")
            client, _ = client_from_metadata(data, client_id=url, kind="metadata_document")
        except OAuthError as exc:
            log.warning("client metadata document %s refused: %s", url[:200], exc.description)
            return exc, 60.0
        except TimeoutError:
            log.warning("client metadata document %s: no answer within %ss", url[:200], self._config.timeout)
            return OAuthError("invalid_client", "the client metadata document could not be fetched in time"), 60.0
        except (httpx.HTTPError, OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("client metadata document %s: %s", url[:200], type(exc).__name__)
            return OAuthError("invalid_client", "the client metadata document could not be fetched"), 60.0
        return client, max_age

    async def _resolve(self, host: str, port: int) -> str:
        """One address to connect to; every address the name has must be allowed (no rebinding)."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        if not addresses or not all(_address_allowed(a, self._config.allow_private_addresses) for a in addresses):
            raise OAuthError("invalid_client", "the client metadata document's host is not a public address")
        return addresses[0]

    async def _get(self, url: str, scheme: str, host: str, port: int, address: str) -> tuple[bytes, float]:
        parts = urlsplit(url)
        ip_host = f"[{address}]" if ":" in address else address
        pinned = urlunsplit((scheme, f"{ip_host}:{port}", parts.path, parts.query, ""))
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "application/json"}
        extensions = {"sni_hostname": host} if scheme == "https" else {}
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self._config.timeout) as http:
            async with http.stream("GET", pinned, headers=headers, extensions=extensions) as resp:
                if resp.status_code != 200:
                    raise OAuthError("invalid_client", f"the client metadata document answered {resp.status_code} (redirects are not followed)")
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self._config.max_bytes:
                    raise OAuthError("invalid_client", "the client metadata document is too large")
                chunks, size = [], 0
                async for chunk in resp.aiter_raw():
                    size += len(chunk)
                    if size > self._config.max_bytes:
                        raise OAuthError("invalid_client", "the client metadata document is too large")
                    chunks.append(chunk)
                return b"".join(chunks), self._max_age(resp.headers.get("cache-control", ""))

    def _max_age(self, cache_control: str) -> float:
        directives = {d.strip().split("=", 1)[0].lower(): d.strip().partition("=")[2] for d in cache_control.split(",") if d.strip()}
        if "no-store" in directives or "no-cache" in directives:
            return 0.0
        value = directives.get("max-age", "").strip('"')
        if value.isdigit():
            return min(float(value), self._config.max_cache_seconds)
        return min(self._config.default_cache_seconds, self._config.max_cache_seconds)
