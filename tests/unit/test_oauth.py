"""The authorization server's pure parts: redirect rules, metadata validation, sealing, limits."""

from __future__ import annotations

import pytest

from gateway.oauth.clients import (
    OAuthError,
    _address_allowed,
    check_redirect_uri,
    client_from_metadata,
    redirect_matches,
)
from gateway.oauth.server import single_params, with_query
from gateway.oauth.store import MemoryStore, key_of, seal, unseal
from gateway.state.ratelimit import RateLimiter


@pytest.mark.parametrize("uri", [
    "https://app.example/cb", "http://127.0.0.1:33418/oauth/callback", "http://localhost:8000/cb", "http://[::1]:9/cb",
    "https://app.example/cb?x=1",
])
def test_acceptable_redirect_uris(uri: str) -> None:
    assert check_redirect_uri(uri) == uri


@pytest.mark.parametrize("uri", [
    "http://app.example/cb", "https://app.example/cb#f", "https://*.example/cb", "https://app.example/*", "javascript:x",
    "data:text/html,x", "https://u:p@app.example/cb", "https:///cb", "", "https://app.example/c b", "http://127.0.0.1.evil.example/cb",
    "http://127.0.0.1:99999/cb", 42, None, "https://app.example/" + "a" * 3000,
])
def test_refused_redirect_uris(uri: object) -> None:
    with pytest.raises(OAuthError) as exc:
        check_redirect_uri(uri)
    assert exc.value.error == "invalid_redirect_uri"


@pytest.mark.parametrize("registered,requested,ok", [
    ("https://app.example/cb", "https://app.example/cb", True),
    ("https://app.example/cb", "https://app.example/cb/", False),
    ("https://app.example/cb", "https://app.example:444/cb", False),  # only loopback ports float
    ("http://127.0.0.1/cb", "http://127.0.0.1:5555/cb", True),
    ("http://127.0.0.1:4000/cb", "http://127.0.0.1:5555/cb", True),
    ("http://localhost:4000/cb", "http://127.0.0.1:4000/cb", False),  # another host
    ("http://127.0.0.1:4000/cb", "http://127.0.0.1:4000/cb2", False),
    ("http://127.0.0.1:4000/cb", "http://127.0.0.1:4000/cb?x=1", False),
    ("http://127.0.0.1:4000/cb", "http://127.0.0.1:bad/cb", False),
])
def test_redirect_matching(registered: str, requested: str, ok: bool) -> None:
    assert redirect_matches(registered, requested) is ok


def test_registration_defaults_and_secret_hashing() -> None:
    client, secret = client_from_metadata({"redirect_uris": ["https://app.example/cb"]}, client_id="c1", kind="registered")
    assert client.auth_method == "client_secret_basic" and secret and client.secret_hash != secret
    assert client.secret_matches(secret) and not client.secret_matches(secret + "x") and not client.secret_matches(None)
    public, none = client_from_metadata({"redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "none"},
                                        client_id="c2", kind="registered")
    assert none is None and public.secret_hash is None and not public.secret_matches("")


def test_metadata_documents_must_be_public_clients() -> None:
    with pytest.raises(OAuthError):
        client_from_metadata({"redirect_uris": ["https://a.example/cb"], "token_endpoint_auth_method": "client_secret_basic"},
                             client_id="https://a.example/c", kind="metadata_document")


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.1.1", False), ("169.254.169.254", False),
    ("::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False), ("0.0.0.0", False), ("100.64.0.1", False), ("2606:4700::1", True),
])
def test_only_public_addresses_for_metadata_documents(address: str, public: bool) -> None:
    assert _address_allowed(address, allow_private=False) is public


def test_sealed_values_need_their_secret() -> None:
    blob = seal("the-code", "code", {"access_token": "at"})
    assert "at" not in blob
    assert unseal("the-code", "code", blob) == {"access_token": "at"}
    assert unseal("another-code", "code", blob) is None
    assert unseal("the-code", "refresh", blob) is None  # bound to its kind too
    assert unseal("the-code", "code", blob[:-4] + "AAAA") is None
    assert key_of("code", "the-code") != key_of("code", "the-cod") and "the-code" not in key_of("code", "the-code")


async def test_take_is_one_time() -> None:
    store = MemoryStore(10)
    await store.put("k", "v", 60)
    assert await store.take("k") == "v" and await store.take("k") is None


def test_parameters_given_twice_are_refused() -> None:
    with pytest.raises(OAuthError):
        single_params([("code", "a"), ("code", "b")])
    assert with_query("https://a.example/cb?x=1", {"code": "c", "state": None}) == "https://a.example/cb?x=1&code=c"


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(per_minute=2)
    assert limiter.allow("a")[0] and limiter.allow("a")[0]
    allowed, retry = limiter.allow("a")
    assert not allowed and 0 < retry <= 30
    assert limiter.allow("b")[0]  # another address is not affected


async def test_an_unreachable_redis_is_a_503_refusal_not_a_crash() -> None:
    """Both Redis-backed stores turn an outage into their own 503 refusal (a closed port here)."""
    from gateway.mcp.sessions import RedisSessionStore, SessionStoreError
    from gateway.oauth.store import RedisStore, StoreUnavailable
    from tests.conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    sessions = RedisSessionStore(url, ttl=60, prefix="t:", timeout=0.5)
    with pytest.raises(SessionStoreError) as exc:
        await sessions.owner("k")
    assert exc.value.status == 503 and exc.value.reason == "session_store_unavailable"
    assert not await sessions.ready()
    await sessions.forget("k")  # forgetting never fails a request
    oauth = RedisStore(url, prefix="t:", timeout=0.5)
    with pytest.raises(StoreUnavailable) as unavailable:
        await oauth.take("k")
    assert unavailable.value.status == 503 and unavailable.value.reason == "oauth_store_unavailable"
    await sessions.aclose()
    await oauth.aclose()
