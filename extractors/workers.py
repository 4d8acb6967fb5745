"""A process pool for decoding: hangs are timed out, crashes are contained, workers are recycled.

decord can hang while holding the GIL, leak memory and segfault (DESIGN.md "Decoding"), so decoding
runs in worker processes (multiprocessing "spawn" context). ``WorkerPool.run(tasks)`` calls the
generator function ``fn(task)`` in a worker per task and streams what it yields back as ``Event``s:

* every yielded item becomes an ``"item"`` event, in order within a task (tasks interleave across
  workers);
* each task ends with exactly one ``"done"`` or ``"error"`` event; the error payload is a one-line
  reason: ``"ValueError: ..."`` for an exception raised by ``fn``, ``"timeout: no progress for 30.0 s"``
  when no item arrived for ``timeout_s`` seconds (the worker is killed and replaced),
  ``"worker died (signal SIGSEGV)"`` / ``"worker died (exit code 1)"`` when the worker process ended.

Each worker has its own pipe (a worker killed mid-write can corrupt only its own channel) and may run
at most ``queue_size`` items ahead of the consumer (credit-based flow control: the parent returns a
credit when the consumer takes the item). Time a worker spends waiting for credits, or the consumer
spends between two ``next()`` calls, is not held against it. Workers start their own process group,
so a kill also ends subprocesses they started (ffmpeg). An idle worker exits within a second when its
parent is gone; workers are daemonic (terminated when the parent exits normally), but one stuck in C
code outlives a parent killed with SIGKILL.

Workers outlive a run that ends with its last task: the next ``run`` of the same pool (the next shard)
gives them its tasks at once, with no new start-up (spawn and imports: ~2 CPU s each) and the worker
count reached on demand kept. A run that ends early (closed, or an exception) stops them all. ``close``
ends the pool.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler as _ForkingPickler
from typing import Any, Generic, Literal, TypeVar

from store.lineage import RUNTIME

logger = logging.getLogger(__name__)

T = TypeVar("T")
EventKind = Literal["item", "done", "error"]

_POLL_S = 1.0  # worker: how often an idle worker checks that its parent is alive
_MAX_WAIT_S = 5.0  # parent: longest single wait between checks
_STOP_JOIN_S = 5.0  # parent: grace period for a worker asked to stop before it is killed
_STARTUP_S = 60.0  # parent: time a fresh worker gets to start (imports) on top of timeout_s
_STARVED_SHARE = 0.25  # parent (ramp): the share of the time waited for items that asks for one more worker
_RAMP_WINDOW = 20.0  # parent (ramp): waits older than this many ramp_wait_s, without a start, are forgotten
_RAMP_STALL = 5.0  # parent (ramp): a worker silent this many ramp_wait_s before any item counts as a wait


@dataclass(frozen=True)
class Event:
    """One result of ``WorkerPool.run``: an item of a task, or the end of a task."""

    task_index: int  # position of the task in the ``tasks`` iterable
    kind: EventKind
    payload: Any  # the item; None for "done"; a one-line reason for "error"
    transient: bool = False  # an "error" that says nothing about the file: a timeout or a worker's death


def default_workers() -> int:
    """The default number of workers: the CPUs this process may run on (its affinity: what SLURM or a
    container's cpuset allows, not the whole machine) minus one for the consumer, at least 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 2
    return max(2, cpus - 1)


@dataclass
class WorkerConfig:
    """Pool settings."""

    # The most workers (0: run in-process: debugging, no timeout, no crash isolation). They start on
    # demand (ramp_wait_s), so the default is every CPU this process may use but one, at least 2.
    num_workers: int = field(default_factory=default_workers, metadata=RUNTIME)
    timeout_s: float = field(default=600.0, metadata=RUNTIME)  # a task making no progress (no item produced) for this long is killed
    max_tasks_per_worker: int = field(default=50, metadata=RUNTIME)  # recycle workers (decord leaks)
    queue_size: int = field(default=4, metadata=RUNTIME)  # items a worker may produce ahead of the consumer (backpressure)
    # Workers start on demand: one first, then, once items flow, twice as many each time the consumer
    # has waited this long in all (seconds) for items, for at least a quarter of the time since the
    # last start, while every running worker was busy. A consumer slower than one worker (CPU models)
    # keeps one worker; a fast one (a GPU) gets up to num_workers. 0: start num_workers at once.
    ramp_wait_s: float = field(default=0.5, metadata=RUNTIME)

    def validate(self) -> None:
        if (self.num_workers < 0 or self.timeout_s <= 0 or self.max_tasks_per_worker < 1
                or self.queue_size < 1 or self.ramp_wait_s < 0):
            raise ValueError(f"invalid worker config {self}")



def _reason(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 300 characters)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)[:300]


class _ParentGone(Exception):
    pass


def _recv(conn: mpc.Connection, parent_pid: int) -> tuple:
    """Next message from the parent; _ParentGone when the parent exited or closed the pipe."""
    while not conn.poll(_POLL_S):
        if os.getppid() != parent_pid:
            raise _ParentGone
    try:
        return conn.recv()
    except (EOFError, OSError) as exc:
        raise _ParentGone from exc


class _Sender:
    """The worker's messages to the parent; large ones written by a thread of their own.

    A pipe holds 64 KB; an item (a 10 s chunk of frames: ~12 MB) is only through once the parent reads
    it, which it does between two batches of the models. Written by the decoding thread, the next
    chunk would not start decoding before then, so the worker could never run ahead of a consumer busy
    with a long batch, whatever ``queue_size`` allows. So the decoding thread pickles (an item that
    cannot be sent is its task's error) and queues a large message for this thread to write; the
    credits bound the queue. A small message with nothing queued before it is written at once: it
    goes out even if the task then hangs in C code holding the GIL (a large one queued just before
    such a hang is lost with the task, which fails by its timeout). A write that fails (the parent
    is gone) ends the thread and makes the next ``send`` raise BrokenPipeError."""

    DIRECT_BYTES = 4096  # at most this much, with nothing queued, is written by the caller

    def __init__(self, conn: mpc.Connection) -> None:
        self.conn = conn
        self.broken = threading.Event()
        self._queue: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        self._queued = 0  # messages queued and not yet written (one producer: the decoding thread)
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="worker-sender", daemon=True).start()

    def send(self, msg: tuple) -> None:
        if self.broken.is_set():
            raise BrokenPipeError("the parent no longer reads")
        data = _ForkingPickler.dumps(msg)  # a view of the pickle: no copy
        with self._lock:
            direct = self._queued == 0 and len(data) <= self.DIRECT_BYTES
            if not direct:
                self._queued += 1
        if direct:
            self.conn.send_bytes(data)  # nothing is being written: the order is kept
        else:
            self._queue.put(data)

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            try:
                self.conn.send_bytes(data)
            except OSError:  # BrokenPipeError, ConnectionResetError: the parent is gone
                self.broken.set()
                return
            with self._lock:
                self._queued -= 1


def _worker_main(fn: Callable[[Any], Iterator[Any]], conn: mpc.Connection, queue_size: int,
                 parent_pid: int) -> None:
    """Worker loop: run tasks from the pipe, send ("start"|"item"|"done"|"error", index, payload)."""
    os.setpgrp()  # own process group: the parent's kill reaches our subprocesses too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    if os.getppid() != parent_pid:
        return
    out = _Sender(conn)
    in_flight = 0  # items sent and not yet credited back
    try:
        while True:
            msg = _recv(conn, parent_pid)
            if msg[0] == "stop":
                return
            if msg[0] == "ack":
                in_flight -= 1
                continue
            _, index, task = msg
            out.send(("start", index, None))
            gen = None
            try:
                gen = iter(fn(task))
                while True:
                    # credits first: fn is not resumed while queue_size items are unconsumed
                    while conn.poll(0) or in_flight >= queue_size:
                        msg = _recv(conn, parent_pid)
                        if msg[0] == "stop":
                            return
                        in_flight -= msg[0] == "ack"
                    try:
                        item = next(gen)
                    except StopIteration:
                        break
                    out.send(("item", index, item))
                    in_flight += 1
            except (_ParentGone, BrokenPipeError):
                raise
            except Exception as exc:  # noqa: BLE001 - reported to the parent as the task's error
                out.send(("error", index, _reason(exc)))
            else:
                out.send(("done", index, None))
            finally:
                if gen is not None and hasattr(gen, "close"):
                    try:
                        gen.close()
                    except Exception:  # noqa: BLE001
                        pass
    except (_ParentGone, BrokenPipeError, EOFError):
        return


@dataclass
class _Worker:
    proc: Any  # multiprocessing.process.BaseProcess
    conn: mpc.Connection
    task: int | None = None  # index of the running task
    n_tasks: int = 0  # tasks started
    started: bool = False  # has reported starting a task (process up and running)
    progress_at: float = field(default_factory=time.monotonic)


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"worker died (signal {signal.Signals(-exitcode).name})"
        except ValueError:
            return f"worker died (signal {-exitcode})"
    return f"worker died (exit code {exitcode})"


class WorkerPool(Generic[T]):
    """Runs ``fn(task)`` (a top-level, picklable generator function) over tasks in worker processes.

    Use as a context manager, or call ``close()``. Idle workers are kept between runs (see the module
    docstring); every process is cleaned up when ``run``'s iterator is closed early (GeneratorExit) or
    raises, and by ``close()``.
    """

    def __init__(self, fn: Callable[[T], Iterator[Any]], cfg: WorkerConfig) -> None:
        cfg.validate()
        self.fn = fn
        self.cfg = cfg
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * cfg.num_workers
        self._running = False
        self._closed = False
        self._n_items = 0  # items received (ramp: waits count once the first has come)

    def __enter__(self) -> WorkerPool[T]:
        return self

    def start(self, n_tasks: int | None = None) -> WorkerPool[T]:
        """Start the workers now, idle, instead of at the first task (only as many as ``n_tasks`` can
        use; one when they start on demand, ``ramp_wait_s``): a spawned worker first imports ``fn``'s
        module (torch: seconds), which the caller can overlap with its own set-up."""
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        n = len(self._workers) if n_tasks is None else min(len(self._workers), n_tasks)
        if self.cfg.ramp_wait_s > 0:
            n = min(n, 1)
        for slot in range(n):
            if self._workers[slot] is None:
                self._workers[slot] = self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop idle workers, kill busy ones, reap all; a run in progress ends (no more events)."""
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        for slot, w in enumerate(self._workers):
            if w is not None:
                self._workers[slot] = None
                self._retire(w, kill=w.task is not None)

    # -- running ---------------------------------------------------------------------------------

    def run(self, tasks: Iterable[T]) -> Iterator[Event]:
        """Events of all tasks (see the module docstring); tasks are read lazily. One run at a time."""
        if self._closed:
            raise RuntimeError("WorkerPool is closed")
        if self.cfg.num_workers == 0:
            return self._run_inline(tasks)
        return self._run(tasks)

    def _run_inline(self, tasks: Iterable[T]) -> Iterator[Event]:
        for index, task in enumerate(tasks):
            try:
                for item in self.fn(task):
                    yield Event(index, "item", item)
            except Exception as exc:  # noqa: BLE001
                yield Event(index, "error", _reason(exc))
            else:
                yield Event(index, "done", None)

    def _run(self, tasks: Iterable[T]) -> Iterator[Event]:
        if self._running:
            raise RuntimeError("WorkerPool.run is already in progress")
        self._running = True
        self._reap_idle()
        pending = enumerate(tasks)
        exhausted = False
        finished = False  # every task ended: the workers stay for the next run
        ramp = self.cfg.ramp_wait_s > 0
        grow = 0  # on demand (ramp): the consumer waited, so many more workers may start
        starved, since = 0.0, None  # (ramp) time waited for items since `since` (the last start)
        try:
            while not self._closed:
                # 1. give every idle worker a task; start a worker in an empty slot when none runs, or
                #    when it is wanted (ramp), or always (no ramp)
                for slot in range(len(self._workers)):
                    w = self._workers[slot]
                    if w is None and ramp and grow <= 0 and any(o is not None for o in self._workers):
                        continue
                    while not exhausted and (w is None or w.task is None):
                        nxt = next(pending, None)
                        if nxt is None:
                            exhausted = True
                            break
                        if w is None:
                            w = self._workers[slot] = self._start()
                            grow, starved, since = grow - 1, 0.0, None
                        reason = self._assign(w, *nxt)
                        if reason is not None:  # the task cannot be sent (pickling): next task
                            yield Event(nxt[0], "error", reason)
                            if self._closed:
                                return
                busy = [w for w in self._workers if w is not None and w.task is not None]
                if not busy:
                    finished = exhausted
                    return
                # 2. wait for a message, a death, or the earliest timeout (no longer than ramp_wait_s
                #    while a slot is free and a worker is up: the time waited may ask for one more)
                now = time.monotonic()
                wait_s = min(min(w.progress_at + self.cfg.timeout_s - now for w in busy), _MAX_WAIT_S)
                # (not before the first item: the first worker's start and first decode are latency,
                # not a consumer faster than its workers; unless a running task is stuck before it)
                stalled = any(w.started and now - w.progress_at >= _RAMP_STALL * self.cfg.ramp_wait_s for w in busy)
                may_grow = (ramp and (self._n_items > 0 or stalled) and not exhausted and None in self._workers
                            and all(o is None or o.task is not None for o in self._workers))
                if may_grow:
                    wait_s = min(wait_s, self.cfg.ramp_wait_s)
                objects: list[Any] = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
                ready = set(mpc.wait(objects, timeout=max(wait_s, 0.0)))
                t_waited, now = now, time.monotonic()
                if may_grow:
                    since = t_waited if since is None else since
                    starved += now - t_waited
                    if starved >= self.cfg.ramp_wait_s and starved >= _STARVED_SHARE * (now - since):
                        grow = sum(o is not None for o in self._workers)  # double: a GPU node ramps in a few steps
                    elif now - since > _RAMP_WINDOW * self.cfg.ramp_wait_s:  # fed: forget old waits
                        starved, since = 0.0, now
                # 3. timeouts, judged right after the wait (no consumer time in between)
                for w in busy:
                    if w.conn in ready or w.proc.sentinel in ready:
                        continue
                    if now - w.progress_at >= self.cfg.timeout_s:
                        index = w.task
                        assert index is not None
                        logger.warning("task %d: no progress for %.1f s; killing worker pid %s",
                                       index, self.cfg.timeout_s, w.proc.pid)
                        self._drop(w, kill=True)
                        yield Event(index, "error", f"timeout: no progress for {self.cfg.timeout_s:.1f} s",
                                    transient=True)
                # 4. messages (one per worker per round), then deaths
                for w in busy:
                    if self._slot_of(w) is None:
                        continue
                    if w.proc.sentinel in ready:
                        yield from self._drain_dead(w)
                    elif w.conn in ready:
                        yield from self._receive(w)
        finally:
            self._running = False
            if not finished:
                self._shutdown()

    def _reap_idle(self) -> None:
        """Retire idle workers whose process ended between runs (killed from outside, out of memory), so
        that no task is sent to a dead one and failed for it."""
        for w in self._workers:
            if w is not None and w.task is None and not w.proc.is_alive():
                logger.debug("worker pid %s ended while idle (exit code %s)", w.proc.pid, w.proc.exitcode)
                self._drop(w, kill=False)

    def _slot_of(self, w: _Worker) -> int | None:
        for slot, other in enumerate(self._workers):
            if other is w:
                return slot
        return None

    def _start(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.fn, child_conn, self.cfg.queue_size, os.getpid()),
            daemon=True,
            name="decode-worker",
        )
        proc.start()
        child_conn.close()
        logger.debug("started worker pid %s", proc.pid)
        return _Worker(proc=proc, conn=parent_conn)

    def _assign(self, w: _Worker, index: int, task: T) -> str | None:
        """Send a task to an idle worker; an error reason when the task cannot be pickled."""
        try:
            w.conn.send(("task", index, task))  # pickles completely before writing anything
        except (BrokenPipeError, OSError):
            pass  # the worker is dead: its sentinel reports it (as this task's error)
        except Exception as exc:  # noqa: BLE001
            return f"cannot send task: {_reason(exc)}"
        w.task = index
        w.n_tasks += 1
        # a fresh process first imports fn's module: that time is not the task's
        w.progress_at = time.monotonic() + (0.0 if w.started else _STARTUP_S)
        return None

    def _receive(self, w: _Worker) -> Iterator[Event]:
        """Handle one message of a live worker."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            yield from self._drain_dead(w)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. an item that cannot be unpickled here
            index = w.task
            self._drop(w, kill=True)
            if index is not None:
                yield Event(index, "error", f"cannot receive item: {_reason(exc)}")
            return
        yield from self._handle(w, msg)

    def _handle(self, w: _Worker, msg: tuple) -> Iterator[Event]:
        kind, index, payload = msg
        if kind == "start":
            w.started = True
            w.progress_at = time.monotonic()
        elif kind == "item":
            w.progress_at = time.monotonic()
            self._n_items += 1
            yield Event(index, "item", payload)
            try:  # the consumer took it: return the credit
                w.conn.send(("ack",))
            except (BrokenPipeError, OSError):
                pass
            w.progress_at = time.monotonic()
        elif kind in ("done", "error"):
            w.task = None
            if w.n_tasks >= self.cfg.max_tasks_per_worker:
                logger.debug("recycling worker pid %s after %d tasks", w.proc.pid, w.n_tasks)
                self._drop(w, kill=False)
            yield Event(index, kind, payload)

    def _drain_dead(self, w: _Worker) -> Iterator[Event]:
        """A worker whose process ended: deliver what it sent, then end its task with an error."""
        while True:
            try:
                if not w.conn.poll(0):
                    break
                msg = w.conn.recv()
            except Exception:  # noqa: BLE001 - EOF or a message cut short by the death
                break
            yield from self._handle(w, msg)
            if self._slot_of(w) is None:  # recycled after its last message
                return
        index = w.task
        pid = w.proc.pid
        exitcode = self._drop(w, kill=True)
        if index is not None:
            reason = _death_reason(exitcode)
            logger.warning("task %d: %s (pid %s)", index, reason, pid)
            yield Event(index, "error", reason, transient=True)

    def _drop(self, w: _Worker, kill: bool) -> int | None:
        """Take a worker out of its slot and retire it; its exit code."""
        slot = self._slot_of(w)
        if slot is not None:
            self._workers[slot] = None
        return self._retire(w, kill=kill)

    def _retire(self, w: _Worker, kill: bool) -> int | None:
        """Stop (or kill) a worker, reap it, close its pipe; its exit code.

        A kill goes to the worker's whole process group (its ffmpeg children too). It is sent only
        while the worker is not reaped yet (nothing polled it since it may have ended), so the group id
        cannot belong to another process.
        """
        w.task = None
        if not kill:
            try:
                w.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            w.proc.join(timeout=_STOP_JOIN_S)
            kill = w.proc.exitcode is None
        if kill:
            try:
                os.killpg(w.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                w.proc.kill()
            w.proc.join(timeout=_STOP_JOIN_S)
        exitcode = w.proc.exitcode
        w.conn.close()
        try:
            w.proc.close()
        except ValueError:  # still running (should not happen after SIGKILL + join)
            logger.warning("worker pid %s did not exit", w.proc.pid)
        return exitcode
