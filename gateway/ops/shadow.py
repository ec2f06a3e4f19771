"""The shadow policy's side of a decision: the same input decided by the candidate bundle,
logged and counted, never acted on (MCP requests, listings and vault releases alike)."""

from __future__ import annotations

import json
import logging
from typing import Any

from gateway.ops.audit import DecisionRecord
from gateway.ops.metrics import Metrics
from gateway.policy.decision import PolicyEngine, PolicyError

log = logging.getLogger(__name__)


async def compare_shadow(shadow: PolicyEngine, metrics: Metrics, record: DecisionRecord, policy_input: dict[str, Any]) -> None:
    """Evaluate the shadow policy on the same input as `record.result`; log and count, never act."""
    try:
        decided = (await shadow.decide(policy_input)).as_dict()
    except PolicyError as exc:
        metrics.shadow.labels("error").inc()
        log.warning("shadow policy error on decision %s: %s", record.decision_id, exc)
        return
    if decided == record.result:
        metrics.shadow.labels("agree").inc()
        return
    metrics.shadow.labels("disagree").inc()
    record.shadow_result = decided
    log.warning(
        "shadow policy disagrees on decision %s: live=%s shadow=%s",
        record.decision_id, json.dumps(record.result), json.dumps(decided),
    )
