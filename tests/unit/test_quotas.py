"""The policy's rate limits, counted: per identity, and never free for a token without a subject."""

from __future__ import annotations

import pytest

from gateway.state.quotas import Exceeded, Limit, MemoryQuotas, Quotas


async def test_a_per_subject_limit_also_counts_a_token_that_names_only_its_client() -> None:
    """Client-credentials tokens carry no subject: a per_subject limit must still bind them (by
    their client), or a machine client escapes every per-user limit. Others are untouched."""
    quotas = Quotas(MemoryQuotas())
    limit = (Limit.parse("tools/call", "per_subject", "2/minute"),)
    await quotas.take(limit, "iss", None, "batch-job")
    await quotas.take(limit, "iss", None, "batch-job")
    with pytest.raises(Exceeded):
        await quotas.take(limit, "iss", None, "batch-job")
    await quotas.take(limit, "iss", None, "other-job")
    await quotas.take(limit, "iss", "alice", "batch-job")  # a user of that client has a bucket of her own
    # a subject named like a client is another identity
    await quotas.take(limit, "iss", "client:batch-job", None)
