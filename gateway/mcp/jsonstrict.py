"""JSON that two parsers can not read differently: no duplicated keys, bounded depth, no
NaN or Infinity (nor numbers too large to be finite), no lone UTF-16 surrogates.

Used for token headers/payloads and MCP bodies: if the gateway and the upstream could
disagree on which of two `name` keys counts, the policy would judge one tool while the
upstream ran another; `exp: 1e400` would be a token that never expires; a lone surrogate is
text no UTF-8 encoder (the policy engine's, the decision log's) can write.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: a \uD800-\uDFFF escape: the only way a lone surrogate gets into parsed text
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicated key {k[:64]!r}")
        out[k] = v
    return out


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


class StrictDecoder(json.JSONDecoder):
    """json.JSONDecoder that refuses duplicated object keys, NaN/Infinity and infinite numbers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["object_pairs_hook"] = _pairs
        kwargs["parse_constant"] = _constant
        kwargs["parse_float"] = _finite
        super().__init__(*args, **kwargs)


def has_lone_surrogate(raw: bytes, value: Any) -> bool:
    """True if the text parsed from `raw` holds a lone surrogate (walked only when `raw` has
    a surrogate escape at all, so ordinary bodies cost one regex search)."""
    if not _SURROGATE_ESCAPE.search(raw):
        return False
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


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
