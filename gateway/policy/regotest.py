"""Runs a bundle's Rego unit tests (`test_*` rules) with the embedded engine, like `opa test`.

A test passes when its rule evaluates to `true`; false, undefined or an error fail it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gateway.policy.bundle import Bundle, load_bundle
from gateway.policy.decision import PolicyError
from gateway.policy.embedded import compile_interpreter, first_value, readable_error

_PACKAGE = re.compile(r"^package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_[A-Za-z0-9_]+)\b", re.MULTILINE)


@dataclass(frozen=True)
class TestResult:
    module: str
    rule: str  # data.<package>.<test name>
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class TestReport:
    results: tuple[TestResult, ...]
    error: str | None = None  # the bundle did not load or compile

    @property
    def failed(self) -> tuple[TestResult, ...]:
        return tuple(r for r in self.results if not r.passed)

    @property
    def exit_code(self) -> int:
        """0 all passed, 1 the bundle is broken, 2 a test failed (as `opa test`)."""
        if self.error:
            return 1
        return 2 if self.failed else 0


def discover_tests(bundle: Bundle) -> list[tuple[str, str]]:
    """(module, data.<pkg>.<rule>) for every test rule, each named once."""
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, text in bundle.modules.items():
        pkg = _PACKAGE.search(text)
        if pkg is None:
            continue
        for rule in _TEST_RULE.findall(text):
            ref = f"data.{pkg.group(1)}.{rule}"
            if ref not in seen:
                seen.add(ref)
                found.append((name, ref))
    return found


def run_tests(bundle: Bundle) -> TestReport:
    try:
        it = compile_interpreter(bundle.modules, bundle.data)
    except Exception as exc:
        return TestReport(results=(), error=f"the bundle does not compile: {readable_error(str(exc), bundle.modules)}")
    tests = discover_tests(bundle)
    # One build for every test (a plain query() recompiles the bundle each time).
    entrypoints = [ref.removeprefix("data.").replace(".", "/") for _, ref in tests]
    try:
        compiled = it.build(None, entrypoints) if entrypoints else None
    except Exception:
        compiled = None
    if compiled is not None and not compiled.ok():
        compiled = None
    results = []
    for (module, ref), entrypoint in zip(tests, entrypoints):
        try:
            output = it.query_bundle_entrypoint(compiled, entrypoint) if compiled is not None else it.query(ref)
            value = first_value(output)
            passed, detail = value is True, "" if value is True else f"evaluated to {value!r}"
        except PolicyError as exc:
            undefined = "undefined" in str(exc)
            passed, detail = False, "its body did not hold (the test rule is undefined)" if undefined else str(exc)
        except Exception as exc:
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        results.append(TestResult(module=module, rule=ref, passed=passed, detail=detail))
    return TestReport(results=tuple(results))


def opa_disagreements(report: TestReport, path: Path, data_files: tuple[Path, ...] = ()) -> list[str] | None:
    """Where a real OPA (`$OPA_BIN` or `opa` on the PATH) judges the bundle's tests otherwise
    than the embedded engine: one line per test, with OPA's file:line; None without OPA.
    The embedded engine is not OPA: it has crashed on valid bundles and accepted unsafe
    variables `opa check` rejects, so where OPA is at hand, it has the last word."""
    import json
    import subprocess

    from gateway.policy.wasmbuild import find_opa

    opa = find_opa()
    if opa is None:
        return None
    run = subprocess.run([opa, "test", "--format", "json", str(path), *map(str, data_files)], capture_output=True, text=True,
                         timeout=300)
    try:
        theirs = json.loads(run.stdout)
    except ValueError:
        detail = (run.stderr or run.stdout).strip().splitlines()
        return [f"opa test could not run the bundle: {' / '.join(detail[:5])}"] if report.error is None else []
    ours = {r.rule: r.passed for r in report.results}
    out = []
    for test in theirs if isinstance(theirs, list) else []:
        rule = f"{test.get('package')}.{test.get('name')}"
        passed = not test.get("fail") and not test.get("error")
        where = test.get("location") or {}
        at = f"{where.get('file')}:{where.get('row')}"
        if rule not in ours:
            out.append(f"{at}: {rule}: OPA ran it ({'pass' if passed else 'FAIL'}), the embedded engine did not")
        elif ours.pop(rule) != passed:
            out.append(f"{at}: {rule}: OPA says {'pass' if passed else 'FAIL'}, the embedded engine the opposite")
    out += [f"{rule}: the embedded engine ran it, OPA did not" for rule in ours]
    return out


def opa_coverage(path: Path, data_files: tuple[Path, ...] = ()) -> str:
    """`opa test --coverage` of the bundle, summarised: the total, each policy file's figure and
    the lines no test reaches. Needs a real OPA (the embedded engine cannot measure it)."""
    import json
    import subprocess

    from gateway.policy.wasmbuild import find_opa

    opa = find_opa()
    if opa is None:
        raise PolicyError("coverage needs a real OPA: put opa on the PATH or set OPA_BIN")
    run = subprocess.run([opa, "test", "--coverage", "--format", "json", str(path), *map(str, data_files)], capture_output=True,
                         text=True, timeout=300)
    try:
        report = json.loads(run.stdout)
    except ValueError:
        raise PolicyError(f"opa test --coverage failed: {(run.stderr or run.stdout).strip()[:500]}") from None
    lines = [f"coverage: {report.get('coverage', 0):.1f}% of the policy's lines are reached by its tests"]
    for name, figures in sorted(report.get("files", {}).items()):
        if name.endswith("_test.rego"):
            continue
        missed = ", ".join(f"{r['start']['row']}" + (f"-{r['end']['row']}" if r["end"]["row"] != r["start"]["row"] else "")
                           for r in figures.get("not_covered") or [])
        lines.append(f"  {name}: {figures.get('coverage', 0):.1f}%" + (f" (not reached: lines {missed})" if missed else ""))
    return "\n".join(lines)


def run_tests_in(path: Path) -> TestReport:
    try:
        bundle = load_bundle(path)
    except Exception as exc:
        return TestReport(results=(), error=str(exc))
    return run_tests(bundle)


def _verdict_cache(bundle: Bundle) -> Path:
    """Where the report for this exact snapshot is kept (`$XDG_CACHE_HOME/mcp-authz-gateway/
    tests/`): keyed by the bundle's content hash and the engine's version, so a bundle's tests
    run once per machine (regopy needs seconds for the shipped ones) and never for a stale copy."""
    import os
    from importlib.metadata import version

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mcp-authz-gateway" / "tests" / f"{bundle.digest}-regopy-{version('regopy')}.json"


def run_tests_isolated(source: Path | Bundle, timeout: float = 120.0) -> TestReport:
    """Run the tests of a snapshot (or of the bundle at a path, read now) in a child process,
    so an engine crash is a report, not our death.

    regopy 1.5.2 aborts the whole process on some test shapes (see docs/policy.md);
    `check`, `policy test`, start-up and reloads must survive that and say what happened. The
    child gets the snapshot itself, not a path: what was tested is what gets built. A complete
    report is remembered by the snapshot's content hash.
    """
    import json
    import os
    import subprocess
    import sys

    if isinstance(source, Bundle):
        bundle = source
    else:
        try:
            bundle = load_bundle(source)
        except Exception as exc:
            return TestReport(results=(), error=str(exc))
    cached = _verdict_cache(bundle)
    try:
        data = json.loads(cached.read_text())
        return TestReport(results=tuple(TestResult(**r) for r in data["results"]), error=None)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "gateway.policy.regotest", "-"],
            input=bundle.to_json(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return TestReport(results=(), error=f"the Rego tests did not finish within {timeout:.0f}s")
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if proc.returncode != 0 or not last:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return TestReport(
            results=(),
            error=f"the embedded Rego engine (regopy) crashed on this bundle ({how}), which a real OPA may well accept; "
            "known regopy traps: `with input as X` replacing the whole input (override input.<key> instead), and two "
            "packages defining functions of the same name with different arities",
        )
    data = json.loads(last[0])
    report = TestReport(results=tuple(TestResult(**r) for r in data["results"]), error=data["error"])
    if report.error is None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(last[0])
            tmp.replace(cached)
        except OSError:
            pass  # a read-only home: the tests just run again next time
    return report


def _child_main(argv: list[str]) -> int:
    import dataclasses
    import json
    import os
    import sys

    # regopy prints compile errors on stdout: keep our one JSON line apart from them
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    report = run_tests(Bundle.from_json(sys.stdin.read())) if argv[0] == "-" else run_tests_in(Path(argv[0]))
    out.write(json.dumps({"results": [dataclasses.asdict(r) for r in report.results], "error": report.error}) + "\n")
    out.flush()
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_child_main(sys.argv[1:]))
