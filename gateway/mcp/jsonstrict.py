"""JSON that two parsers can not read differently: no duplicated keys, bounded depth.

Used for token headers/payloads and MCP bodies: if the gateway and the upstream could
disagree on which of two `name` keys counts, the policy would judge one tool while the
upstream ran another.
"""

from __future__ import annotations

import json
from typing import Any


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicated key {k[:64]!r}")
        out[k] = v
    return out


class StrictDecoder(json.JSONDecoder):
    """json.JSONDecoder that refuses duplicated object keys."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["object_pairs_hook"] = _pairs
        super().__init__(*args, **kwargs)


def depth_exceeds(value: Any, limit: int) -> bool:
    """True if arrays/objects nest deeper than `limit` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
