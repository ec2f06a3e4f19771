"""Hot reload: a changed policy bundle or profile replaces the live one only if it is sound.

The bundle and profile files are polled (and SIGHUP asks for a reload). A candidate is
built in the background from one snapshot of the bundle, read once: its Rego tests run on
that snapshot (in a child process) and the gateway is built from it, so what was tested is
exactly what serves (a file changed in between is the next reload's business). Only then is
it swapped in, by one assignment, so a request sees either the old or the new gateway,
never half of each. A broken change leaves the old one serving, is logged (with the bundle
and its revision) and counted. A broken shadow bundle never blocks a live reload. The old
gateway is closed after a grace period, once requests it started have finished.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config.profiles import profile_path
from gateway.config.settings import Settings

log = logging.getLogger(__name__)


class Reloader:
    def __init__(self, state: Any, settings: Settings, build: Callable[..., Any], vet: Callable[[Settings], Any], *,
                 grace: float = 30.0) -> None:
        """`state.gateway` is the live gateway; `vet(settings)` reads and tests one snapshot
        (raising when it is refused), `build(settings, previous=..., bundle=...)` makes a gateway of it."""
        self._state = state
        self._settings = settings
        self._build = build
        self._vet = vet
        self._grace = grace
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[Any]] = set()
        self._snapshot = self._scan()

    def _watched_files(self) -> list[Path]:
        cfg = self._settings.config
        files: list[Path] = []
        for root in (self._settings.bundle_dir, self._settings.shadow_dir):
            if root is not None and root.is_dir():
                files += [p for p in root.rglob("*") if p.is_file()]
        files += list(self._settings.data_files)
        try:
            files.append(profile_path(cfg.profile, self._settings.base_dir))
        except Exception:  # an unknown shipped name was refused at start-up already
            pass
        return sorted(files)

    def _scan(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for path in self._watched_files():
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((str(path), st.st_mtime_ns, st.st_size))
        return tuple(out)

    async def watch(self) -> None:
        interval = self._settings.config.reload.interval
        while True:
            await asyncio.sleep(interval)
            snapshot = await asyncio.to_thread(self._scan)
            if snapshot != self._snapshot:
                self._snapshot = snapshot
                await self.reload("files changed")

    def listen_for_sighup(self) -> None:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._on_sighup)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            log.debug("SIGHUP reload not available in this process")

    def _on_sighup(self) -> None:
        task = asyncio.ensure_future(self.reload("SIGHUP"))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def reload(self, why: str) -> bool:
        async with self._lock:
            current = self._state.gateway
            try:
                snapshot, report = await asyncio.to_thread(self._vet, self._settings)
                candidate = self._build(self._settings, previous=current, bundle=snapshot)
                await candidate.start()
            except Exception as exc:
                current.metrics.reloads.labels("failure").inc()
                log.error("reload (%s) refused; the running policy (revision %s) keeps serving: %s", why, current.revision, exc)
                return False
            self._state.gateway = candidate
            candidate.serve_metrics()
            current.metrics.reloads.labels("success").inc()
            passed = len(report.results) - len(report.failed)
            if candidate.serving_revision != candidate.revision:  # a remote OPA decides: say what it serves
                log.info("reload (%s) done: the local bundle (revision %s) passed %d of %d Rego tests; OPA serves %s",
                         why, candidate.revision, passed, len(report.results), candidate.serving_revision)
            else:
                log.info("reload (%s) done: revision %s serving (%d of %d Rego tests passed)", why, candidate.revision, passed,
                         len(report.results))
            retire = asyncio.create_task(self._retire(current))
            self._pending.add(retire)
            retire.add_done_callback(self._pending.discard)
            return True

    async def _retire(self, old: Any) -> None:
        await asyncio.sleep(self._grace)
        await old.aclose(shared=False)

    async def aclose(self) -> None:
        for task in list(self._pending):
            task.cancel()
