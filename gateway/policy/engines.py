"""Picks the policy engine named in the config (one factory, like toolhive's authorizer registry).

`embedded` (the default) is OPA's WebAssembly in this process when a module can be had
(shipped, cached, or built with `opa`), else regopy, said loudly at start-up and in
`/readyz`; `wasm` and `regopy` insist on one; `opa` asks a running OPA server.
"""

from __future__ import annotations

import logging

from gateway.config.settings import Settings
from gateway.policy.bundle import Bundle, load_bundle, merge_data_files
from gateway.policy.cache import CacheDeclaration, CachingEngine
from gateway.policy.decision import PolicyEngine, PolicyError
from gateway.policy.embedded import EmbeddedEngine
from gateway.policy.opa import OpaEngine
from gateway.policy.wasm import WasmEngine, WasmPolicy
from gateway.policy.wasmbuild import WasmUnavailable, wasm_for

log = logging.getLogger(__name__)


def build_engine(settings: Settings, bundle: Bundle | None = None) -> PolicyEngine:
    """The configured engine; an in-process one compiles `bundle` (read from disk if not given)."""
    policy = settings.config.policy
    if policy.engine in ("embedded", "wasm", "regopy"):
        return build_local_engine(settings, bundle or load_live_bundle(settings))
    if policy.engine == "opa":
        assert policy.opa_url is not None  # the config model requires it
        expected = merge_data_files(settings.data_files) if settings.data_files else None
        return OpaEngine(policy.opa_url, policy.entrypoint, timeout=policy.timeout, expected_data=expected)
    raise PolicyError(f"policy.engine {policy.engine!r} is not known")


def _wasm_engine(bundle: Bundle, entrypoint: str, *, timeout: float, workers: int, inline_max_bytes: int) -> WasmEngine:
    """OPA's WebAssembly for `bundle`; raises WasmUnavailable or PolicyError when none can be had."""
    wasm, source = wasm_for(bundle, entrypoint)
    engine = WasmEngine(WasmPolicy(wasm, bundle.data, entrypoint), entrypoint, timeout=timeout, workers=workers,
                        inline_max_bytes=inline_max_bytes)
    engine.source = source
    return engine


def build_local_engine(settings: Settings, bundle: Bundle) -> PolicyEngine:
    policy = settings.config.policy
    if policy.engine != "regopy":
        try:
            return _wasm_engine(bundle, policy.entrypoint, timeout=policy.timeout, workers=policy.workers,
                                inline_max_bytes=policy.inline_max_bytes)
        except (WasmUnavailable, PolicyError) as exc:
            if policy.engine == "wasm":
                raise PolicyError(f"policy.engine: wasm: {exc}") from None
            fallback = EmbeddedEngine(bundle, policy.entrypoint)
            fallback.fallback_reason = str(exc)
            log.warning("policy engine: regopy, not WebAssembly (slower, on the event loop): %s", exc)
            return fallback
    return EmbeddedEngine(bundle, policy.entrypoint)


def standalone_engine(bundle: Bundle, entrypoint: str) -> PolicyEngine:
    """An in-process engine for tools that have no gateway.yaml (replay): WebAssembly when a
    module can be had, else regopy."""
    try:
        return _wasm_engine(bundle, entrypoint, timeout=5.0, workers=1, inline_max_bytes=4_096)
    except (WasmUnavailable, PolicyError):
        return EmbeddedEngine(bundle, entrypoint)


def with_decision_cache(engine: PolicyEngine, settings: Settings, bundle: Bundle) -> PolicyEngine:
    """Wrap `engine` in the decision cache when the config and the policy's declaration allow.

    `auto` caches only for the embedded engine (a reload replaces the cache with the
    policy); with a remote OPA, whose policy changes without the gateway knowing, only an
    explicit `enabled: true` does. The declaration (`<package of the entrypoint>.decision_cache`)
    is read from the local bundle.
    """
    policy = settings.config.policy
    if policy.decision_cache.enabled is False:
        return engine
    if policy.decision_cache.enabled == "auto" and not isinstance(engine, (EmbeddedEngine, WasmEngine)):
        # a remote OPA's policy can change under us without a reload: cached decisions could go stale
        return engine
    package = policy.entrypoint.rsplit("/", 1)[0].replace("/", ".")
    reader = engine if isinstance(engine, EmbeddedEngine) else EmbeddedEngine(bundle, policy.entrypoint)
    declaration = CacheDeclaration.from_value(reader.value_of(f"data.{package}.decision_cache"))
    if policy.decision_cache.enabled == "auto" and not declaration.pure:
        return engine
    return CachingEngine(engine, declaration, policy.decision_cache.size)


def load_live_bundle(settings: Settings) -> Bundle:
    return load_bundle(settings.bundle_dir, settings.data_files)
