"""`policy replay`: decide a decision log's inputs again with a candidate bundle, before shipping it.

Every line of the decision log carries the policy input the live policy judged. Replay feeds
each one to the candidate and reports how many decisions change, grouped by what changes
(old → new action and reason) and by tool, with example decision ids to `explain`. What it
cannot replay it counts and says why: a request refused before the policy ran has no input,
and a line whose input was cut to the log's size limit (`input_truncated`) is not the input
that was judged. The log masks a few claims (`access_token`...) and hashes session ids: a
policy reading those sees the masked value here.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.policy.bundle import Bundle
from gateway.policy.decision import PolicyEngine, PolicyError

#: what makes two decisions the same decision for replay (the decision object's own fields)
COMPARED = ("action", "reason", "status", "scopes", "audience", "visible")


@dataclass
class Change:
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class ReplayReport:
    replayed: int = 0
    unchanged: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    #: (old "action/reason", new "action/reason", tool or method) → how many, which
    changes: dict[tuple[str, str, str], Change] = field(default_factory=lambda: defaultdict(Change))
    errors: int = 0

    @property
    def changed(self) -> int:
        return sum(c.count for c in self.changes.values())

    def render(self, bundle: Bundle, examples: int = 3) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        lines = [f"replayed {self.replayed} decisions with {bundle.root} (revision {bundle.revision})"
                 + (f"; skipped {skipped}" if skipped else ""),
                 f"unchanged: {self.unchanged}", f"changed: {self.changed}"]
        for (old, new, what), change in sorted(self.changes.items(), key=lambda kv: -kv[1].count):
            lines.append(f"  {old} -> {new}  {what}  {change.count}  e.g. {', '.join(change.examples[:examples])}")
        if self.errors:
            lines.append(f"policy errors (the candidate could not decide): {self.errors}")
        return "\n".join(lines)


def _summary(result: dict[str, Any] | None) -> str:
    result = result or {}
    return f"{result.get('action')}/{result.get('reason')}"


def _comparable(result: dict[str, Any] | None) -> dict[str, Any]:
    result = result or {}
    out = {k: result.get(k) for k in COMPARED}
    for key in ("scopes", "audience", "visible"):  # order carries no meaning
        if isinstance(out[key], list):
            out[key] = sorted(out[key], key=str)
    return out


async def replay(log_file: Path, engine: PolicyEngine) -> ReplayReport:
    """Decide every replayable line of `log_file` with `engine` and compare."""
    report = ReplayReport()
    with log_file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                report.skipped["lines that are not JSON"] += 1
                continue
            policy_input = entry.get("input")
            if not isinstance(policy_input, dict):
                report.skipped["refused before the policy ran"] += 1
                continue
            if entry.get("input_truncated"):
                report.skipped["inputs truncated in the log"] += 1
                continue
            report.replayed += 1
            decision_id = str(entry.get("decision_id", f"line {number}"))
            mcp = policy_input.get("mcp") if isinstance(policy_input.get("mcp"), dict) else {}
            vault = policy_input.get("vault") if isinstance(policy_input.get("vault"), dict) else None
            if vault is not None:  # a backend's ask of the token vault (POST /vault/token)
                what = f"vault backend={(vault.get('backend') or {}).get('id')}"
            elif mcp.get("tool"):
                what = f"tool={mcp['tool']}"
            else:
                what = f"method={mcp.get('method') or (policy_input.get('request') or {}).get('method')}"
            try:
                new: dict[str, Any] = (await engine.decide(policy_input)).as_dict()
            except PolicyError as exc:
                report.errors += 1
                new = {"action": "error", "reason": exc.reason}
            old = entry.get("result")
            if _comparable(old) == _comparable(new):
                report.unchanged += 1
                continue
            change = report.changes[(_summary(old), _summary(new), what)]
            change.count += 1
            if len(change.examples) < 10:
                change.examples.append(decision_id)
    return report


def replay_sync(log_file: Path, engine: PolicyEngine) -> ReplayReport:
    async def run() -> ReplayReport:
        await engine.start()
        try:
            return await replay(log_file, engine)
        finally:
            await engine.aclose()

    return asyncio.run(run())

