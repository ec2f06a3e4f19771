"""A headless "browser" for the OAuth flows: follows redirects from an authorization URL
until it reaches the client's redirect URI, then (optionally) delivers it there.

The IdP's login and consent pages answer at once for `login_hint` (tests/idp/server.mjs),
so following redirects is what a user clicking through would do. Also runnable as a
command (`python -m tests.support.browser URL`): mcp-remote opens its authorization URL
with `xdg-open`, which the tests point at this module.
"""

from __future__ import annotations

import os
import sys
import time
from urllib.parse import parse_qs, urlsplit

import httpx


def follow(url: str, *, user: str = "alice", stop_at: str | None = None, max_hops: int = 20) -> str:
    """Follow redirects from `url` as user `user`; returns the last URL.

    With `stop_at`, stop (without requesting it) at the first Location that starts with it:
    the client's redirect URI when nothing listens there. Without, follow until an answer
    that is not a redirect: a loopback client's callback server has then received its code.
    """
    if user:  # who signs in at the IdP (none: the IdP's own choice, e.g. `dev --user`)
        url = f"{url}{'&' if urlsplit(url).query else '?'}login_hint={user}"
    with httpx.Client(follow_redirects=False, timeout=20, trust_env=False) as http:
        for _ in range(max_hops):
            resp = _get(http, url)
            location = resp.headers.get("location")
            if resp.status_code not in (301, 302, 303, 307, 308) or not location:
                if stop_at is not None:
                    raise AssertionError(f"no redirect from {urlsplit(url).path}: {resp.status_code} {resp.text[:300]}")
                return url
            url = str(resp.url.join(location))
            if stop_at is not None and url.startswith(stop_at):
                return url
    raise AssertionError("too many redirects")


def _get(http: httpx.Client, url: str) -> httpx.Response:
    """GET; a client's loopback callback server may not listen yet (a person is slower than
    this browser): keep trying it for a few seconds."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return http.get(url)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


if __name__ == "__main__":
    follow(sys.argv[1], user=os.environ.get("TEST_BROWSER_USER", "alice"))
    log = os.environ.get("TEST_BROWSER_LOG")
    if log:
        with open(log, "a") as f:
            f.write(sys.argv[1] + "\n")
