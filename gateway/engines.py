"""Picks the policy engine named in the config (one factory, like toolhive's authorizer registry)."""

from __future__ import annotations

from gateway.config import Settings
from gateway.policy import PolicyEngine, PolicyError
from gateway.policy.bundle import load_bundle
from gateway.policy.embedded import EmbeddedEngine


def build_engine(settings: Settings) -> PolicyEngine:
    policy = settings.config.policy
    if policy.engine == "embedded":
        return EmbeddedEngine(load_bundle(settings.bundle_dir), policy.entrypoint)
    raise PolicyError(f"policy.engine {policy.engine!r} is not available in this build (use embedded)")
