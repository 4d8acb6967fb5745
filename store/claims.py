"""Claims: advisory locks on units of work that name their owner.

A claim on unit ``U`` is the file ``WS/locks/U.lock`` holding its owner (token, host, pid, start time,
since). It is created atomically with ``link(2)`` from a fully written temporary file, which fails when
the file exists (also on NFS), so a claim file is never seen half written.

- A claim of a live owner is never broken.
- A claim of an owner that is gone (:class:`store.owner.Registry`) is broken: renamed aside to a
  unique name, then checked to be the very claim judged stale. When a racing process had already
  replaced it by its own fresh claim, that claim is put back.
- A holder calls :meth:`Claim.verify` right before it commits its output: should its claim have been
  broken (its host froze beyond the lease), the output is not committed (:class:`ClaimLost`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from store import atomic, identity
from store.owner import ClaimConfig, Registry

logger = logging.getLogger(__name__)


class ClaimLost(RuntimeError):
    """This process's claim on a unit was broken or replaced: its output must not be committed."""


@dataclass(frozen=True)
class Holder:
    """The owner of a claim as written in its file."""

    unit: str
    token: str
    host: str
    pid: int
    since: str

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} (since {self.since})"


def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(unit=str(data["unit"]), token=str(data["token"]), host=str(data["host"]),
                      pid=int(data["pid"]), since=str(data["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass
class Claim:
    """A unit of work held by this process. Release it (or use it as a context manager)."""

    unit: str
    path: Path
    token: str

    def held(self) -> bool:
        h = _read_holder(self.path)
        return h is not None and h.token == self.token

    def verify(self) -> None:
        """Raise :class:`ClaimLost` unless this process still holds the claim."""
        if not self.held():
            h = _read_holder(self.path)
            now = f"now held by {h.describe()}" if h else "its claim file is gone"
            raise ClaimLost(f"lost the claim on {self.unit} ({now}); output not committed")

    def release(self) -> None:
        if self.held():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Claims:
    """Claims on the units of one workspace (lock files under ``locks_dir``)."""

    def __init__(self, lock_path: Callable[[str], Path], registry: Registry, root: Path | None = None) -> None:
        self.lock_path = lock_path  # unit → its claim file (store.layout.Workspace.lock)
        self.registry = registry
        self.root = root  # the folder of every claim file (for sweep)

    @property
    def config(self) -> ClaimConfig:
        return self.registry.config

    def holder(self, unit: str) -> Holder | None:
        """The live holder of ``unit``, None when it is free (or held by an owner that is gone)."""
        h = _read_holder(self.lock_path(unit))
        return h if h is not None and self.registry.alive(h.token) else None

    def try_acquire(self, unit: str) -> Claim | Holder:
        """Claim ``unit`` now: the :class:`Claim`, or the live :class:`Holder` that has it."""
        self.registry.register()
        me = identity.current()
        path = self.lock_path(unit)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({**me.to_json(), "unit": unit, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                          sort_keys=True) + "\n"
        for _ in range(8):
            if _link_new(path, body):
                return Claim(unit=unit, path=path, token=me.token)
            h = _read_holder(path)
            if h is not None and h.token == me.token:  # already ours (a second claim in this process)
                return Claim(unit=unit, path=path, token=me.token)
            if h is not None and self.registry.alive(h.token):
                return h
            if h is None and _age(path) < self.config.lease_s:
                # unreadable and fresh: not ours to judge yet (cannot happen with link(2), but a
                # foreign tool may have made it)
                return Holder(unit=unit, token="?", host="?", pid=-1, since="?")
            self._break(path, h)
        raise RuntimeError(f"could not claim {unit}: its claim file {path} keeps changing")

    def acquire(self, unit: str, *, timeout_s: float | None = None,
                on_wait: Callable[[Holder], None] | None = None) -> Claim:
        """Claim ``unit``, waiting while a live owner holds it (``on_wait`` is called once per holder).
        TimeoutError after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        told: set[str] = set()
        while True:
            got = self.try_acquire(unit)
            if isinstance(got, Claim):
                return got
            if on_wait is not None and got.token not in told:
                told.add(got.token)
                on_wait(got)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{unit} is held by {got.describe()}")
            time.sleep(self.config.poll_s)

    def sweep(self) -> int:
        """Break the claims of owners that are gone (a process killed while holding them); returns how
        many. Claims of live owners are left alone."""
        if self.root is None or not self.root.is_dir():
            return 0
        n = 0
        for path in self.root.rglob("*.lock"):
            h = _read_holder(path)
            if h is not None and not self.registry.alive(h.token):
                self._break(path, h)
                n += 1
        # claim files half made or moved aside by a process killed at that moment
        for folder in {p.parent for p in self.root.rglob(f".*{atomic.TEMP_MARK}*")}:
            n += atomic.sweep_temps(folder, self.registry.keeps)
        return n

    def _break(self, path: Path, judged: Holder | None) -> None:
        """Break the claim at ``path`` that was judged stale (``judged``: its holder as read)."""
        aside = atomic.temp_path(path)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # released or broken by someone else meanwhile
        moved = _read_holder(aside)
        if (moved is None and judged is None) or (moved is not None and judged is not None
                                                  and moved.token == judged.token):
            logger.warning("breaking the claim on %s of %s, which is gone", path.name,
                           judged.describe() if judged else "an unknown owner")
            aside.unlink(missing_ok=True)
            return
        # We moved a fresh claim that replaced the stale one after we read it: put it back.
        try:
            os.link(aside, path)
        except FileExistsError:
            logger.warning("claim %s was replaced twice while being broken; the displaced holder will "
                           "find out before it commits", path)
        aside.unlink(missing_ok=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _link_new(path: Path, body: str) -> bool:
    """Create ``path`` holding ``body`` if it does not exist: True when this call created it."""
    tmp = atomic.temp_path(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # NFS may report an error for a link that was made: the link count tells the truth
        try:
            return os.stat(tmp).st_nlink == 2
        except OSError:
            return False
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
