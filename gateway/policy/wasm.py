"""The WebAssembly engine: the bundle's Rego compiled by `opa build -t wasm`, evaluated in this
process by wasmtime, off the event loop when an input is large, always under a deadline.

- One compiled module per bundle; one instance per thread (an instance is not shared), each
  holding the bundle's data parsed once. An evaluation resets the instance's heap to just
  after the data, writes the input JSON there and calls OPA's `opa_eval` fast path (ABI 1.2+):
  no per-request allocation survives it.
- Small inputs are evaluated on the calling (event-loop) thread, which costs less than a thread
  hop; larger ones in a small pool of threads (wasmtime releases the GIL, so two cores are two
  evaluations). Every evaluation runs on a budget of wasmtime *fuel* (instructions), calibrated
  at load to the machine's speed: inline, about `INLINE_SECONDS`, after which the input is
  evaluated again in the pool with the budget of the whole deadline (`policy.timeout`), past
  which it fails closed (PolicyError `policy_timeout`). Fuel, not epoch interruption: an epoch
  needs a thread ticking all the time (measured: 3.5% of a core per idle gateway); fuel costs
  ~20 µs of a ~100 µs decision and nothing when idle. The pool's wall time is bounded too.
- An interrupted or failed evaluation may leave the instance's C++ state half-built (static
  initialisers, caches), so the instance is thrown away and a new one made.
- Host builtins are not provided: a module that needs one (e.g. `sprintf`) is refused at load
  time, so a decision never depends on a host's formatting. The shipped policies need none.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import wasmtime

from gateway.policy.decision import Decision, PolicyError

log = logging.getLogger(__name__)

def _fast_i32_call(func: wasmtime.Func, store: wasmtime.Store) -> Any:
    """`func` (all-i32 parameters, one i32 result) as a plain Python callable.

    wasmtime-py's `Func.__call__` asks for the function's type and converts every argument on
    every call: half the cost of a decision. The type is checked once here, then calls go
    through `wasmtime_func_call_unchecked` with a reused argument array. It uses wasmtime-py's
    internal FFI module; if that ever changes, the public (slower) call is used instead.
    """
    try:
        from ctypes import POINTER, byref

        from wasmtime import _ffi as ffi
        from wasmtime._func import maybe_raise_last_exn

        ty = func.type(store)
        i32 = wasmtime.ValType.i32()
        if any(p != i32 for p in ty.params) or [str(r) for r in ty.results] != [str(i32)]:
            return lambda *args: func(store, *args)
        args = (ffi.wasmtime_val_raw_t * max(1, len(ty.params)))()
        call, func_ref, context = ffi.wasmtime_func_call_unchecked, byref(func._func), store._context()
    except (ImportError, AttributeError):  # pragma: no cover - another wasmtime-py layout
        return lambda *args: func(store, *args)

    def fast(*values: int) -> int:
        for index, value in enumerate(values):
            args[index].i32 = value
        trap = POINTER(ffi.wasm_trap_t)()
        error = call(context, func_ref, args, len(args), byref(trap))
        if error:
            maybe_raise_last_exn()
            raise wasmtime.WasmtimeError._from_ptr(error)
        if trap:
            trap_obj = wasmtime.Trap._from_ptr(trap)
            maybe_raise_last_exn()
            raise trap_obj
        return args[0].i32

    return fast


#: an inline evaluation's budget, in seconds of this machine's WebAssembly speed
INLINE_SECONDS = 0.001
_PAGE = 65_536


class WasmPolicy:
    """A compiled module and the data it decides with; makes instances."""

    def __init__(self, wasm: bytes, data: Any, entrypoint: str) -> None:
        config = wasmtime.Config()
        config.consume_fuel = True
        # compiled machine code cached on disk ($XDG_CACHE_HOME/wasmtime): 0.6 s to 3 ms per start
        try:
            config.cache = True
        except wasmtime.WasmtimeError:  # no writable cache directory: compile every time
            pass
        self.engine = wasmtime.Engine(config)
        try:
            self.module = wasmtime.Module(self.engine, wasm)
        except Exception as exc:  # wasmtime raises its own error types
            raise PolicyError(f"the compiled policy is not a valid WebAssembly module: {exc}") from None
        self.data_json = orjson.dumps(data)
        probe = WasmInstance(self)
        builtins = orjson.loads(probe.dump(probe.call("builtins")))
        if builtins:
            raise PolicyError(
                "the policy uses builtins OPA's WebAssembly leaves to the host "
                f"({', '.join(sorted(builtins))}): rewrite them (e.g. concat, format_int) or use policy.engine: regopy"
            )
        entrypoints = orjson.loads(probe.dump(probe.call("entrypoints")))
        if entrypoint not in entrypoints:
            raise PolicyError(f"the compiled policy has no entrypoint {entrypoint} (it has: {', '.join(entrypoints)})")
        self.entrypoint_id = entrypoints[entrypoint]


class WasmInstance:
    """One instance: its own store and memory, the data parsed once, used by one thread at a time."""

    def __init__(self, policy: WasmPolicy) -> None:
        self.policy = policy
        self.store = wasmtime.Store(policy.engine)
        self.store.set_fuel(1 << 40)  # setting up: no budget but the constructor's own
        memory_import = next(i for i in policy.module.imports if i.name == "memory")
        self.memory = wasmtime.Memory(self.store, memory_import.type)
        linker = wasmtime.Linker(policy.engine)
        linker.define(self.store, "env", "memory", self.memory)
        i32 = wasmtime.ValType.i32()
        linker.define_func("env", "opa_abort", wasmtime.FuncType([i32], []), self._abort)
        linker.define_func("env", "opa_println", wasmtime.FuncType([i32], []), lambda _addr: None)
        for arity in range(5):
            linker.define_func("env", f"opa_builtin{arity}", wasmtime.FuncType([i32] * (arity + 2), [i32]), self._no_builtin)
        self.exports = linker.instantiate(self.store, policy.module).exports(self.store)
        self._eval = _fast_i32_call(self.exports["opa_eval"], self.store)
        data = policy.data_json
        address = self.call("opa_malloc", len(data))
        self.memory.write(self.store, data, address)
        self.data_address = self.call("opa_json_parse", address, len(data))
        if not self.data_address:
            raise PolicyError("the policy data could not be loaded into the WebAssembly instance")
        self.heap_base = self.call("opa_heap_ptr_get")

    def call(self, name: str, *args: int) -> Any:
        return self.exports[name](self.store, *args)

    def _abort(self, address: int) -> None:
        raise PolicyError(f"the policy aborted: {self.read_string(address)[:300].decode(errors='replace')}")

    def _no_builtin(self, *_args: int) -> int:
        raise PolicyError("the policy called a host builtin, which this engine does not provide")

    def read_string(self, address: int) -> bytes:
        """The NUL-terminated string at `address`."""
        end, size, chunk = address, self.memory.data_len(self.store), 512
        out = bytearray()
        while end < size:
            part = self.memory.read(self.store, end, min(end + chunk, size))
            zero = part.find(0)
            if zero >= 0:
                return bytes(out + part[:zero])
            out += part
            end += len(part)
            chunk *= 2
        raise PolicyError("the policy's result is not terminated")

    def dump(self, value_address: int) -> bytes:
        return self.read_string(self.call("opa_json_dump", value_address))

    def evaluate(self, input_json: bytes, fuel: int) -> Any:
        """The entrypoint's value for `input_json`; PolicyError on any failure or when undefined."""
        base = self.heap_base  # opa_eval resets the heap to `heap` (and clears builtin caches) itself
        need = base + len(input_json) + _PAGE * 16  # the input, then room for evaluation
        size = self.memory.data_len(self.store)
        if need > size:
            self.memory.grow(self.store, (need - size + _PAGE - 1) // _PAGE)
        self.memory.write(self.store, input_json, base)
        self.store.set_fuel(fuel)
        try:
            result = self._eval(0, self.policy.entrypoint_id, self.data_address, base, len(input_json), base + len(input_json), 0)
        except wasmtime.Trap as trap:
            if trap.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
                raise DeadlineExceeded() from None
            raise PolicyError(f"policy evaluation failed ({trap.trap_code}): {trap.message[-300:]}") from None
        except wasmtime.WasmtimeError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, PolicyError):
                raise cause from None
            raise PolicyError(f"policy evaluation failed: {str(exc)[:300]}") from None
        results = orjson.loads(self.read_string(result))
        if not results or "result" not in results[0]:
            raise PolicyError("the policy decision is undefined")
        return results[0]["result"]


class DeadlineExceeded(PolicyError):
    def __init__(self) -> None:
        super().__init__("the policy did not decide within its deadline", reason="policy_timeout")


class WasmEngine:
    """Decides with a WasmPolicy: inline for small inputs, a thread pool for the rest."""

    name = "wasm"
    #: where the module came from: shipped | cache | opa
    source: str | None = None

    def __init__(self, policy: WasmPolicy, entrypoint: str, *, timeout: float = 1.0, workers: int = 2,
                 inline_max_bytes: int = 4_096) -> None:
        self.policy = policy
        self.entrypoint = entrypoint
        self._timeout = timeout
        self._inline_max = inline_max_bytes
        self._inline = WasmInstance(policy)  # used by the event-loop thread only
        rate = self._fuel_per_second(self._inline)
        self._fuel = max(1, int(rate * timeout))
        self._inline_fuel = max(1, int(rate * INLINE_SECONDS))
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="opa-wasm")

    @staticmethod
    def _fuel_per_second(instance: WasmInstance) -> float:
        """This machine's WebAssembly speed, measured on the policy itself (an empty input),
        so a budget in seconds means about that many seconds here. At least 10^8/s."""
        best = 0.0
        for _ in range(20):
            instance.store.set_fuel(1 << 40)
            started = time.perf_counter()
            try:
                instance.evaluate(b"{}", 1 << 40)
            except PolicyError:
                pass  # an empty input may be refused or undefined: only its cost counts
            elapsed = time.perf_counter() - started
            used = (1 << 40) - instance.store.get_fuel()
            if elapsed > 0:
                best = max(best, used / elapsed)
        return max(best, 1e8)

    def _in_thread(self, input_json: bytes) -> Any:
        instance = getattr(self._local, "instance", None)
        if instance is None:
            instance = self._local.instance = WasmInstance(self.policy)
        try:
            return instance.evaluate(input_json, self._fuel)
        except PolicyError:
            self._local.instance = None  # never reuse an instance a trap may have left broken
            raise

    async def evaluate_json(self, input_json: bytes) -> Any:
        if len(input_json) <= self._inline_max:
            try:
                return self._inline.evaluate(input_json, self._inline_fuel)
            except DeadlineExceeded:
                self._inline = WasmInstance(self.policy)
                # more than a couple of milliseconds: not on the event loop; again, in the pool
            except PolicyError:
                self._inline = WasmInstance(self.policy)
                raise
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._in_thread, input_json)
        try:
            return await asyncio.wait_for(future, self._timeout * 2)  # fuel bounds the CPU; this, a full queue
        except TimeoutError:
            raise DeadlineExceeded() from None

    def evaluate(self, policy_input: dict[str, Any]) -> Any:
        """Raw decision value, synchronously in this thread (explain, tests, value_of)."""
        return WasmInstance(self.policy).evaluate(encode_input(policy_input), self._fuel)

    async def decide(self, policy_input: dict[str, Any]) -> Decision:
        return Decision.from_output(await self.evaluate_json(encode_input(policy_input)))

    async def start(self) -> None:
        """Nothing to open: compiled and instantiated in the constructor."""

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def encode_input(policy_input: dict[str, Any]) -> bytes:
    """The input as JSON; values JSON cannot carry (NaN, lone surrogates) fail closed."""
    try:
        return orjson.dumps(policy_input)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise PolicyError(f"the policy input cannot be encoded as JSON: {exc}", reason="policy_input_invalid") from None
