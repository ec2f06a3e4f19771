"""Anchored patterns on hostile input: `$` also matches before a final newline, so every
anchored pattern of the gateway ends in \\Z (a value with a trailing newline is not the value)."""

from __future__ import annotations

import pytest


def test_values_that_end_in_a_newline_are_not_accepted_by_anchored_patterns() -> None:
    """A rate, an audience rule and a PKCE challenge: each with a trailing newline is refused."""
    from gateway.config.profiles import AudienceRules
    from gateway.oauth.server import _CHALLENGE
    from gateway.state.quotas import Limit

    with pytest.raises(ValueError):
        Limit.parse("tools/call", "per_subject", "10/minute\n")
    with pytest.raises(ValueError):
        AudienceRules(accept=["a"], missing="reject\n")
    assert _CHALLENGE.match("a" * 43) and not _CHALLENGE.match("a" * 43 + "\n")


def test_a_client_metadata_document_url_with_a_newline_in_its_path_is_refused() -> None:
    from gateway.oauth.clients import _PATH_OK

    assert _PATH_OK.match("/client.json") and not _PATH_OK.match("/client.json\n")
