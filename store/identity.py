"""Who this process is, and whether the owner of a token is alive when this machine can tell.

An owner is one process: ``host``, ``machine`` (a hash of the boot id and the PID namespace), ``pid``,
``start`` (its start time in clock ticks since boot) and a random ``nonce``. Its **token**
``<machine>-<pid>-<start>-<nonce>`` is unique across hosts, containers (where every first process is
PID 1) and PID reuse; temporary files (store.atomic), claims and scratch folders carry it. An owner
on the same machine and in the same PID namespace is alive iff ``/proc/<pid>`` exists with the same
start time (exact and immediate, SIGKILL included); for any other, see :mod:`store.owner`'s registry.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
from dataclasses import asdict, dataclass


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
