"""Where a bundle's WebAssembly comes from: shipped, cached, or built with `opa`.

The module depends only on the bundle's Rego (its data is given to each instance at run
time), so it is keyed by a digest of the policy modules and the entrypoint:
1. the shipped policies come pre-built (`gateway/policy/shipped/`), so a plain `pip install`
   runs them in WebAssembly with no `opa` binary;
2. a module built before is read from the cache (`$XDG_CACHE_HOME/mcp-authz-gateway/wasm/`);
3. otherwise `opa build -t wasm` builds it when an `opa` binary is found (`$OPA_BIN`, then
   `opa` on the PATH).
None of them: `WasmUnavailable`, and the embedded engine falls back to regopy, saying so.

`python -m gateway.policy.wasmbuild` rebuilds the shipped module (maintainers, after editing
`policies/`); a unit test fails while the shipped module is older than the Rego.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from gateway.policy.bundle import Bundle

SHIPPED = Path(__file__).resolve().parent / "shipped"


class WasmUnavailable(Exception):
    """No WebAssembly module can be had for this bundle (the reason says why)."""


def rego_digest(bundle: Bundle, entrypoint: str) -> str:
    h = hashlib.sha256(entrypoint.encode())
    for name, text in sorted(bundle.policy_modules().items()):
        h.update(b"\0" + name.encode() + b"\0" + text.encode())
    return h.hexdigest()


def find_opa() -> str | None:
    for candidate in (os.environ.get("OPA_BIN"), shutil.which("opa")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mcp-authz-gateway" / "wasm"


def build_with_opa(opa: str, bundle: Bundle, entrypoint: str, timeout: float = 120) -> bytes:
    """`opa build -t wasm` of the bundle's policy modules (no tests, no data) → policy.wasm."""
    with tempfile.TemporaryDirectory(prefix="mcp-gateway-wasm-") as tmp:
        src = Path(tmp) / "src"
        for name, text in bundle.policy_modules().items():
            path = src / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        out = Path(tmp) / "bundle.tar.gz"
        done = subprocess.run([opa, "build", "-t", "wasm", "-e", entrypoint, "-o", str(out), str(src)],
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise WasmUnavailable(f"opa build -t wasm failed: {(done.stderr or done.stdout).strip()[:1000]}")
        with tarfile.open(out) as tar:
            member = next((m for m in tar.getmembers() if m.name.lstrip("/") == "policy.wasm"), None)
            if member is None:
                raise WasmUnavailable("opa build produced no policy.wasm")
            extracted = tar.extractfile(member)
            assert extracted is not None
            return extracted.read()


def wasm_for(bundle: Bundle, entrypoint: str) -> tuple[bytes, str]:
    """(module, where it came from: shipped | cache | opa); raises WasmUnavailable."""
    digest = rego_digest(bundle, entrypoint)
    manifest = SHIPPED / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("digest") == digest:
        return (SHIPPED / "policy.wasm").read_bytes(), "shipped"
    cached = _cache_dir() / f"{digest}.wasm"
    if cached.is_file():
        return cached.read_bytes(), "cache"
    opa = find_opa()
    if opa is None:
        raise WasmUnavailable("the bundle is not the shipped one and no opa binary was found to compile it (set OPA_BIN)")
    wasm = build_with_opa(opa, bundle, entrypoint)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(wasm)
        tmp.replace(cached)
    except OSError:
        pass  # a read-only home: rebuilt next start
    return wasm, "opa"


def ship(policies: Path, entrypoint: str = "mcp/gateway/decision") -> None:
    """Rebuild `gateway/policy/shipped/` from `policies` with the opa binary found."""
    from gateway.policy.bundle import load_bundle

    opa = find_opa()
    if opa is None:
        raise SystemExit("no opa binary: set OPA_BIN")
    bundle = load_bundle(policies)
    wasm = build_with_opa(opa, bundle, entrypoint)
    version = subprocess.run([opa, "version"], capture_output=True, text=True).stdout.splitlines()[0]
    SHIPPED.mkdir(exist_ok=True)
    (SHIPPED / "policy.wasm").write_bytes(wasm)
    (SHIPPED / "manifest.json").write_text(json.dumps(
        {"digest": rego_digest(bundle, entrypoint), "entrypoint": entrypoint, "built_with": version}, indent=2) + "\n")
    print(f"shipped {len(wasm)} bytes for {entrypoint} ({version})")


if __name__ == "__main__":
    ship(Path(__file__).resolve().parents[2] / "policies")
