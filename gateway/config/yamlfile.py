"""Reading the gateway's YAML files: `${VAR}` expansion and typed, file:key-named errors.

Every YAML the gateway reads (gateway.yaml, IdP profiles, policy data) goes through
`load_yaml`, so `${VAR}` and `${VAR:-default}` mean the same thing everywhere.
Expansion runs on parsed string values, never on the raw text, so a variable's value
can not inject YAML structure.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

T = TypeVar("T", bound=pydantic.BaseModel)


class ConfigError(Exception):
    """A file the gateway reads is wrong; the message names the file and the key."""


def expand_env(value: str, *, where: str, env: Mapping[str, str] | None = None) -> str:
    """Replace `${VAR}` / `${VAR:-default}`; `$$` is a literal `$`. Unset without default is an error."""
    env = os.environ if env is None else env

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable {name} is not set (and no ${{{name}:-default}} given)")

    return _VAR.sub(sub, value)


def _expand_tree(node: Any, file: str, path: str, env: Mapping[str, str] | None) -> Any:
    if isinstance(node, str):
        return expand_env(node, where=f"{file}: {path or '<root>'}", env=env)
    if isinstance(node, list):
        return [_expand_tree(v, file, f"{path}[{i}]", env) for i, v in enumerate(node)]
    if isinstance(node, dict):
        return {k: _expand_tree(v, file, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    return node


def load_yaml(path: Path, env: Mapping[str, str] | None = None) -> Any:
    """Parse one YAML file and expand environment variables in its string values."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return _expand_tree(data, str(path), "", env)


def validate(model: type[T], data: Any, file: str | Path) -> T:
    """Turn parsed YAML into a typed model; every problem is reported as `file: key.path: message`."""
    if data is None:
        data = {}
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            else:
                msg = err["msg"].removeprefix("Value error, ")
                # a check across keys names its key first ("workers: ...")
                named, sep, rest = msg.partition(": ")
                if key == "<root>" and sep and named.replace(".", "").replace("_", "").isalnum():
                    key, msg = named, rest
            lines.append(f"{file}: {key}: {msg}")
        raise ConfigError("\n".join(lines)) from None


class Strict(pydantic.BaseModel):
    """Base of every config model: unknown keys are errors, values are immutable."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=False)
