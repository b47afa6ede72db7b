"""Nothing accepted is lost through kills, hangs, poison prompts, flapping
slots and daemon restarts. Real daemon, real worker processes (synthetic engine)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from exgen.client import errors
from exgen.client import protocol as P
from tests.conftest import EXGEN, EXGEN_CLIENT, RunningDaemon, start_daemon, wait_for
from tests.netutil import raw_dealer

pytestmark = pytest.mark.timeout(120)


def prompts(n: int, prefix: str = "p") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "prompt": f"{prefix} number {i}"} for i in range(n)]


def write_prompts(path: Path, n: int) -> list[str]:
    items = prompts(n)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return [str(item["id"]) for item in items]


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_each_once_ok(records: list[Any], ids: list[str]) -> None:
    """What the user sees: every id exactly once, every one a success."""
    counts = Counter(r["id"] if isinstance(r, dict) else r.id for r in records)
    missing = set(ids) - set(counts)
    assert not missing, f"{len(missing)} ids lost, e.g. {sorted(missing)[:5]}"
    dupes = [i for i, c in counts.items() if c != 1]
    assert not dupes, f"{len(dupes)} ids delivered more than once, e.g. {dupes[:5]}"
    assert set(counts) == set(ids), "unexpected ids"
    failed = [r for r in records if (r.get("error") if isinstance(r, dict) else r.error)]
    assert not failed, f"{len(failed)} failed, e.g. {failed[:3]}"


def submit_cli(address: str, prompts_file: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [*EXGEN_CLIENT, "submit", str(prompts_file), "-o", str(out), "--connect", address]
    return subprocess.Popen(
        [*cmd, "--max-new-tokens", "20", "--no-progress", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_children(daemon: RunningDaemon) -> list[psutil.Process]:
    return psutil.Process(daemon.proc.pid).children()


# --- 1. chaos ---------------------------------------------------------------------


def test_chaos_kill_9_a_random_worker_every_second(daemon_factory, tmp_path):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "4", "--engine-opt", "token_ms=12"
    )  # fmt: skip
    ids = write_prompts(tmp_path / "in.jsonl", 2000)
    out = tmp_path / "out.jsonl"
    submit = submit_cli(daemon.address, tmp_path / "in.jsonl", out)
    rng = random.Random(5)
    kills = 0
    deadline = time.monotonic() + 60
    while submit.poll() is None and time.monotonic() < deadline:
        time.sleep(0.8)
        workers = worker_children(daemon)
        if workers and submit.poll() is None:
            kills += kill_9(rng.choice(workers))
    _, stderr = submit.communicate(timeout=60)
    assert submit.returncode == 0, stderr
    assert kills >= 10, f"only {kills} kills: the job ended too soon to prove anything"
    assert_each_once_ok(read_output(out), ids)
    status = daemon.wait_ready(timeout=30)
    assert all(w["state"] == "ready" for w in status["workers"])
    assert sum(w["restarts"] for w in status["workers"]) >= kills - 1
    assert "requeued" in daemon.log_text()


def kill_9(proc: psutil.Process) -> int:
    """SIGKILL one process; 1 if it was there to kill."""
    try:
        proc.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        return 0
    return 1


# --- 2. hangs -----------------------------------------------------------------------


def test_hung_engine_is_caught_by_the_progress_deadline(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "hang_marker=HANG",
        "--engine-opt", "token_ms=5", "--progress-timeout", "1.5",
    )  # fmt: skip
    items = [*prompts(60), {"id": "hang", "prompt": "this one will HANG the engine"}]
    with daemon.client(timeout=30) as client:
        results = list(client.iter_results(items, max_new_tokens=10))
    by_id = {r.id: r for r in results}
    assert len(results) == len(by_id) == 61
    hang = by_id.pop("hang")
    assert isinstance(hang.error, errors.WorkerDied), hang
    assert "3 times" in hang.error.message and "no progress" in hang.error.message
    assert all(r.ok for r in by_id.values()), [r.error for r in by_id.values() if not r.ok]
    assert "kill slot" in daemon.log_text() and "engine hung?" in daemon.log_text()
    daemon.wait_ready(timeout=30)


def test_frozen_worker_is_caught_by_missed_heartbeats(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "token_ms=10",
        "--heartbeat-timeout", "3",
    )  # fmt: skip
    items = prompts(400)
    victim = daemon.worker_pids()[1]
    results = []
    with daemon.client(timeout=30) as client:
        for result in client.iter_results(items, max_new_tokens=10):
            results.append(result)
            if len(results) == 50:
                os.kill(victim, signal.SIGSTOP)
    assert_each_once_ok(results, [str(i["id"]) for i in items])
    status = daemon.wait_ready(timeout=30)
    slot1 = next(w for w in status["workers"] if w["slot"] == 1)
    assert slot1["pid"] != victim and "missed heartbeats" in slot1["last_exit"]
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"


# --- 3. poison ----------------------------------------------------------------------


def test_poison_prompt_fails_alone_after_max_attempts(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "crash_marker=POISON",
        "--engine-opt", "token_ms=5",
    )  # fmt: skip
    items = [*prompts(100), {"id": "poison", "prompt": "a POISON prompt"}]
    with daemon.client(timeout=30) as client:
        results = {r.id: r for r in client.iter_results(items, max_new_tokens=10)}
    assert len(results) == 101
    poison = results.pop("poison")
    assert isinstance(poison.error, errors.WorkerDied)
    assert "crashed a worker 3 times" in poison.error.message
    assert "exited with code 70" in poison.error.message  # the cause, not just "failed"
    assert all(r.ok for r in results.values()), [r.error for r in results.values() if not r.ok]
    status = daemon.wait_ready(timeout=30)  # the pool is not left dead
    assert sum(w["restarts"] for w in status["workers"]) >= 3
    with daemon.client() as client:
        assert client.generate(["after the poison"], max_new_tokens=3)[0].ok


def test_max_attempts_is_configurable(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "crash_marker=POISON",
        "--max-attempts", "2",
    )  # fmt: skip
    items = [*prompts(20), {"id": "poison", "prompt": "POISON"}]
    with daemon.client(timeout=30) as client:
        results = {r.id: r for r in client.iter_results(items, max_new_tokens=5)}
    assert "crashed a worker 2 times" in str(results.pop("poison").error)
    assert all(r.ok for r in results.values())


# --- 4. boot failure and flapping ---------------------------------------------------


def test_bad_model_path_is_one_line_and_no_daemon(tmp_path):
    out = subprocess.run(
        [*EXGEN, "serve", "--engine", "transformers", "--model", str(tmp_path / "nope"),
         "--listen", f"ipc://{tmp_path}/s.sock"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope" in lines[0], out.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_slot_that_cannot_load_leaves_the_others_serving(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "3", "--engine-opt", "token_ms=1",
        "--engine-opt", "fail_load=card 1 is broken", "--engine-opt", "fail_load_slots=1",
        ready=False,
    )  # fmt: skip
    daemon.wait_ready(count=2)
    items = prompts(300)
    with daemon.client() as client:
        results = list(client.iter_results(items, max_new_tokens=4))
    assert_each_once_ok(results, [str(i["id"]) for i in items])
    assert {r.slot for r in results} == {0, 2}, "only the slots that loaded serve"
    time.sleep(1.0)  # a boot error is final: no restart comes
    workers = {w["slot"]: w for w in daemon.status()["workers"]}
    broken = workers[1]
    assert broken["state"] == "failed" and broken["pid"] is None
    assert broken["restarts"] == 0
    assert "card 1 is broken" in broken["boot_error"]
    assert workers[0]["state"] == workers[2]["state"] == "ready"
    assert daemon.proc.poll() is None, "one broken slot must not stop the daemon"
    assert daemon.log_text().count("card 1 is broken") <= 3  # said once or twice, no loop


def test_a_slot_that_keeps_dying_backs_off_and_shows_failed(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "1", "--engine-opt", "crash_after=1",
        "--max-attempts", "100",
        env={"EXGEN_RESTART_BACKOFF_S": "0.2", "EXGEN_RESTART_BACKOFF_MAX_S": "1.6",
             "EXGEN_FLAP_MAX_DEATHS": "4"},
    )  # fmt: skip
    # One item that every worker dies on (after finishing it, before answering).
    sock = raw_dealer(daemon.address)
    sock.send_multipart(P.pack(P.SUBMIT, {"req": "r", "items": prompts(1)}))
    seen_failed = False
    delays: list[float] = []
    deadline = time.monotonic() + 30
    while len(delays) < 6 and time.monotonic() < deadline:
        seen_failed |= any(w["state"] == "failed" for w in daemon.status()["workers"])
        delays = [float(d) for d in re.findall(r"restart \d+ in ([\d.]+)s", daemon.log_text())]
        time.sleep(0.1)
    sock.close()
    assert delays[:6] == [0.2, 0.4, 0.8, 1.6, 1.6, 1.6], delays
    assert seen_failed, "a flapping slot must show as failed in status"


# --- 5. daemon restart mid-job ------------------------------------------------------

SMALL_POOL = ("--engine", "synthetic", "--workers", "2", "--engine-opt", "token_ms=10")


def restart_in(directory: Path, *args: str) -> RunningDaemon:
    """A new daemon on the same address as the one before it (its log kept aside)."""
    log = directory / "daemon.log"
    if log.exists():
        log.rename(directory / f"daemon-{time.monotonic_ns()}.log")
    return start_daemon(directory, *args)


def stop_quietly(*daemons: RunningDaemon | None) -> None:
    for daemon in daemons:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def test_sigterm_mid_submit_then_resume_gives_each_id_once(tmp_path):
    ids = write_prompts(tmp_path / "in.jsonl", 800)
    out = tmp_path / "out.jsonl"
    first = restart_in(tmp_path, *SMALL_POOL)
    second = None
    try:
        first.wait_ready()
        submit = submit_cli(first.address, tmp_path / "in.jsonl", out, "--timeout", "3")
        wait_for(lambda: out.exists() and len(read_output(out)) >= 150, 30, "150 results")
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(30) == 0
        _, stderr = submit.communicate(timeout=30)
        assert submit.returncode == 3 and "--resume" in stderr, stderr
        partial = read_output(out)
        assert 150 <= len(partial) < 800
        # Items the draining daemon handed back were not written as failures.
        assert all(r["error"] is None for r in partial)
        second = restart_in(tmp_path, *SMALL_POOL)
        second.wait_ready()
        resume = submit_cli(second.address, tmp_path / "in.jsonl", out, "--resume")
        _, stderr = resume.communicate(timeout=60)
        assert resume.returncode == 0, stderr
        assert f"{len(partial)} skipped" in stderr
        assert_each_once_ok(read_output(out), ids)
    finally:
        stop_quietly(first, second)


def test_client_library_rides_through_a_daemon_kill_and_restart(tmp_path, caplog):
    items = prompts(600)
    first = restart_in(tmp_path, *SMALL_POOL)
    second = None
    results = []
    try:
        first.wait_ready()
        with first.client(timeout=30) as client:
            for result in client.iter_results(items, max_new_tokens=10):
                results.append(result)
                if len(results) == 150:
                    old_workers = worker_children(first)
                    first.proc.kill()  # no drain: accepted work dies with it
                    first.proc.wait()
                    second = restart_in(tmp_path, *SMALL_POOL)
        assert_each_once_ok(results, [str(i["id"]) for i in items])
        assert "the exgen daemon restarted; resending" in caplog.text
        assert second is not None and second.proc.poll() is None
        psutil.wait_procs(old_workers, timeout=5)
    finally:
        stop_quietly(first, second)


# --- 9. shutdown --------------------------------------------------------------------


Message = tuple[bytes, dict[str, Any]]


def collect(sock: zmq.Socket[Any], until: Any, timeout: float) -> list[Message]:
    """Messages from a raw socket until ``until()`` is true or the time is up (without
    the lease probes: PONGs the router sends unasked to a client that has work)."""
    got = []
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        if sock.poll(100):
            message = P.unpack(sock.recv_multipart())
            if message[0] != P.PONG:
                got.append(message)
    return got


def test_sigterm_drains_and_refuses_new_work_with_draining(daemon_factory):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "token_ms=30",
        "--engine-opt", "capacity=2",
    )  # fmt: skip
    sock = raw_dealer(daemon.address)
    items = [{**i, "params": {"max_new_tokens": 30}} for i in prompts(20)]
    sock.send_multipart(P.pack(P.SUBMIT, {"req": "r1", "items": items, "stream": False}))
    [(command, _)] = collect(sock, lambda: False, 0.5)
    assert command == P.ACCEPTED
    wait_for(lambda: daemon.status()["inflight"] == 8, 10, "8 items in flight")
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    sock.send_multipart(P.pack(P.SUBMIT, {"req": "r2", "items": prompts(2, "late")}))
    messages = collect(sock, lambda: daemon.proc.poll() is not None, 30)
    sock.close()
    assert daemon.proc.wait(10) == 0
    done = [r for c, b in messages if c == P.RESULTS for r in b["results"]]
    refused = [(b.get("req"), i) for c, b in messages if c == P.ERROR for i in b.get("items", [])]
    assert all(b["code"] == P.E_DRAINING for c, b in messages if c == P.ERROR)
    # In flight when SIGTERM came: finished. Waiting: handed back. Late: refused.
    assert len(done) == 8 and all(r["error"] is None for r in done)
    handed_back = {i for req, i in refused if req != "r2"}
    assert handed_back | {r["id"] for r in done} == {i["id"] for i in items}
    assert {i for req, i in refused if req == "r2"} == {"late0", "late1"}
    assert "restart slot" not in daemon.log_text(), "a commanded stop counted as a crash"


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_stops_at_once(daemon_factory, second):
    daemon = daemon_factory(
        "--engine", "synthetic", "--workers", "2", "--engine-opt", "token_ms=100"
    )  # fmt: skip
    workers = worker_children(daemon)
    sock = raw_dealer(daemon.address)
    long_items = [{**i, "params": {"max_new_tokens": 1000}} for i in prompts(4)]
    sock.send_multipart(P.pack(P.SUBMIT, {"req": "r", "items": long_items}))
    wait_for(lambda: daemon.status()["inflight"] == 4, 10, "work in flight")
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert daemon.proc.poll() is None, "draining 100 s of work, not stopped yet"
    started = time.monotonic()
    daemon.proc.send_signal(second)
    assert daemon.proc.wait(15) == 0
    assert time.monotonic() - started < 5
    _, alive = psutil.wait_procs(workers, timeout=2)
    assert not alive
    messages = collect(sock, lambda: False, 0.5)
    sock.close()
    # The unfinished items were handed back (retryable), not left unanswered.
    handed_back = {i for c, b in messages if c == P.ERROR for i in b.get("items", [])}
    assert handed_back == {i["id"] for i in long_items}


def test_workers_exit_on_their_own_when_the_supervisor_is_killed(daemon_factory):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "3")
    workers = worker_children(daemon)
    assert len(workers) == 3
    daemon.proc.kill()
    daemon.proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=5)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"orphaned workers: {[p.pid for p in alive]}"
