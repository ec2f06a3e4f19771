"""The gateway against a direct call, side by side in one run, on loopback.

    scripts/bench.sh            # installs what it needs, then: python -m benchmarks.run
    python -m benchmarks.run --seconds 5 --memory-seconds 60

Starts a minimal fast MCP responder and the SDK's MCPServer; gateways in pass-through,
in exchange mode (Keycloak-shaped test provider, exchange cache warm) and with a remote
OPA; drives each with a raw keep-alive load generator at concurrency 1 and 16, each
gateway run right after its direct run. Then: the embedded decision alone (uncached and
cached), memory over a long run, a py-spy profile. Writes benchmarks/results/
results.json, results.md, chart.png, flame-*.svg, and prints every target PASS/MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import urlopen

import yaml

from benchmarks.loadgen import Run, load

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IDP_DIR = ROOT / "tests" / "idp"
ACCEPT = "application/json, text/event-stream"
CALL = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_notes", "arguments": {}}}).encode()
HEADERS = {"Accept": ACCEPT, "Content-Type": "application/json", "Mcp-Protocol-Version": "2025-11-25"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urlopen(url, timeout=1):
                return
        except HTTPError:
            return  # it answered: it is up
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Processes:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, name: str, argv: list[str], ready_url: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.procs.append(proc)
        wait_http(ready_url, proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@dataclass
class Gateway:
    name: str
    url: str
    token: str
    proc: subprocess.Popen[Any]


def find_opa() -> str | None:
    for candidate in (os.environ.get("OPA_BIN"), shutil.which("opa"), str(ROOT.parent / "shared" / "bin" / "opa")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def start_gateway(procs: Processes, name: str, *, profile: Any, upstream: str, env: dict[str, str] | None = None, policy: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> tuple[str, subprocess.Popen[Any]]:
    port = free_port()
    d = procs.tmp / name
    d.mkdir()
    if isinstance(profile, dict):
        (d / "profile.yaml").write_text(yaml.safe_dump(profile))
        profile = "./profile.yaml"
    config = {
        "public_url": f"http://127.0.0.1:{port}",
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream},
        "profile": profile,
        "policy": {"bundle": str(ROOT / "policies"), **(policy or {})},
        "log_level": "warning",
        "access_log": False,
        "decision_log": str(d / "decisions.jsonl"),  # on, as in production, to a file
        "reload": {"watch": False},
        **(extra or {}),
    }
    (d / "gateway.yaml").write_text(yaml.safe_dump(config))
    proc = procs.start(name, [sys.executable, "-m", "gateway.cli", "serve", "--config", str(d / "gateway.yaml")], f"http://127.0.0.1:{port}/healthz", env=env)
    return f"http://127.0.0.1:{port}/mcp", proc


def summarize(run: Run) -> dict[str, Any]:
    return {
        "p50_ms": run.percentile(50) * 1000,
        "p99_ms": run.percentile(99) * 1000,
        "rps": run.rps,
        "requests": len(run.latencies),
        "errors": run.errors,
        "statuses": {str(k): v for k, v in run.statuses.items()},
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads) and of its live children (workers), from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(cpu_seconds(child) for child in _children(pid))


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = [[%s]]
%s
"""


def wrk_run(url: str, token: str, concurrency: int, seconds: float, *, pid: int | None = None) -> dict[str, Any] | None:
    """The same closed-loop run with wrk (C, ~20 CPU-µs a request: it leaves the cores to the
    gateway); None where wrk is not installed (scripts/bench.sh installs it from Debian)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    headers = {**HEADERS, "Authorization": f"Bearer {token}"}
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(WRK_SCRIPT % (CALL.decode(), "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())))
    before = cpu_seconds(pid) if pid else 0.0
    run = subprocess.run([wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 30)
    after = cpu_seconds(pid) if pid else 0.0
    script.unlink()
    out: dict[str, Any] = {"rps": 0.0, "p50_ms": 0.0, "requests": 0, "errors": 0}
    for line in run.stdout.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            out["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] == "50%":
            out["p50_ms"] = _ms(parts[1])
        elif "requests in" in line:
            out["requests"] = int(parts[0])
        elif line.strip().startswith("Non-2xx or 3xx responses:") or line.strip().startswith("Socket errors:"):
            out["errors"] += sum(int(x) for x in line.replace(",", " ").split() if x.isdigit())
    if pid and out["requests"]:
        out["cpu_us_per_request"] = (after - before) / out["requests"] * 1e6
    return out


def _ms(text: str) -> float:
    for unit, factor in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def varying_call() -> Any:
    """A new argument value per call: a workload no decision cache can serve."""
    counter = iter(range(10**12))
    return lambda: json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                               "params": {"name": "list_notes", "arguments": {"n": next(counter)}}}).encode()


async def measure(url: str, token: str | None, concurrency: int, seconds: float, *, pid: int | None = None, body: Any = CALL) -> dict[str, Any]:
    """One closed-loop run; with `pid`, that process's CPU per answered request too."""
    headers = dict(HEADERS)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    before = cpu_seconds(pid) if pid else 0.0
    run = await load(url, body, headers, concurrency=concurrency, seconds=seconds)
    out = summarize(run)
    if pid and run.completed:
        out["cpu_us_per_request"] = (cpu_seconds(pid) - before) / run.completed * 1e6
    return out


def floor(procs: Processes, seconds: float, upstream: str, token: str) -> dict[str, Any]:
    """What no gateway on this stack goes below: a bare proxy (no checks) under load, and the
    gateway's own code alone (its endpoint driven in-process, the upstream answer canned)."""
    port = free_port()
    proc = procs.start("bare-proxy", [sys.executable, "-m", "benchmarks.bare_proxy", "--port", str(port), "--upstream", upstream],
                       f"http://127.0.0.1:{port}/")
    url = f"http://127.0.0.1:{port}/mcp"
    out: dict[str, Any] = {}
    for conc in (1, 16):
        direct = asyncio.run(measure(upstream, token, conc, seconds))
        bare = asyncio.run(measure(url, token, conc, seconds, pid=proc.pid))
        out[f"bare_c{conc}"] = {**bare, "added_p50_ms": bare["p50_ms"] - direct["p50_ms"]}
        print(f"bare proxy c={conc:<2} p50 {bare['p50_ms']:.2f} ms (added {bare['p50_ms'] - direct['p50_ms']:+.2f}) {bare['rps']:.0f} rps "
              f"CPU {bare.get('cpu_us_per_request', 0):.0f} µs/req", flush=True)
    out["own_code"] = subprocess.run([sys.executable, "-m", "benchmarks.own_code"], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout.strip()
    print(f"the gateway's own code: {out['own_code']}", flush=True)
    return out


def processes(procs: Processes, seconds: float, profile: dict[str, Any], upstream: str, issuer: Any) -> dict[str, Any]:
    """1 vs 2 gateway processes (`workers`, SO_REUSEPORT) at c=16, with the Python load generator
    and with wrk; the workers share sessions through a real Redis."""
    redis = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if redis is None:
        print("processes skipped: no redis-server (scripts/test.sh installs it)")
        return {}
    port = free_port()
    log = open(procs.tmp / "redis.log", "w")
    procs.procs.append(subprocess.Popen([redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT))
    time.sleep(0.5)
    out: dict[str, Any] = {}
    for workers in (1, 2):
        url, proc = start_gateway(procs, f"gw-workers-{workers}", profile=profile, upstream=upstream,
                                  extra={"workers": workers, "sessions": {"store": "redis", "url": f"redis://127.0.0.1:{port}/0"}})
        if workers > 1:
            deadline = time.monotonic() + 30
            while len(_children(proc.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2)  # every worker listening
        token = issuer.mint(aud=url)
        asyncio.run(measure(url, token, 16, 1))
        python = asyncio.run(measure(url, token, 16, seconds, pid=proc.pid))
        wrk = wrk_run(url, token, 16, seconds, pid=proc.pid)
        out[str(workers)] = {"python": python, "wrk": wrk}
        print(f"{workers} process(es) c=16: python loadgen {python['rps']:.0f} rps CPU {python.get('cpu_us_per_request', 0):.0f} µs/req"
              + (f" | wrk {wrk['rps']:.0f} rps p50 {wrk['p50_ms']:.2f} ms CPU {wrk.get('cpu_us_per_request', 0):.0f} µs/req" if wrk else " | wrk not installed"),
              flush=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    return out


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def decision_micro(samples: int = 3000) -> dict[str, Any]:
    """The engines alone, uncached: a tools/call and a 12-name listing with the notes rules
    (WebAssembly and regopy), an input-size sweep (WebAssembly), and the decision cache."""
    from gateway.policy.bundle import load_bundle
    from gateway.policy.cache import CacheDeclaration, CachingEngine
    from gateway.policy.embedded import EmbeddedEngine
    from gateway.policy.wasm import WasmEngine, WasmPolicy
    from gateway.policy.wasmbuild import wasm_for
    from tests.unit.test_policy import RULES, policy_input, profile, token

    entry = "mcp/gateway/decision"
    bundle = load_bundle(ROOT / "policies", (ROOT / "examples" / "notes-authz.yaml",))
    wasm = WasmEngine(WasmPolicy(wasm_for(bundle, entry)[0], bundle.data, entry), entry)
    regopy = EmbeddedEngine(bundle, entry)
    cached = CachingEngine(wasm, CacheDeclaration.from_value(regopy.value_of("data.mcp.gateway.decision_cache")), 1000)
    call = policy_input(token("mcp-client", scope="notes.read notes.write"), profile(RULES["A_strict"]), tool="create_note")
    call["mcp"]["arguments"] = {"title": "t", "path": "/users/alice/x"}
    listing = {**call, "mcp": {**call["mcp"], "method": "tools/list", "tool": None, "arguments": None, "targets": []},
               "listing": {"catalogue": "tools", "names": [f"tool_{i}" for i in range(10)] + ["list_notes", "create_note"]}}

    async def timed(decide: Any, case: dict[str, Any], n: int = samples) -> list[float]:
        out = []
        for i in range(n):
            case["mcp"]["id"] = i  # ignored by the cache key, as the policy declares
            t = time.perf_counter_ns()
            await decide(case)
            out.append((time.perf_counter_ns() - t) / 1000)
        return out

    def p(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))]

    out: dict[str, Any] = {}
    for name, engine in (("wasm", wasm), ("regopy", regopy)):
        call_t, list_t = asyncio.run(timed(engine.decide, call)), asyncio.run(timed(engine.decide, listing))
        out[name] = {"call_p50_us": p(call_t, .5), "call_p99_us": p(call_t, .99), "listing_p50_us": p(list_t, .5), "listing_p99_us": p(list_t, .99)}
    hits = asyncio.run(timed(cached.decide, call))
    out["cached_p50_us"] = p(hits, .5)
    sweep = []
    for size in (10, 100, 1000):  # argument values; the budget allows 2,000
        case = {**call, "mcp": {**call["mcp"], "arguments": {"title": "t", "path": "/users/alice/x", "tags": [f"t{i}" for i in range(size)]}}}
        sweep.append({"values": size, "p50_us": p(asyncio.run(timed(wasm.decide, case, 500)), .5), "offloaded": size > 300})
    out["sweep"] = sweep
    return out


def profile_gateway(gw: Gateway, seconds: int, name: str) -> dict[str, Any]:
    """py-spy on the gateway under load at c=16: a flame graph, and the top functions by own time."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy not installed (pip install -e '.[bench]')"}
    svg, raw = RESULTS / f"flame-{name}.svg", Path(tempfile.mktemp(suffix=".txt"))
    out: dict[str, Any] = {"flame_graph": str(svg.relative_to(ROOT))}
    for fmt, path in (("flamegraph", svg), ("raw", raw)):
        spy_proc = subprocess.Popen([spy, "record", "--pid", str(gw.proc.pid), "--duration", str(seconds), "--rate", "250", "--format", fmt, "--output", str(path), "--nonblocking"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        asyncio.run(measure(gw.url, gw.token, 16, seconds + 1))
        _, err = spy_proc.communicate(timeout=60)
        if spy_proc.returncode != 0:
            return {"error": f"py-spy failed: {err.decode()[-300:]}"}
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        own[_short(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            inclusive[f] += n
    out["top_self"] = [{"function": f, "share": round(c / total, 3)} for f, c in own.most_common(12)]
    out["top_inclusive"] = [
        {"function": f, "share": round(c / total, 3)} for f, c in inclusive.most_common(80)
        if any(m in f for m in ("(pipeline.py)", "(app.py)", "(tokens.py)", "(wasm.py)", "(embedded.py)", "(cache.py)", "(upstream.py)", "(audit.py)", "(messages.py)",
                                "(metrics.py)", "(__init__.py)", "(_client.py)", "(routes", "(response", "(sessions.py)", "(answers.py)"))
    ][:20]
    raw.unlink(missing_ok=True)
    return out


def _short(frame: str) -> str:
    # "func (path/to/module.py:123)" → "func (module.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1] if where else ""
    return f"{name} ({file})" if file else name


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    cells = results["cells"]

    def add(name: str, value: float, limit: float, ok: bool, unit: str) -> None:
        out.append({"target": name, "measured": round(value, 3), "limit": limit, "unit": unit, "pass": ok})

    for mode in ("passthrough", "exchange"):
        c = cells.get(f"{mode}/fast/c1")
        if c:
            add(f"added latency p50 at c=1, {mode}", c["added_p50_ms"], 1.0, c["added_p50_ms"] <= 1.0, "ms")
    for mode in ("passthrough", "exchange", "opa"):
        c = cells.get(f"{mode}/fast/c16")
        if c:
            add(f"throughput vs direct at c=16, {mode}", c["throughput_ratio"] * 100, 60, c["throughput_ratio"] >= 0.6, "%")
    d = results["decision"]
    add("uncached decision p50, tools/call with the notes rules (WebAssembly)", d["wasm"]["call_p50_us"], 150, d["wasm"]["call_p50_us"] <= 150, "µs")
    add("uncached decision p50, 12-name listing (WebAssembly)", d["wasm"]["listing_p50_us"], 150, d["wasm"]["listing_p50_us"] <= 150, "µs")
    small, large = d["sweep"][0], d["sweep"][-1]
    ratio = large["p50_us"] / small["p50_us"]
    add("decision cost linear in the input (100x values ≤ 100x time)", ratio, 100, ratio <= 100, "x")
    for conc in (1, 16):
        cached = cells.get(f"passthrough/fast/c{conc}", {}).get("gateway", {}).get("cpu_us_per_request")
        if cached is not None:
            add(f"CPU per forwarded request, cached decision, c={conc}", cached, 150, cached <= 150, "µs")
        uncached = results.get("uncached", {}).get(f"c{conc}", {}).get("cpu_us_per_request")
        if uncached is not None:
            add(f"CPU per forwarded request, new argument every call, c={conc}", uncached, 300, uncached <= 300, "µs")
    c = cells.get("passthrough/fast/c1")
    if c:
        add("added latency p50 at c=1 vs a bare upstream (target 0.3 ms)", c["added_p50_ms"], 0.3, c["added_p50_ms"] <= 0.3, "ms")
    c = cells.get("passthrough/sdk/c16")
    if c:
        add("throughput vs the SDK MCPServer direct at c=16", c["throughput_ratio"] * 100, 80, c["throughput_ratio"] >= 0.8, "%")
    p = results.get("processes") or {}
    for gen in ("wrk", "python"):
        one, two = (p.get(n, {}).get(gen) for n in ("1", "2"))
        if one and two and one["rps"]:
            growth = two["rps"] / one["rps"]
            add(f"2 processes vs 1 at c=16 ({gen} load generator): throughput grows with the cores", growth, 1.2, growth >= 1.2, "x")
    errors = sum(c["gateway"]["errors"] + c["direct"]["errors"] for c in cells.values())
    add("errors in every run", errors, 0, errors == 0, "requests")
    m = results.get("memory")
    if m:
        add(f"memory growth over {m['seconds']} s at c=16", m["growth_mib"], 10, m["growth_mib"] <= 10, "MiB")
    return out


def write_outputs(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Benchmark results",
        "",
        f"{results['machine']} · {results['when']} · {results['seconds']} s per run after 1 s warm-up · "
        "raw keep-alive load generator · `tools/call list_notes`",
        "",
        "| mode | upstream | c | direct p50 / p99 (ms) | gateway p50 / p99 (ms) | added p50 / p99 (ms) | direct rps | gateway rps | throughput ratio | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, c in results["cells"].items():
        mode, upstream, conc = key.split("/")
        d, g = c["direct"], c["gateway"]
        lines.append(
            f"| {mode} | {upstream} | {conc[1:]} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} | "
            f"{c['added_p50_ms']:.2f} / {c['added_p99_ms']:.2f} | {d['rps']:.0f} | {g['rps']:.0f} | {c['throughput_ratio']:.0%} | {d['errors'] + g['errors']} |"
        )
    dm = results["decision"]
    lines += ["", "CPU per forwarded request (the gateway process, all threads, from /proc), cached decision:"]
    lines += [f"- {k}: {c['gateway'].get('cpu_us_per_request', 0):.0f} µs" for k, c in results["cells"].items()]
    lines += ["", "With a new argument value on every call (no decision cache can serve it), pass-through, fast upstream:"]
    lines += [f"- {k}: p50 {u['p50_ms']:.2f} ms, {u['rps']:.0f} rps, CPU {u.get('cpu_us_per_request', 0):.0f} µs/request"
              for k, u in results.get("uncached", {}).items()]
    if results.get("processes"):
        lines += ["", "## Processes (pass-through, fast upstream, c=16; `workers`, SO_REUSEPORT; CPU of all the gateway's processes)", "",
                  "| processes | Python load generator rps | CPU µs/request | wrk rps | wrk p50 (ms) | CPU µs/request |", "|---|---|---|---|---|---|"]
        for n, r in results["processes"].items():
            py, wrk = r["python"], r.get("wrk") or {}
            lines.append(f"| {n} | {py['rps']:.0f} | {py.get('cpu_us_per_request', 0):.0f} | {wrk.get('rps', 0):.0f} | {wrk.get('p50_ms', 0):.2f} | "
                         f"{wrk.get('cpu_us_per_request', 0):.0f} |")
    if results.get("floor"):
        f = results["floor"]
        lines += ["", "## The floor", "",
                  "A bare proxy on the same stack (uvicorn, httptools, uvloop, pyreqwest) that checks nothing "
                  "(`benchmarks/bare_proxy.py`), and the gateway's own code alone (`benchmarks/own_code.py`: the endpoint "
                  "driven in-process, the upstream's answer canned):", ""]
        lines += [f"- bare proxy c={c}: p50 {f[f'bare_c{c}']['p50_ms']:.2f} ms (added {f[f'bare_c{c}']['added_p50_ms']:+.2f} ms), "
                  f"{f[f'bare_c{c}']['rps']:.0f} rps, CPU {f[f'bare_c{c}'].get('cpu_us_per_request', 0):.0f} µs/request" for c in (1, 16)]
        lines += [f"- the gateway's own code: {f['own_code']}"]
    lines += ["", "## Decisions (engines alone, uncached, notes rules)", "", "| engine | tools/call p50 / p99 (µs) | 12-name listing p50 / p99 (µs) |", "|---|---|---|"]
    lines += [f"| {name} | {dm[name]['call_p50_us']:.0f} / {dm[name]['call_p99_us']:.0f} | {dm[name]['listing_p50_us']:.0f} / {dm[name]['listing_p99_us']:.0f} |"
              for name in ("wasm", "regopy")]
    lines += ["", f"Decision cache hit p50: {dm['cached_p50_us']:.1f} µs. Input-size sweep (WebAssembly; above 4 KiB of input the "
              "evaluation runs in the thread pool): " + ", ".join(f"{s['values']} values {s['p50_us']:.0f} µs" for s in dm["sweep"]), ""]
    if results.get("memory"):
        m = results["memory"]
        lines += ["## Memory", "", f"RSS {m['start_mib']:.1f} MiB → {m['end_mib']:.1f} MiB over {m['seconds']} s at c=16 "
                  f"({m['requests']} requests): growth {m['growth_mib']:+.1f} MiB", ""]
    if results.get("profile", {}).get("top_self"):
        lines += ["## Profile (py-spy, pass-through, c=16): top functions by own time", "", "| function | share |", "|---|---|"]
        lines += [f"| `{t['function']}` | {t['share']:.1%} |" for t in results["profile"]["top_self"]]
        lines += ["", "Inclusive (the request path's parts):", "", "| function | share |", "|---|---|"]
        lines += [f"| `{t['function']}` | {t['share']:.1%} |" for t in results["profile"].get("top_inclusive", [])]
        lines += ["", f"Flame graph: `{results['profile']['flame_graph']}`", ""]
    lines += ["## Targets", "", "| target | measured | limit | result |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} {t['unit']} | {t['limit']} {t['unit']} | {'PASS' if t['pass'] else 'MISS'} |" for t in results["targets"]]
    (RESULTS / "results.md").write_text("\n".join(lines) + "\n")
    _chart(results)


def _chart(results: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')")
        return
    keys = list(results["cells"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    x = range(len(keys))
    left.bar([i - 0.2 for i in x], [results["cells"][k]["direct"]["p50_ms"] for k in keys], 0.4, label="direct")
    left.bar([i + 0.2 for i in x], [results["cells"][k]["gateway"]["p50_ms"] for k in keys], 0.4, label="through the gateway")
    left.set_xticks(list(x), keys, rotation=35, ha="right", fontsize=8)
    left.set_ylabel("p50 latency (ms)")
    left.legend()
    left.set_title("Latency p50")
    right.bar(list(x), [results["cells"][k]["throughput_ratio"] * 100 for k in keys], color="tab:green")
    right.axhline(60, color="red", linestyle="--", label="target at c=16: 60%")
    right.set_xticks(list(x), keys, rotation=35, ha="right", fontsize=8)
    right.set_ylabel("gateway rps / direct rps (%)")
    right.legend()
    right.set_title("Throughput kept")
    fig.tight_layout()
    fig.savefig(RESULTS / "chart.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--memory-seconds", type=float, default=60.0, help="length of the memory run (0 skips)")
    parser.add_argument("--profile-seconds", type=int, default=8, help="py-spy recording per format (0 skips)")
    parser.add_argument("--modes", default="", help="comma-separated subset, e.g. passthrough/fast,exchange/fast")
    parser.add_argument("--profile-name", default="passthrough", help="suffix of the flame graph file")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mcp-gw-bench-"))
    procs = Processes(tmp)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": args.seconds,
        "cells": {},
        "uncached": {},
    }
    with ExitStack() as stack:
        stack.callback(procs.stop)
        # upstreams
        fast_port, sdk_port = free_port(), free_port()
        procs.start("fast-upstream", [sys.executable, "-m", "benchmarks.fast_upstream", "--port", str(fast_port)], f"http://127.0.0.1:{fast_port}/")
        procs.start("sdk-upstream", [sys.executable, "-m", "benchmarks.sdk_upstream", "--port", str(sdk_port)], f"http://127.0.0.1:{sdk_port}/mcp", )
        fast, sdk = f"http://127.0.0.1:{fast_port}/mcp", f"http://127.0.0.1:{sdk_port}/mcp"

        # a dev issuer for pass-through tokens (its JWKS is fetched once by each gateway)
        from gateway.dev.issuer import DevIssuer
        import uvicorn
        import threading

        issuer_port = free_port()
        issuer = DevIssuer(f"http://127.0.0.1:{issuer_port}")
        server = uvicorn.Server(uvicorn.Config(issuer.app(), host="127.0.0.1", port=issuer_port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        stack.callback(lambda: setattr(server, "should_exit", True))
        time.sleep(0.5)
        dev_profile = {"name": "bench", "issuer": issuer.issuer, "token_kinds": ["jwt"], "jwt": {"algorithms": ["RS256"]},
                       "audience": {"accept": ["{resource}"], "match": "any", "missing": "reject"}, "mode": "passthrough"}

        gateways: dict[str, Gateway] = {}
        url, proc = start_gateway(procs, "gw-passthrough-fast", profile=dev_profile, upstream=fast)
        gateways["passthrough/fast"] = Gateway("passthrough/fast", url, issuer.mint(aud=url), proc)
        url, proc = start_gateway(procs, "gw-passthrough-sdk", profile=dev_profile, upstream=sdk)
        gateways["passthrough/sdk"] = Gateway("passthrough/sdk", url, issuer.mint(aud=url), proc)

        # exchange mode: the Keycloak-shaped test provider (node); warm-up fills the exchange cache
        if shutil.which("node") and (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            idp_port = free_port()
            idp_issuer = f"http://127.0.0.1:{idp_port}/realms/mcp"
            procs.start("idp", ["node", "server.mjs", "--port", str(idp_port), "--shape", "keycloak"], idp_issuer + "/.well-known/openid-configuration", cwd=IDP_DIR)
            env = {"KEYCLOAK_ISSUER": idp_issuer, "MCP_CLIENT_ID": "nextcloud-mcp-server", "MCP_CLIENT_SECRET": "mcp-secret"}
            url, proc = start_gateway(procs, "gw-exchange-fast", profile="keycloak", upstream=fast, env=env)
            import httpx

            form = "grant_type=urn%3Atest%3Agrant-type%3Auser&subject=alice&scope=openid+notes.read+notes.write"
            token = httpx.post(idp_issuer + "/token", content=form, auth=("nextcloud-mcp-server", "mcp-secret"),
                               headers={"Content-Type": "application/x-www-form-urlencoded"}).json()["access_token"]
            gateways["exchange/fast"] = Gateway("exchange/fast", url, token, proc)
        else:
            print("exchange mode skipped: node or tests/idp/node_modules missing (scripts/bench.sh installs them)")

        opa = find_opa()
        if opa:
            opa_port = free_port()
            procs.start("opa", [opa, "run", "--server", "--addr", f"127.0.0.1:{opa_port}", "--disable-telemetry", "--log-level", "error", str(ROOT / "policies")],
                        f"http://127.0.0.1:{opa_port}/health")
            url, proc = start_gateway(procs, "gw-opa-fast", profile=dev_profile, upstream=fast,
                                      policy={"engine": "opa", "opa_url": f"http://127.0.0.1:{opa_port}", "decision_cache": {"enabled": False}})
            gateways["opa/fast"] = Gateway("opa/fast", url, issuer.mint(aud=url), proc)
        else:
            print("remote OPA skipped: no opa binary (set OPA_BIN or put opa on PATH)")

        direct_url = {"fast": fast, "sdk": sdk}
        wanted = set(filter(None, args.modes.split(",")))
        for key, gw in gateways.items():
            if wanted and key not in wanted:
                continue
            mode, upstream = key.split("/")
            for conc in (1, 16):
                direct = asyncio.run(measure(direct_url[upstream], gw.token, conc, args.seconds))
                through = asyncio.run(measure(gw.url, gw.token, conc, args.seconds, pid=gw.proc.pid))
                cell = {
                    "direct": direct,
                    "gateway": through,
                    "added_p50_ms": through["p50_ms"] - direct["p50_ms"],
                    "added_p99_ms": through["p99_ms"] - direct["p99_ms"],
                    "throughput_ratio": through["rps"] / direct["rps"] if direct["rps"] else 0.0,
                }
                results["cells"][f"{key}/c{conc}"] = cell
                print(f"{key:18} c={conc:<2}  direct p50 {direct['p50_ms']:.2f} ms {direct['rps']:7.0f} rps | gateway p50 {through['p50_ms']:.2f} ms "
                      f"p99 {through['p99_ms']:.2f} ms {through['rps']:7.0f} rps | added p50 {cell['added_p50_ms']:+.2f} ms | ratio {cell['throughput_ratio']:.0%}"
                      f" | CPU {through.get('cpu_us_per_request', 0):.0f} µs/req | errors {direct['errors'] + through['errors']}", flush=True)
            if upstream == "fast" and mode == "passthrough":  # the same, with a new argument value per call (cache defeated)
                for conc in (1, 16):
                    through = asyncio.run(measure(gw.url, gw.token, conc, args.seconds, pid=gw.proc.pid, body=varying_call()))
                    results["uncached"][f"c{conc}"] = through
                    print(f"{key + ' uncached':18} c={conc:<2}  gateway p50 {through['p50_ms']:.2f} ms {through['rps']:7.0f} rps | "
                          f"CPU {through.get('cpu_us_per_request', 0):.0f} µs/req | errors {through['errors']}", flush=True)

        results["processes"] = processes(procs, args.seconds, dev_profile, fast, issuer)
        results["floor"] = floor(procs, args.seconds, fast, gateways["passthrough/fast"].token)

        results["decision"] = decision_micro()
        d = results["decision"]
        print(f"decisions: wasm call {d['wasm']['call_p50_us']:.0f} µs, listing {d['wasm']['listing_p50_us']:.0f} µs; regopy call "
              f"{d['regopy']['call_p50_us']:.0f} µs, listing {d['regopy']['listing_p50_us']:.0f} µs; cached {d['cached_p50_us']:.1f} µs; sweep "
              + ", ".join(f"{s['values']}:{s['p50_us']:.0f}" for s in d["sweep"]), flush=True)

        if args.profile_seconds:
            results["profile"] = profile_gateway(gateways["passthrough/fast"], args.profile_seconds, args.profile_name)

        if args.memory_seconds:
            gw = gateways["passthrough/fast"]
            asyncio.run(measure(gw.url, gw.token, 16, 5))  # warm
            start = rss_mib(gw.proc.pid)
            samples: list[float] = []

            async def sampled() -> dict[str, Any]:
                task = asyncio.create_task(measure(gw.url, gw.token, 16, args.memory_seconds))
                while not task.done():
                    samples.append(rss_mib(gw.proc.pid))
                    await asyncio.sleep(1)
                return await task

            run = asyncio.run(sampled())
            end = rss_mib(gw.proc.pid)
            results["memory"] = {"seconds": args.memory_seconds, "start_mib": start, "end_mib": end, "growth_mib": end - start,
                                 "max_mib": max(samples, default=end), "requests": run["requests"], "errors": run["errors"]}
            print(f"memory: {start:.1f} → {end:.1f} MiB over {args.memory_seconds:.0f} s ({run['requests']} requests)", flush=True)

    results["targets"] = targets(results)
    write_outputs(results)
    print()
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['measured']} {t['unit']} (limit {t['limit']} {t['unit']})")
    print(f"\nwritten: {RESULTS.relative_to(ROOT)}/results.json, results.md, chart.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
