"""WorkerPool: per-task order, timeouts, crashes, recycling, backpressure, cleanup.

The task functions are top-level so that spawned workers can import them. Each spawned worker imports
the ``extractors`` package (torch), so a worker start costs seconds: tests keep the pools small.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from extractors.workers import Event, WorkerConfig, WorkerPool

# --- task functions (run in worker processes) -------------------------------------------------------


def count_items(task: tuple[str, int]) -> Iterator[tuple[str, int]]:
    """Yields (name, 0..n-1) with a little jitter so that tasks interleave; n < 0: one item, then
    ValueError."""
    name, n = task
    if n < 0:
        yield name, 0
        raise ValueError("bad input\nsecond line is dropped")
    for i in range(n):
        time.sleep(0.002 * (i % 3))
        yield name, i


def hang_or_count(task: str) -> Iterator[str | int]:
    if task == "hang":
        child = subprocess.Popen(["sleep", "120"])  # like an ffmpeg the task started
        yield child.pid
        ctypes.PyDLL(None).sleep(3600)  # blocks in C while holding the GIL, like a stuck decord call
    for i in range(3):
        yield f"{task}-{i}"


def crash_or_count(task: str) -> Iterator[str]:
    if task == "crash":
        yield "before-crash"
        os.kill(os.getpid(), signal.SIGSEGV)
    for i in range(3):
        yield f"{task}-{i}"


def worker_pid(task: int) -> Iterator[tuple[int, int]]:
    yield task, os.getpid()


def timestamps(n: int) -> Iterator[tuple[int, float]]:
    """Produces n items as fast as credits allow, each stamped with its production time."""
    for i in range(n):
        yield i, time.monotonic()


def big_timestamps(n: int) -> Iterator[tuple[int, float, bytes]]:
    """Like ``timestamps``, with 2 MB items: far more than a pipe holds (a chunk of frames is ~12 MB)."""
    for i in range(n):
        yield i, time.monotonic(), bytes(2_000_000)


def child_then_hang(task: int) -> Iterator[int]:
    """Starts a subprocess, reports its pid, then hangs."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    time.sleep(3600)


def paced_items(task: tuple[int, float]) -> Iterator[int]:
    """Yields the worker's pid ``n`` times, each after ``delay`` seconds of "decoding"."""
    n, delay = task
    for _ in range(n):
        time.sleep(delay)
        yield os.getpid()


def silent_hang_or_count(task: str) -> Iterator[str]:
    """``"hang"``: hangs before its first item (a file that stalls the decoder at open)."""
    if task == "hang":
        time.sleep(3600)
    for i in range(2):
        yield f"{task}-{i}"


def decode_video(path: str) -> Iterator[tuple[int, int]]:
    """The extract stage's use: decode in the worker, send chunk sizes back."""
    from extractors.decode import DecodeConfig, iter_visual

    for chunk in iter_visual(path, DecodeConfig(chunk_seconds=2.0)):
        yield len(chunk.frames_2d), len(chunk.frames_3d)


# --- helpers ----------------------------------------------------------------------------------------


def by_task(events: list[Event]) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = defaultdict(list)
    for ev in events:
        out[ev.task_index].append(ev)
    return out


def assert_one_end_each(events: list[Event], n_tasks: int) -> None:
    groups = by_task(events)
    assert sorted(groups) == list(range(n_tasks))
    for index, evs in groups.items():
        ends = [ev for ev in evs if ev.kind in ("done", "error")]
        assert len(ends) == 1, (index, evs)
        assert evs[-1] is ends[0], f"task {index}: events after its end"


def gone(pid: int, within_s: float = 5.0) -> bool:
    """The process no longer runs (absent, or a zombie left to an init that does not reap)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _no_leftover_children() -> Iterator[None]:
    yield
    assert multiprocessing.active_children() == []


# --- tests ------------------------------------------------------------------------------------------


def test_items_in_order_per_task_one_end_event_and_inline_mode_agrees() -> None:
    tasks = [("t0", 5), ("t1", 0), ("t2", 7), ("t3", -1), ("t4", 3), ("t5", 6)]
    with WorkerPool(count_items, WorkerConfig(num_workers=2, timeout_s=30, queue_size=2)) as pool:
        events = list(pool.run(tasks))
    assert_one_end_each(events, len(tasks))
    groups = by_task(events)
    for index, (name, n) in enumerate(tasks):
        items = [ev.payload for ev in groups[index] if ev.kind == "item"]
        if n < 0:  # the exception: its items first, then a one-line error
            assert items == [(name, 0)]
            assert (groups[index][-1].kind, groups[index][-1].payload) == ("error", "ValueError: bad input")
        else:
            assert items == [(name, i) for i in range(n)]
            assert (groups[index][-1].kind, groups[index][-1].payload) == ("done", None)
    assert len(events) == 5 + 7 + 1 + 3 + 6 + len(tasks)
    with WorkerPool(count_items, WorkerConfig(num_workers=0)) as pool:
        inline = list(pool.run(tasks))
    assert inline == sorted(events, key=lambda ev: ev.task_index)  # same events, tasks in sequence


def test_hanging_task_is_killed_with_its_subprocess_and_the_others_complete() -> None:
    tasks = ["a", "hang", "b"]
    start = time.monotonic()
    with WorkerPool(hang_or_count, WorkerConfig(num_workers=1, timeout_s=1.5, queue_size=2)) as pool:
        events = list(pool.run(tasks))
    elapsed = time.monotonic() - start
    assert_one_end_each(events, len(tasks))
    groups = by_task(events)
    child = groups[1][0].payload
    assert [(ev.kind, ev.payload) for ev in groups[1]] == [
        ("item", child),
        ("error", "timeout: no progress for 1.5 s"),
    ]
    assert gone(child)  # killed with the worker's process group
    for index in (0, 2):
        items = [ev.payload for ev in groups[index] if ev.kind == "item"]
        assert items == [f"{tasks[index]}-{i}" for i in range(3)]
        assert groups[index][-1].kind == "done"
    assert elapsed < 60  # two worker start-ups (spawn) + 1.5 s, not the hour the task would sleep


def test_segfaulting_task_reports_worker_died_and_the_rest_complete() -> None:
    tasks = ["a", "crash", "b", lambda: None]  # the last one cannot even be sent to a worker
    with WorkerPool(crash_or_count, WorkerConfig(num_workers=1, timeout_s=30)) as pool:
        events = list(pool.run(tasks))
    assert_one_end_each(events, len(tasks))
    groups = by_task(events)
    assert [(ev.kind, ev.payload) for ev in groups[1]] == [
        ("item", "before-crash"),
        ("error", "worker died (signal SIGSEGV)"),
    ]
    assert groups[3][0].kind == "error" and groups[3][0].payload.startswith("cannot send task: ")
    for index in (0, 2):
        assert [ev.payload for ev in groups[index]] == [f"{tasks[index]}-{i}" for i in range(3)] + [None]
        assert groups[index][-1].kind == "done"


def test_workers_are_recycled_after_max_tasks() -> None:
    cfg = WorkerConfig(num_workers=1, timeout_s=30, max_tasks_per_worker=2)
    with WorkerPool(worker_pid, cfg) as pool:
        events = list(pool.run(range(4)))
    assert [ev.payload[0] for ev in events if ev.kind == "item"] == [0, 1, 2, 3]
    pids = [ev.payload[1] for ev in events if ev.kind == "item"]
    assert pids[0] == pids[1] != pids[2] == pids[3]
    assert os.getpid() not in pids
    assert all(gone(pid) for pid in pids)


def test_slow_consumer_gets_backpressure_not_timeouts() -> None:
    n, queue_size, pause = 8, 2, 0.25
    cfg = WorkerConfig(num_workers=1, timeout_s=1.0, queue_size=queue_size)
    consumed: dict[int, float] = {}
    produced: dict[int, float] = {}
    with WorkerPool(timestamps, cfg) as pool:
        events = []
        for ev in pool.run([n]):
            events.append(ev)
            if ev.kind == "item":
                i, t = ev.payload
                produced[i] = t
                consumed[i] = time.monotonic()
                time.sleep(pause)  # 8 × 0.25 s = 2 s in the consumer, longer than timeout_s
    assert [ev.kind for ev in events] == ["item"] * n + ["done"]
    # item i + queue_size is only produced after the consumer has taken item i
    for i in range(n - queue_size):
        assert produced[i + queue_size] >= consumed[i], (i, produced, consumed)
    # and it does run ahead up to the limit: item queue_size - 1 needs no credit back, so it is made
    # while the consumer still holds item 0
    assert produced[queue_size - 1] < consumed[0] + pause


def test_a_worker_runs_ahead_with_items_larger_than_a_pipe() -> None:
    """While the consumer holds item 0 (a long batch of the models), the worker goes on producing up to
    queue_size items, although each is far larger than the pipe: it does not wait for the parent to
    read one before it makes the next (extractors.workers._Sender)."""
    n, queue_size, pause = 6, 4, 1.0
    consumed: dict[int, float] = {}
    produced: dict[int, float] = {}
    with WorkerPool(big_timestamps, WorkerConfig(num_workers=1, timeout_s=30, queue_size=queue_size)) as pool:
        for ev in pool.run([n]):
            if ev.kind == "item":
                i, t, data = ev.payload
                assert len(data) == 2_000_000
                produced[i], consumed[i] = t, time.monotonic()
                time.sleep(pause if i == 0 else 0.0)
    assert sorted(produced) == list(range(n))
    assert produced[queue_size - 1] < consumed[0] + pause / 2  # made while the consumer held item 0
    assert produced[queue_size] >= consumed[0]  # and no further: the credits still bound it


def test_abandoning_run_kills_workers_and_their_subprocesses() -> None:
    pool = WorkerPool(child_then_hang, WorkerConfig(num_workers=2, timeout_s=60))
    child_pids: list[int] = []
    it = pool.run([0, 1, 2])
    for ev in it:
        if ev.kind == "item":
            child_pids.append(ev.payload)
        if len(child_pids) == 2:
            break
    worker_pids = [p.pid for p in multiprocessing.active_children()]
    assert len(worker_pids) == 2
    it.close()  # GeneratorExit inside run: the pool cleans up
    assert multiprocessing.active_children() == []
    assert all(gone(pid) for pid in worker_pids + child_pids)
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.run([0])


def test_decoding_in_workers(cfr_mp4: Path, text_mp4: Path) -> None:
    with WorkerPool(decode_video, WorkerConfig(num_workers=1, timeout_s=60)) as pool:
        events = list(pool.run([str(cfr_mp4), str(text_mp4)]))
    groups = by_task(events)
    assert [ev.payload for ev in groups[0]] == [(2, 48), (2, 48), (1, 24), None]
    assert [(ev.kind, ev.payload) for ev in groups[1]] == [
        ("error", "DecodeError: cannot open video: Invalid data found when processing input")
    ]


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        WorkerPool(count_items, WorkerConfig(num_workers=-1))
    with pytest.raises(ValueError):
        WorkerPool(count_items, WorkerConfig(queue_size=0))
    with pytest.raises(ValueError):
        WorkerPool(count_items, WorkerConfig(ramp_wait_s=-1))


def test_workers_start_on_demand() -> None:
    """One worker first; more only while the consumer waits for items (up to num_workers)."""
    cfg = WorkerConfig(num_workers=3, timeout_s=60, ramp_wait_s=0.3)
    # a consumer slower than its worker (the models on a CPU): the one worker keeps it fed
    with WorkerPool(paced_items, cfg) as pool:
        pool.start(6)
        assert len(multiprocessing.active_children()) == 1
        pids = []
        for ev in pool.run([(3, 0.0)] * 6):
            if ev.kind == "item":
                pids.append(ev.payload)
                time.sleep(0.05)
    assert len(pids) == 18 and len(set(pids)) == 1
    # a consumer faster than one worker (a GPU): it waits, so the pool grows to num_workers
    with WorkerPool(paced_items, cfg) as pool:
        events = list(pool.run([(2, 0.5)] * 6))
    pids = [ev.payload for ev in events if ev.kind == "item"]
    assert len(pids) == 12 and [ev.kind for ev in events].count("done") == 6
    assert len(set(pids)) == 3
    # many short waits count too: one worker making an item every 0.2 s never leaves a gap of
    # ramp_wait_s, but the consumer waits nearly all the time
    with WorkerPool(paced_items, cfg) as pool:
        events = list(pool.run([(4, 0.2)] * 6))
    pids = [ev.payload for ev in events if ev.kind == "item"]
    assert len(pids) == 24 and len(set(pids)) > 1
    # a first task stuck before any item does not hold the others until its timeout: after
    # _RAMP_STALL x ramp_wait_s of silence another worker starts and takes them
    t0 = time.monotonic()
    with WorkerPool(silent_hang_or_count, WorkerConfig(num_workers=2, timeout_s=30, ramp_wait_s=0.3)) as pool:
        seen = []
        for ev in pool.run(["hang", "a", "b"]):
            seen.append((ev.task_index, ev.kind, time.monotonic() - t0))
            if ev.task_index == 2 and ev.kind == "done":
                break
    assert [(i, k) for i, k, _ in seen] == [(1, "item"), (1, "item"), (1, "done"), (2, "item"), (2, "item"),
                                            (2, "done")]
    assert seen[-1][2] < 20  # long before the hung task's 30 s timeout
    # ramp_wait_s 0: every worker starts at once, as before
    with WorkerPool(paced_items, WorkerConfig(num_workers=3, timeout_s=60, ramp_wait_s=0)) as pool:
        pool.start(6)
        assert len(multiprocessing.active_children()) == 3
    assert multiprocessing.active_children() == []


def test_workers_outlive_a_finished_run_and_serve_the_next() -> None:
    """A run that ends with its last task leaves its workers up: the next run (the next shard) gets them
    with no start-up, the count reached on demand included; one that died while idle is replaced, and
    its death fails no task."""
    cfg = WorkerConfig(num_workers=3, timeout_s=60, ramp_wait_s=0.3)
    with WorkerPool(paced_items, cfg) as pool:
        first = [ev.payload for ev in pool.run([(2, 0.5)] * 6) if ev.kind == "item"]
        assert len(set(first)) == 3  # grown on demand (a fast consumer)
        alive = {p.pid for p in multiprocessing.active_children()}
        assert alive == set(first)  # idle, not stopped
        second = [ev.payload for ev in pool.run([(1, 0.0)] * 3) if ev.kind == "item"]
        assert len(second) == 3 and set(second) <= set(first)  # the same processes, no new start
        # a worker killed while idle (out of memory, an operator's kill) between two runs
        victim = sorted(alive)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while victim in {c.pid for c in multiprocessing.active_children()} and time.monotonic() < deadline:
            time.sleep(0.05)  # until it can be reaped (every thread of it ended), not only a zombie
        events = list(pool.run([(1, 0.0)] * 4))
        assert [ev.kind for ev in events].count("done") == 4 and not [ev for ev in events if ev.kind == "error"]
        third = {ev.payload for ev in events if ev.kind == "item"}
        assert victim not in third
    assert multiprocessing.active_children() == []  # close() ends them
    assert all(gone(pid) for pid in alive)


def test_a_run_ended_early_stops_every_worker_and_the_pool_can_run_again() -> None:
    cfg = WorkerConfig(num_workers=2, timeout_s=60, ramp_wait_s=0)
    with WorkerPool(paced_items, cfg) as pool:
        it = pool.run([(5, 0.05)] * 4)
        first = next(ev for ev in it if ev.kind == "item").payload
        it.close()
        assert multiprocessing.active_children() == []
        events = list(pool.run([(1, 0.0)] * 2))
        assert [ev.kind for ev in events].count("done") == 2
        assert first not in {ev.payload for ev in events if ev.kind == "item"}
