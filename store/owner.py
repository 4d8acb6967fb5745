"""Whether the owner of a claim or a temporary file is still alive: the registry of a workspace.

Owners and their tokens are :mod:`store.identity`'s. Liveness:

- an owner on the same machine and in the same PID namespace is alive iff ``/proc/<pid>`` exists
  with the same start time (exact and immediate, SIGKILL included);
- any other owner (another node, another container) is alive iff its registry file
  ``WS/locks/owners/<token>.json`` was refreshed within ``lease_s`` seconds. A daemon thread of every
  registered process refreshes it every ``heartbeat_s`` seconds. Clocks of the nodes sharing a
  workspace must agree to well within ``lease_s`` (NTP), since the file's mtime is compared with the
  local clock.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from store import atomic
from store.identity import Owner, current, local_alive

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimConfig:
    """Timing of claims and the owner heartbeat (seconds)."""

    lease_s: float = 120.0  # an owner on another machine is gone when its heartbeat is older than this
    heartbeat_s: float = 15.0  # how often a registered process refreshes its registry file
    poll_s: float = 2.0  # how often a waiting process looks again at a unit held by another owner


class Registry:
    """The owner registry of one workspace: ``<folder>/<token>.json`` per registered process."""

    def __init__(self, folder: Path, config: ClaimConfig | None = None) -> None:
        self.folder = Path(folder)
        self.config = config or ClaimConfig()

    def path(self, token: str) -> Path:
        return self.folder / f"{token}.json"

    def register(self) -> None:
        """Write this process's registry file (once) and keep it fresh until the process exits."""
        me = current()
        path = self.path(me.token)
        with _lock:
            if path in _registered:
                return
            _registered[path] = self.config.heartbeat_s
        _write_owner_file(path, me)
        _ensure_heartbeat()
        _wake.set()

    def alive(self, token: str) -> bool:
        local = local_alive(token)
        if local is not None:
            return local
        try:
            age = time.time() - self.path(token).stat().st_mtime
        except FileNotFoundError:
            return False
        return age < self.config.lease_s

    def keeps(self, token: str, age_s: float) -> bool:
        """Whether to keep a file (temporary file, scratch folder) of owner ``token`` that was last
        modified ``age_s`` seconds ago: always while the owner is alive; an owner on another machine
        that never registered here is given ``lease_s`` from the file's last change."""
        local = local_alive(token)
        if local is not None:
            return local
        return self.alive(token) or age_s < self.config.lease_s

    def sweep(self) -> int:
        """Remove the registry files of owners that are gone; returns how many."""
        n = 0
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return 0
        for e in entries:
            if e.name.endswith(".json") and not self.alive(e.name[:-5]):
                try:
                    os.unlink(e.path)
                    n += 1
                except FileNotFoundError:
                    pass
        return n


def _write_owner_file(path: Path, me: Owner) -> None:
    body = {**me.to_json(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic.write_text(path, json.dumps(body, sort_keys=True) + "\n")


_lock = threading.RLock()  # the registrations of this process
_registered: dict[Path, float] = {}
_wake = threading.Event()  # set on a new registration: its heartbeat interval applies at once
_heartbeat: threading.Thread | None = None
_heartbeat_pid: int | None = None


def _beat() -> None:
    while True:
        with _lock:
            items = list(_registered.items())
        me = current()
        for path, _ in items:
            try:
                os.utime(path)
            except FileNotFoundError:  # swept by someone who thought us gone: say we are here
                try:
                    _write_owner_file(path, me)
                except OSError as exc:
                    logger.warning("owner heartbeat: cannot write %s: %s", path, exc)
            except OSError as exc:
                logger.warning("owner heartbeat: cannot touch %s: %s", path, exc)
        _wake.wait(min((h for _, h in items), default=15.0))
        _wake.clear()


def _ensure_heartbeat() -> None:
    global _heartbeat, _heartbeat_pid
    with _lock:
        if _heartbeat is not None and _heartbeat_pid == os.getpid() and _heartbeat.is_alive():
            return
        if _heartbeat_pid is not None and _heartbeat_pid != os.getpid():
            # a forked child: the parent's files are the parent's to refresh
            mine = current().token
            for p in [p for p in _registered if not p.name.startswith(mine)]:
                del _registered[p]
        _heartbeat = threading.Thread(target=_beat, name="mcn-owner-heartbeat", daemon=True)
        _heartbeat_pid = os.getpid()
        _heartbeat.start()


@atexit.register
def _unregister_all() -> None:
    me = current()
    with _lock:
        paths = [p for p in _registered if p.name == f"{me.token}.json"]
        _registered.clear()
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass
