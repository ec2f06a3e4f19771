"""A policy bundle on disk: Rego modules plus data files, read the way OPA reads a directory.

Data files (`*.json`, `*.yaml`, `*.yml`) are placed under `data` at the path of their
directory relative to the bundle root (the file name does not count), as `opa run DIR`
does, so one bundle means the same to the embedded engine and to a real OPA.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from gateway.config.yamlfile import ConfigError, load_yaml

DATA_SUFFIXES = (".json", ".yaml", ".yml")
#: what data.authz may hold (published beside the code; docs/policy.md documents it)
AUTHZ_SCHEMA = Path(__file__).with_name("authz.schema.json")


@dataclass(frozen=True)
class Bundle:
    """One snapshot of a bundle, read once: what is tested is what is built and served."""

    root: Path
    modules: dict[str, str]  # relative path → Rego text (tests included)
    data: dict[str, Any]
    #: the `.manifest`'s `revision`, as OPA's bundles carry it, if the bundle has one
    manifest_revision: str | None = field(default=None, compare=False)

    def policy_modules(self) -> dict[str, str]:
        """Modules that serve requests (Rego unit tests left out)."""
        return {k: v for k, v in self.modules.items() if not k.endswith("_test.rego")}

    @cached_property
    def digest(self) -> str:
        """SHA-256 of every module (path and text) and of the data: the snapshot's identity."""
        h = hashlib.sha256()
        for name in sorted(self.modules):
            h.update(name.encode() + b"\0" + self.modules[name].encode() + b"\0")
        h.update(json.dumps(self.data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
        return h.hexdigest()

    @property
    def revision(self) -> str:
        """What logs, metrics and /readyz call this snapshot: the manifest's revision and the
        content hash (a manifest revision alone could be left unchanged by an edit)."""
        short = "sha256:" + self.digest[:16]
        return f"{self.manifest_revision} ({short})" if self.manifest_revision else short

    def to_json(self) -> str:
        return json.dumps({"root": str(self.root), "modules": self.modules, "data": self.data,
                           "manifest_revision": self.manifest_revision})

    @classmethod
    def from_json(cls, text: str) -> Bundle:
        raw = json.loads(text)
        return cls(root=Path(raw["root"]), modules=raw["modules"], data=raw["data"], manifest_revision=raw["manifest_revision"])


def _merge(into: dict[str, Any], path: tuple[str, ...], value: Any, where: str) -> None:
    node = into
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: conflicts with other data at {'.'.join(path)}")
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a data file must hold an object")
    for k, v in value.items():
        if k in node and not (isinstance(node[k], dict) and isinstance(v, dict)):
            raise ConfigError(f"{where}: key {k!r} is defined twice in the bundle's data")
        if isinstance(v, dict) and isinstance(node.get(k), dict):
            _merge(node, (k,), v, where)
        else:
            node[k] = v


def _read_data(path: Path, rel: str) -> Any:
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{rel}: not valid JSON: {exc}") from None
    return load_yaml(path)


def merge_data_files(files: tuple[Path, ...], into: dict[str, Any] | None = None,
                     sources: list[str] | None = None) -> dict[str, Any]:
    """Data files merged at the data root (of `into`, or of a new dict), as `opa run BUNDLE
    FILE...` merges them; a key defined twice is a ConfigError naming the file. The result's
    `authz` is checked against its schema (`sources`: the bundle files that also fed it)."""
    data: dict[str, Any] = {} if into is None else into
    sources = list(sources or [])
    for path in files:
        value = _read_data(path, str(path))
        if isinstance(value, dict) and "authz" in value:
            sources.append(str(path))
        _merge(data, (), value if value is not None else {}, str(path))
    check_authz(data, sources)
    return data


def check_authz(data: dict[str, Any], sources: list[str]) -> None:
    """Refuse `data.authz` that does not match its schema, like a syntax error: a rule the
    policy would misread (`scopes: notes.write`, a string) or ignore (`groups:` on an entry)
    must not silently drop a requirement. Every problem is named `file: authz.path: message`."""
    if "authz" not in data:
        return
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(json.loads(AUTHZ_SCHEMA.read_text(encoding="utf-8")))
    problems = sorted(validator.iter_errors(data["authz"]), key=lambda e: [str(p) for p in e.absolute_path])
    if problems:
        where = ", ".join(sources) or "policy data"
        raise ConfigError("\n".join(
            f"{where}: authz{''.join(f'.{p}' if isinstance(p, str) else f'[{p}]' for p in e.absolute_path)}: {e.message}"
            for e in problems
        ))


def load_bundle(root: Path, extra_data: tuple[Path, ...] = ()) -> Bundle:
    """Read every .rego and data file under `root` (hidden directories skipped), then
    `extra_data` files merged at the data root."""
    if not root.is_dir():
        raise ConfigError(f"policy bundle {root} is not a directory")
    modules: dict[str, str] = {}
    data: dict[str, Any] = {}
    authz_sources: list[str] = []
    manifest_revision = _manifest_revision(root / ".manifest")
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix == ".rego":
            modules[str(rel)] = path.read_text(encoding="utf-8")
        elif path.suffix in DATA_SUFFIXES:
            value = _read_data(path, str(rel))
            if rel.parent.parts[:1] == ("authz",) or (not rel.parent.parts and isinstance(value, dict) and "authz" in value):
                authz_sources.append(str(path))
            _merge(data, rel.parent.parts, value if value is not None else {}, str(rel))
    merge_data_files(extra_data, into=data, sources=authz_sources)
    if not any(not k.endswith("_test.rego") for k in modules):
        raise ConfigError(f"policy bundle {root} has no .rego policy module")
    return Bundle(root=root, modules=modules, data=data, manifest_revision=manifest_revision)


def _manifest_revision(path: Path) -> str | None:
    """OPA's bundle `.manifest` `revision` (a string), if the file is there."""
    if not path.is_file():
        return None
    try:
        revision = json.loads(path.read_text(encoding="utf-8")).get("revision")
    except (ValueError, AttributeError):
        raise ConfigError(f"{path}: not a JSON object (an OPA bundle manifest)") from None
    return revision if isinstance(revision, str) and revision else None


@dataclass(frozen=True)
class DeclaredScopes:
    """What the bundle's data.authz says about scopes, for metadata and challenges.

    `supported` (RFC 9728 `scopes_supported`) is every scope a rule names; `initial` is
    what a 401 asks a client for first (`authz.initial_scopes`), so a client starts
    small and steps up. Read from the data, never written a second time in a profile.
    """

    supported: tuple[str, ...] = ()
    initial: tuple[str, ...] = ()

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> DeclaredScopes:
        authz = data.get("authz")
        if not isinstance(authz, dict):
            return cls()
        initial = tuple(s for s in authz.get("initial_scopes", []) if isinstance(s, str))
        found: list[str] = list(initial)
        for catalogue in ("tools", "resources", "prompts"):
            rules = authz.get(catalogue)
            for rule in rules.values() if isinstance(rules, dict) else ():
                scopes = rule.get("scopes", []) if isinstance(rule, dict) else []
                found.extend(s for s in scopes if isinstance(s, str))
        return cls(supported=tuple(dict.fromkeys(found)), initial=initial)
