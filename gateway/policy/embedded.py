"""The embedded engine: Rego evaluated in-process by regopy (Microsoft's rego-cpp).

Compiled once (bundle + entrypoint), evaluated per request with the input passed as
JSON text (`set_input_term`; `set_input(dict)` mis-escapes quotes and backslashes).
Any error, an undefined result or a malformed decision raises PolicyError, which the
gateway turns into a refusal. One interpreter is not thread-safe: it is used only from
the event loop thread.
"""

from __future__ import annotations

import json
import re
from typing import Any

import regopy

from gateway.policy.bundle import Bundle
from gateway.policy.decision import Decision, PolicyError


_ERROR_AT = re.compile(r"\(error \d+:(?P<file>[^|\s]+)\|(?P<offset>\d+)\|\d+")
_ERROR_MESSAGE = re.compile(r"\(errormsg \d+:(?P<message>[^)\n]*)\)")


def readable_error(text: str, modules: dict[str, str]) -> str:
    """regopy's compile errors name a module and a byte offset; say `file:line:col: message`,
    as `opa check` does, for each error it lists (the raw text if it cannot be read)."""
    out = []
    for at, message in zip(_ERROR_AT.finditer(text), _ERROR_MESSAGE.finditer(text)):
        name, offset = at.group("file"), int(at.group("offset"))
        source = modules.get(name, "").encode()[:offset].decode("utf-8", "replace")
        line, col = source.count("\n") + 1, len(source.rsplit("\n", 1)[-1]) + 1
        out.append(f"{name}:{line}:{col}: {message.group('message').strip()}")
    return "; ".join(out) if out else text.strip()


def compile_interpreter(modules: dict[str, str], data: dict[str, Any]) -> regopy.Interpreter:
    it = regopy.Interpreter()
    for name, text in modules.items():
        it.add_module(name, text)
    if data:
        it.add_data_json(json.dumps(data))
    return it


def first_value(output: Any) -> Any:
    """The value of a regopy output, or raise PolicyError if it is undefined or failed.

    Never touches `.binding()` on an undefined result: that aborts the process.
    """
    if not output.ok():
        raise PolicyError(f"policy evaluation failed: {str(output)[:500]}")
    results = output.results
    if not results or not results[0].expressions:
        raise PolicyError("the policy decision is undefined")
    return results[0].expressions[0]


class EmbeddedEngine:
    name = "regopy"
    #: why the WebAssembly engine was not used, when this one stands in for it
    fallback_reason: str | None = None

    def __init__(self, bundle: Bundle, entrypoint: str) -> None:
        self.entrypoint = entrypoint
        modules = bundle.policy_modules()
        try:
            self._it = compile_interpreter(modules, bundle.data)
            self._compiled = self._it.build(None, [entrypoint])
        except Exception as exc:  # regopy raises RegoError, and sometimes others
            raise PolicyError(f"the policy bundle does not compile: {readable_error(str(exc), modules)}") from None
        if not self._compiled.ok():
            raise PolicyError(f"the policy bundle does not compile: {readable_error(str(self._compiled), modules)}")

    def evaluate(self, policy_input: dict[str, Any]) -> Any:
        """Raw decision value (for explain and tests); raises PolicyError."""
        try:
            self._it.set_input_term(json.dumps(policy_input, ensure_ascii=False))
            output = self._it.query_bundle_entrypoint(self._compiled, self.entrypoint)
            return first_value(output)
        except PolicyError:
            raise
        except Exception as exc:
            raise PolicyError(f"policy evaluation failed: {type(exc).__name__}: {exc}") from None

    def value_of(self, ref: str) -> Any:
        """A data value of the compiled bundle (e.g. `data.mcp.gateway.decision_cache`), or None."""
        try:
            return first_value(self._it.query(ref))
        except Exception:
            return None

    async def decide(self, policy_input: dict[str, Any]) -> Decision:
        return Decision.from_output(self.evaluate(policy_input))

    async def start(self) -> None:
        """Nothing to open: the bundle was compiled in the constructor."""

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        """Nothing to close."""
