"""Who this process is, and whether the owner of a claim or a temporary file is still alive.

An owner is one process: ``host``, ``machine`` (a hash of the boot id and the PID namespace), ``pid``,
``start`` (its start time in clock ticks since boot) and a random ``nonce``. Its **token**
``<machine>-<pid>-<start>-<nonce>`` is unique across hosts, containers (where every first process is
PID 1) and PID reuse; temporary files, claims and scratch folders carry it.

Liveness:

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
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimConfig:
    """Timing of claims and the owner heartbeat (seconds)."""

    lease_s: float = 120.0  # an owner on another machine is gone when its heartbeat is older than this
    heartbeat_s: float = 15.0  # how often a registered process refreshes its registry file
    poll_s: float = 2.0  # how often a waiting process looks again at a unit held by another owner


@dataclass(frozen=True)
class Owner:
    host: str
    machine: str
    pid: int
    start: int
    nonce: str

    @property
    def token(self) -> str:
        return f"{self.machine}-{self.pid}-{self.start}-{self.nonce}"

    def to_json(self) -> dict:
        return {**asdict(self), "token": self.token}

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot; None when there is no such process
    (or no /proc)."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _machine_id() -> str:
    boot = _read("/proc/sys/kernel/random/boot_id") or ""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    if not boot:  # no /proc (not Linux): liveness then goes through the registry heartbeat only
        return "x" + hashlib.sha256(f"{socket.gethostname()}|{os.getpid()}".encode()).hexdigest()[:7]
    return hashlib.sha256(f"{boot.strip()}|{pidns}".encode()).hexdigest()[:8]


_lock = threading.RLock()
_current: Owner | None = None


def current() -> Owner:
    """The owner identity of this process (a new one in a forked child)."""
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            pid = os.getpid()
            _current = Owner(host=socket.gethostname(), machine=_machine_id(), pid=pid,
                             start=process_start(pid) or 0, nonce=secrets.token_hex(4))
        return _current


def parse_token(token: str) -> tuple[str, int, int] | None:
    """``(machine, pid, start)`` of a token, None when it is not one."""
    parts = token.split("-")
    if len(parts) != 4:
        return None
    try:
        return parts[0], int(parts[1]), int(parts[2])
    except ValueError:
        return None


def local_alive(token: str) -> bool | None:
    """Whether the owner of ``token`` is alive when this machine can tell (same machine and PID
    namespace), else None."""
    parsed = parse_token(token)
    if parsed is None:
        return None
    machine, pid, start = parsed
    me = current()
    if machine != me.machine or machine.startswith("x"):
        return None
    if pid == me.pid:
        return start == me.start
    now = process_start(pid)
    if now is None:
        return False
    return start == 0 or now == start


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
    from store import atomic  # here: store.atomic names its temporary files after current()

    body = {**me.to_json(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic.write_text(path, json.dumps(body, sort_keys=True) + "\n")


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
