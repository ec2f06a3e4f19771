"""The decision cache: a pure policy's decision, remembered by its canonical input.

A policy may declare itself pure — its decision depends only on the input and the
bundle's data, never on time or the network — and name the input paths it never
reads, beside its entrypoint:

    decision_cache := {"pure": true, "ignore": [["mcp", "id"], ["request", "headers"]]}

Then identical inputs (ignoring those paths) get the same decision without evaluating
again: the key is the SHA-256 of the input's sorted JSON with the ignored paths removed.
The cache is bounded (LRU), belongs to one built gateway (a reload starts an empty
one), and never stores a failure. `policy.decision_cache.enabled: auto` turns it on
only for a policy that declares `pure: true`.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.policy.decision import Decision, PolicyEngine


@dataclass(frozen=True)
class CacheDeclaration:
    pure: bool = False
    ignore: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_value(cls, value: Any) -> CacheDeclaration:
        if not isinstance(value, dict):
            return cls()
        ignore = tuple(
            tuple(path) for path in value.get("ignore", []) if isinstance(path, list) and path and all(isinstance(p, str) for p in path)
        )
        return cls(pure=value.get("pure") is True, ignore=ignore)


#: ignored paths as a tree: {"mcp": {"id": None}, ...}; None marks a path's end
IgnoreTree = dict[str, Any]


def ignore_tree(ignore: tuple[tuple[str, ...], ...]) -> IgnoreTree:
    tree: IgnoreTree = {}
    for path in ignore:
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:  # an enclosing path is ignored already
                break
            node = child
        else:
            node[path[-1]] = None
    return tree


def _pruned(value: dict[str, Any], tree: IgnoreTree) -> dict[str, Any]:
    """`value` without the tree's paths; only the dicts along a path are copied."""
    out = {k: v for k, v in value.items() if k not in tree or tree[k] is not None}
    for key, sub in tree.items():
        if sub is not None and isinstance(out.get(key), dict):
            out[key] = _pruned(out[key], sub)
    return out


def canonical_key(policy_input: dict[str, Any], ignore: tuple[tuple[str, ...], ...] | IgnoreTree) -> bytes:
    tree = ignore if isinstance(ignore, dict) else ignore_tree(ignore)
    pruned = _pruned(policy_input, tree) if tree else policy_input
    try:
        text = orjson.dumps(pruned, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):  # a lone surrogate: the slower, total encoder
        text = json.dumps(pruned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(text).digest()


class CachingEngine:
    """Wraps an engine; answers repeated canonical inputs from an LRU of decisions."""

    def __init__(self, engine: PolicyEngine, declaration: CacheDeclaration, size: int) -> None:
        self.engine = engine
        self.name = engine.name
        self._ignore = ignore_tree(declaration.ignore)
        self._size = size
        self._decisions: OrderedDict[bytes, Decision] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def decide(self, policy_input: dict[str, Any]) -> Decision:
        key = canonical_key(policy_input, self._ignore)
        cached = self._decisions.get(key)
        if cached is not None:
            self.hits += 1
            self._decisions.move_to_end(key)
            return cached
        self.misses += 1
        decision = await self.engine.decide(policy_input)  # a PolicyError is never stored
        self._decisions[key] = decision
        if len(self._decisions) > self._size:
            self._decisions.popitem(last=False)
        return decision

    async def start(self) -> None:
        await self.engine.start()

    async def ready(self) -> bool:
        return await self.engine.ready()

    async def aclose(self) -> None:
        self._decisions.clear()
        await self.engine.aclose()


def uncached(engine: PolicyEngine) -> PolicyEngine:
    """The engine itself, under the decision cache if there is one (for inputs the cache
    should not hold, and for reports of which engine decides)."""
    return engine.engine if isinstance(engine, CachingEngine) else engine
