"""Supervisor lifecycle policy with fake processes: back-off, flapping, commanded
stops, boot errors, and which deaths count against the work on board."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytest

from exgen.daemon import policy
from exgen.daemon.config import Settings
from exgen.daemon.net import wire
from exgen.daemon.router.answers import Answers
from exgen.daemon.router.rooms import Rooms, Service
from exgen.daemon.router.status import describe_slot
from exgen.daemon.router.worker_messages import WorkerMessages
from exgen.daemon.supervisor import launch
from exgen.daemon.supervisor import supervisor as sup
from exgen.daemon.supervisor.launch import WorkerExit
from exgen.daemon.supervisor.slots import Serving, SlotTable
from exgen.daemon.worker import WorkerSpec


class FakeProc:
    """A worker process as a launcher reports it: placed at once, ended on demand."""

    _next_pid = 1000

    def __init__(self, slot: int) -> None:
        FakeProc._next_pid += 1
        self.slot = slot
        self.pid = FakeProc._next_pid
        self.node: str | None = "local"
        self.host: str | None = "here"
        self.devices: list[int] | None = None
        self.returncode: int | None = None
        self.oom_kill_seen: bool | None = False
        self.node_lost = False

    def is_pid(self, pid: int) -> bool:
        return pid == self.pid


class FakeLauncher:
    def start(self, slot: sup.Slot, spec: Any, env: dict[str, str]) -> FakeProc:
        return FakeProc(slot.id)

    def placed(self, procs: list[Any]) -> list[Any]:
        return []

    def exited(self, procs: list[Any]) -> list[tuple[Any, WorkerExit]]:
        return [
            (p, WorkerExit(p.returncode, p.oom_kill_seen, p.node_lost))
            for p in procs
            if p.returncode is not None or p.node_lost
        ]

    def signal(self, proc: Any, sig: int) -> None:
        proc.returncode = -sig

    def wait(self, procs: list[Any], timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


def make(settings: Settings | None = None) -> sup.Supervisor:
    supervisor = sup.Supervisor(
        settings or Settings(restart_backoff_s=0.5, restart_backoff_max_s=4.0),
        SlotTable([sup.Slot(0, None)]),
        "ipc://unused",
        "synthetic",
        None,
        FakeLauncher(),
    )
    supervisor.start_all()
    return supervisor


def die(
    supervisor: sup.Supervisor, now: float, returncode: int = 70, oom: bool | None = False
) -> sup.Exit:
    proc: Any = supervisor.slots[0].proc
    assert proc is not None
    proc.returncode, proc.oom_kill_seen = returncode, oom
    [exit_] = supervisor.reap_workers(now)
    return exit_


def test_restarts_back_off_exponentially_up_to_the_cap_then_show_failed():
    supervisor = make()
    slot = supervisor.slots[0]
    delays = []
    now = 0.0
    for _ in range(7):
        die(supervisor, now)
        delays.append(slot.next_start_at - now)
        now = slot.next_start_at
        supervisor.restart_due(now)
        assert slot.proc is not None, "restarted when due"
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert slot.state == sup.STARTING  # restarted; its history still says flapping
    die(supervisor, now)
    assert slot.state == sup.FAILED, "five or more deaths in the window: shown as failed"


def test_not_restarted_before_its_delay():
    supervisor = make()
    die(supervisor, 10.0)
    supervisor.restart_due(10.2)
    assert supervisor.slots[0].proc is None
    supervisor.restart_due(10.5)
    assert supervisor.slots[0].proc is not None


def test_a_worker_that_did_work_starts_the_back_off_over():
    supervisor = make()
    slot = supervisor.slots[0]
    for now in (0.0, 1.0, 3.0):
        die(supervisor, now)
        supervisor.restart_due(now + 10)
    assert slot.pid is not None
    slot.serving = Serving(slot.pid, b"w", 1, "synthetic", 0.0, None, {}, 20.0, 20.0)
    slot.serving.completed = 1  # the worker finished an item before it died
    die(supervisor, 20.0)
    assert slot.next_start_at - 20.0 == 0.5
    assert slot.state == sup.RESTARTING


def test_deaths_outside_the_flap_window_are_forgotten():
    supervisor = make(Settings(restart_backoff_s=0.5, flap_window_s=60.0))
    slot = supervisor.slots[0]
    die(supervisor, 0.0)
    supervisor.restart_due(1.0)
    die(supervisor, 100.0)
    assert slot.next_start_at - 100.0 == 0.5


def test_a_commanded_stop_is_not_a_crash():
    supervisor = make()
    supervisor.stop_all(signal.SIGTERM)
    [exit_] = supervisor.reap_workers(1.0)
    slot = supervisor.slots[0]
    assert not exit_.crashed
    assert slot.state == sup.STOPPED and not slot.deaths
    supervisor.restart_due(100.0)
    assert slot.proc is None, "a stopped slot is not restarted"


def test_a_boot_error_is_never_retried():
    supervisor = make()
    supervisor.slots[0].boot_error = "no such model"  # the worker's FATAL, as the router records it
    exit_ = die(supervisor, 0.0, returncode=policy.EXIT_BOOT_ERROR)
    assert not exit_.crashed and "no such model" in exit_.cause
    supervisor.restart_due(1000.0)
    assert supervisor.slots[0].proc is None
    assert supervisor.all_boot_failed(1000.0)


def test_a_boot_error_exit_reaped_before_its_message_is_not_retried_and_waits_for_it():
    # The worker sends FATAL then exits 3; the router may reap the exit first.
    supervisor = make()
    slot = supervisor.slots[0]
    exit_ = die(supervisor, 10.0, returncode=policy.EXIT_BOOT_ERROR)
    assert not exit_.crashed
    supervisor.restart_due(1000.0)
    assert slot.proc is None, "a boot-error exit is never restarted, message or not"
    assert not supervisor.all_boot_failed(10.0 + sup.FATAL_GRACE_S / 2), "the message may come"
    slot.boot_error = "no such model"  # read after the exit
    assert supervisor.all_boot_failed(10.0 + sup.FATAL_GRACE_S / 2)
    assert supervisor.boot_errors() == ["no such model"]


def test_a_boot_error_exit_whose_message_never_comes_fails_with_a_generic_reason():
    supervisor = make()
    die(supervisor, 10.0, returncode=policy.EXIT_BOOT_ERROR)
    assert supervisor.all_boot_failed(10.0 + sup.FATAL_GRACE_S)
    assert supervisor.boot_errors() == [sup.BOOT_ERROR_UNREAD]


def test_our_own_kill_names_its_cause_and_blames_the_work():
    supervisor = make()
    pid = supervisor.slots[0].pid
    assert pid is not None
    supervisor.kill_worker(0, pid, "no progress for 5s (engine hung?)")
    [exit_] = supervisor.reap_workers(1.0)
    assert exit_.cause == "no progress for 5s (engine hung?)"
    assert exit_.crashed and exit_.blames_work


class UnplacedProc(FakeProc):
    """A Ray worker: no pid, node, host or GPUs until its actor's answer is read, by
    whoever asks first (RayProcess: the router's READY check, or the placement poll)."""

    def __init__(self, slot: int) -> None:
        super().__init__(slot)
        self.facts = (self.pid, f"node-{slot}b", f"host-{slot}", [slot + 1])
        self.pid: int | None = None  # type: ignore[assignment]
        self.node = self.host = self.devices = None

    def resolve(self) -> None:
        self.pid, self.node, self.host, self.devices = self.facts

    def is_pid(self, pid: int) -> bool:
        self.resolve()
        return pid == self.pid


class PlacedLater(FakeLauncher):
    """Places as RayLauncher does, but its placement poll answers only once ``poll_due``
    is set: the race of a READY that reaches the router before the poll, made certain."""

    def __init__(self) -> None:
        self.poll_due = False

    def start(self, slot: sup.Slot, spec: Any, env: dict[str, str]) -> UnplacedProc:
        return UnplacedProc(slot.id)

    def placed(self, procs: list[Any]) -> list[Any]:
        if not self.poll_due:
            return []
        for proc in procs:
            proc.resolve()  # the actor has answered by now
        return procs


def ray_like(slots: int = 1) -> tuple[sup.Supervisor, PlacedLater]:
    launcher = PlacedLater()
    table = SlotTable([sup.Slot(i, None, resources={"GPU": 1.0}) for i in range(slots)])
    supervisor = sup.Supervisor(Settings(), table, "tcp://unused", "synthetic", None, launcher)
    supervisor.start_all()
    return supervisor, launcher


def say_ready(table: SlotTable, slot_id: int, now: float) -> None:
    """The worker's READY, through the router's own handler (which checks its pid)."""
    proc: Any = table.by_id[slot_id].proc
    ready = wire.Ready(slot_id, proc.facts[0], "synthetic", 4, None, 0.1, {})
    rooms = Rooms.build(Settings(), table, Service("", 0.0))
    WorkerMessages(rooms, Answers(rooms.clients, None))._on_ready(b"w%d" % slot_id, ready, now)


def spawn_lines(caplog: pytest.LogCaptureFixture, slot_id: int) -> list[str]:
    lines = [record.getMessage() for record in caplog.records]
    return [line for line in lines if line.startswith(f"spawn slot {slot_id} ")]


@pytest.mark.parametrize("ready_first", [True, False])
def test_a_ray_slot_is_placed_once_whether_its_ready_or_the_poll_comes_first(caplog, ready_first):
    caplog.set_level(logging.INFO, logger="exgen.supervisor")
    supervisor, launcher = ray_like()
    table, slot = supervisor.table, supervisor.slots[0]
    assert slot.state == sup.PENDING
    supervisor.reap_workers(0.0)
    if ready_first:
        say_ready(table, 0, 0.5)  # before the supervisor's poll has seen the placement
        assert slot.state == sup.READY
    launcher.poll_due = True
    for now in (1.0, 1.1, 1.2):
        supervisor.reap_workers(now)
    if not ready_first:
        assert slot.state == sup.STARTING
        say_ready(table, 0, 1.5)
    row = describe_slot(slot, 0, 2.0)
    pid = slot.proc.facts[0]  # type: ignore[union-attr]
    seen = {key: row[key] for key in ("state", "pid", "node", "host", "devices")}
    assert seen == {
        "state": "ready",
        "pid": pid,
        "node": "node-0b",
        "host": "host-0",
        "devices": [1],
    }
    assert spawn_lines(caplog, 0) == [f"spawn slot 0 pid {pid} node node-0b host host-0 GPU=1"]


def test_a_restarted_ray_slot_is_placed_again_when_its_ready_comes_first(caplog):
    caplog.set_level(logging.INFO, logger="exgen.supervisor")
    supervisor, launcher = ray_like(slots=2)
    launcher.poll_due = True
    supervisor.reap_workers(0.0)  # both placed by the poll
    slot = supervisor.slots[1]
    first: Any = slot.proc
    first.returncode = 70
    supervisor.reap_workers(1.0)
    launcher.poll_due = False
    supervisor.restart_due(10.0)
    assert slot.state == sup.PENDING and slot.node is None, "its old place is forgotten"
    say_ready(supervisor.table, 1, 10.5)
    launcher.poll_due = True
    supervisor.reap_workers(11.0)
    second: Any = slot.proc
    row = describe_slot(slot, 0, 12.0)
    assert (row["state"], row["pid"], row["node"]) == ("ready", second.facts[0], "node-1b")
    assert [line.split(" node ")[0] for line in spawn_lines(caplog, 1)] == [
        f"spawn slot 1 pid {first.facts[0]}",
        f"spawn slot 1 pid {second.facts[0]}",
    ]


@pytest.mark.parametrize(
    ("oom", "blamed", "words"),
    [
        (False, False, "from outside"),  # kill -9 by hand: not the prompt's fault
        (True, True, "OOM killer"),  # the kernel killed something: maybe the prompt
        (None, True, "killed by hand?"),  # cannot tell: count it
    ],
)
def test_an_outside_sigkill_blames_the_work_only_if_it_may_be_oom(oom, blamed, words):
    supervisor = make()
    exit_ = die(supervisor, 0.0, returncode=-signal.SIGKILL, oom=oom)
    assert exit_.crashed and exit_.blames_work is blamed
    assert words in exit_.cause


@pytest.mark.parametrize(
    ("before", "after", "seen"), [(5, 5, False), (5, 6, True), (None, 3, None)]
)
def test_the_local_launcher_reads_the_kernels_oom_counter_around_an_exit(
    monkeypatch, before, after, seen
):
    launcher = launch.LocalLauncher()
    launcher.oom_kills = before
    monkeypatch.setattr(launch, "read_oom_kills", lambda: after)
    proc = launcher.start(
        sup.Slot(0, None), WorkerSpec(0, "ipc://none", "synthetic", None, {}, 1.0, None), {}
    )
    launcher.signal(proc, signal.SIGKILL)
    proc.popen.wait()
    [(_, how)] = launcher.exited([proc])
    assert how.returncode == -signal.SIGKILL and how.oom_kill_seen is seen


def test_a_lost_node_blames_no_work_even_after_our_own_kill():
    supervisor = make()
    slot = supervisor.slots[0]
    proc: Any = slot.proc
    supervisor.kill_worker(0, proc.pid, "missed heartbeats for 11s (frozen?)")
    proc.returncode, proc.node_lost = None, True  # the launcher could not reach its node
    [exit_] = supervisor.reap_workers(1.0)
    assert exit_.crashed and not exit_.blames_work
    assert "missed heartbeats" in exit_.cause and "node" in exit_.cause
    assert slot.state == sup.RESTARTING, "the slot comes back (elsewhere, or when it rejoins)"


@pytest.mark.parametrize("returncode", [70, 1, -signal.SIGSEGV, -signal.SIGABRT])
def test_deaths_from_inside_always_blame_the_work(returncode):
    assert policy.death_blames_work(returncode, killed_by_us=False, oom_kill_seen=False)


def test_read_oom_kills(tmp_path: Path):
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("pgfault 12\noom_kill 7\nthp 0\n")
    assert launch.read_oom_kills(vmstat) == 7
    assert launch.read_oom_kills(tmp_path / "missing") is None


def test_read_oom_kills_on_this_machine_is_an_int_or_none():
    value: Any = launch.read_oom_kills()
    assert value is None or value >= 0


@pytest.mark.parametrize(
    ("attempts", "max_attempts", "alone", "verdict"),
    [
        (0, 3, False, policy.REQUEUE),  # an outside kill: nothing counted
        (1, 3, False, policy.REQUEUE),
        (2, 3, False, policy.PROBATION),  # two shared deaths: run it alone
        (3, 3, True, policy.FAIL),  # died alone the third time: poison
        (3, 3, False, policy.PROBATION),  # shared: a solo run decides, not its batch-mates
        (1, 2, False, policy.PROBATION),
        (2, 2, True, policy.FAIL),
        (1, 1, False, policy.FAIL),  # no retries asked for
        (5, 5, True, policy.FAIL),
        (4, 5, True, policy.PROBATION),
    ],
)
def test_poison_verdict(attempts, max_attempts, alone, verdict):
    assert policy.poison_verdict(attempts, max_attempts, alone) == verdict
