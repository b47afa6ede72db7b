"""The daemon: one loop that owns the router's sockets and the supervisor.

Signal handlers only record the signal and wake the loop (through a wakeup fd the
poller watches); the loop acts on it in ``handle_signal``. Each tick: read
clients, read workers, reap exits (requeue their work), kill the hung, restart
what is due, send the results, dispatch, tell systemd how things stand.

The router (router/router.py) touches no socket: ``RouterSockets`` here is the only code
that reads or writes its two. It hands the router each message it reads and, after
each call, sends what the router left in its outbox, telling it how the sends to
clients went (``Router.on_sent``).
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from exgen.daemon import modelstore
from exgen.daemon.config import Settings
from exgen.daemon.net import curve, workerlink
from exgen.daemon.net.listen import ListenError, access_mode, bind_frontend, heartbeat_s
from exgen.daemon.net.sockets import readable
from exgen.daemon.router.control import LOCAL
from exgen.daemon.router.outbox import FULL, GONE, SENT, ToClient
from exgen.daemon.router.router import Router
from exgen.daemon.supervisor import supervisor as sup
from exgen.daemon.supervisor.gateway_keeper import GatewayKeeper
from exgen.daemon.supervisor.sdnotify import Notifier
from exgen.daemon.supervisor.slots import SlotTable

if TYPE_CHECKING:
    from exgen.daemon.metrics import Metrics
    from exgen.daemon.supervisor.launch import Launcher

logger = logging.getLogger("exgen.daemon")

TICK_MS = 100
# Reaping, liveness, restarts and systemd pings run at most this often (and at once
# on SIGCHLD): at tens of thousands of prompts a second the loop turns thousands of
# times a second, and a waitpid per slot per turn showed in the router's profile.
HOUSEKEEPING_S = 0.01
STATUS_EVERY_S = 2.0
METRICS_EVERY_S = 1.0
EXIT_NO_WORKERS = 3
MAX_FRAMES_PER_TICK = 2000  # messages read from one socket before doing anything else
FRONTEND_BUDGET_S = 0.05  # client messages handled per tick, at most, in seconds


class RouterSockets:
    """The router's frontend (clients) and backend (workers) sockets, read and written
    for it. ``inspect``: look at each client message's sender (its address, and its
    CURVE key with ``curve``), which costs a zero-copy read."""

    def __init__(
        self,
        router: Router,
        frontend: zmq.Socket[Any],
        backend: zmq.Socket[Any],
        inspect: bool,
        curve: bool,
    ) -> None:
        self.router = router
        self.frontend = frontend
        self.backend = backend
        self.inspect = inspect
        self.curve = curve

    def read_clients(self, now: float) -> None:
        # A time budget as well as a count: a flood of big submits must not keep the
        # loop from workers' heartbeats and from dispatching (what is left waits).
        # An idle worker with items waiting ends the turn at once: the first frame of
        # a job starts every worker, not the first 50 ms of frames (32 workers: the
        # first work left 60 ms sooner, bench/RESULTS.md).
        budget_end = time.monotonic() + FRONTEND_BUDGET_S
        for _ in range(MAX_FRAMES_PER_TICK):
            if not readable(self.frontend):
                return
            if self.inspect:
                self._read_inspected(now)
            else:
                self.router.on_client(self.frontend.recv_multipart(), now)
            self.send(now)  # before the next message: an ACK may ask for a resend
            if time.monotonic() > budget_end or self.router.starving():
                return

    def _read_inspected(self, now: float) -> None:
        parts = self.frontend.recv_multipart(copy=False)
        user = str(parts[-1].get("User-Id")) if self.curve else None
        peer = str(parts[-1].get("Peer-Address") or "") or None
        self.router.on_client([part.bytes for part in parts], now, user, peer)

    def read_workers(self) -> None:
        """Each message is stamped with the time it was read (worker_messages.py says why).
        What they make the router send (streamed text) goes once they are read: a
        worker's message asks for no send whose outcome the next one depends on."""
        now = time.monotonic()
        for _ in range(MAX_FRAMES_PER_TICK):
            if not readable(self.backend):
                self.router.caught_up_with_workers(time.monotonic())
                break
            frames = self.backend.recv_multipart()
            now = time.monotonic()
            self.router.on_worker(frames, now)
        self.send(now)

    def send(self, now: float) -> None:
        """Everything in the router's outbox (``Outbox.send_with``)."""
        if self.router.outbox:
            self.router.outbox.send_with(
                self._send_to_worker,
                self._send_to_client,
                lambda send, outcome: self.router.on_sent(send, outcome, now),
            )

    def _send_to_worker(self, identity: bytes, frames: list[bytes]) -> None:
        self.backend.send_multipart([identity, *frames])

    def _send_to_client(self, send: ToClient) -> str:
        try:
            self.frontend.send_multipart([send.identity, *send.frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            return FULL  # its pipe is full: it is not reading
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            return GONE  # no connection under its identity (ROUTER_MANDATORY)
        return SENT


class Daemon:
    def __init__(
        self, settings: Settings, listen: str, slots: list[sup.Slot], engine: str, model: str | None
    ) -> None:
        self.settings = settings
        self.listen = listen
        self.ctx = zmq.Context()
        self.frontend, self.auth = bind_frontend(self.ctx, settings, listen)
        self.rundir = Path(tempfile.mkdtemp(prefix="exgen-"))  # mode 0700: workers only
        try:
            self._wire(slots, engine, model)
        except BaseException:
            shutil.rmtree(self.rundir, ignore_errors=True)  # a failed start leaves nothing
            raise
        self.metrics_due = 0.0
        self.signals: list[int] = []
        self.drain_deadline: float | None = None
        self.exit_code: int | None = None
        self.announced_ready = False
        self.last_status = ""
        self.last_status_at = 0.0
        self.last_watchdog = 0.0
        self.housekeeping_due = 0.0
        self.child_exited = False

    def _wire(self, slots: list[sup.Slot], engine: str, model: str | None) -> None:
        launcher: Launcher | None = None
        if self.settings.ray is None:
            self.link = workerlink.bind_local(self.ctx, self.rundir)
            backend_address = self.link.address
        else:
            self.link = workerlink.bind_tcp(self.settings.ray_worker_listen)
            launcher, backend_address = self._ray_launcher()
        self.backend = self.link.socket
        self.table = SlotTable(slots)
        self.metrics = self._start_metrics(self.settings.metrics_listen)
        access = access_mode(self.listen, self.auth)
        self.router = Router(
            self.settings,
            self.table,
            model_name=self.settings.model_name or modelstore.served_name(model, engine),
            access=access,
            allowed_users=curve.allowed_user_ids(self.settings) if self.auth is not None else None,
            probe_s=heartbeat_s(self.settings, self.listen),
            latencies=self.metrics.latencies if self.metrics is not None else None,
        )
        self.io = RouterSockets(
            self.router, self.frontend, self.backend, access != LOCAL, self.auth is not None
        )
        server_key = self.link.keys.public if self.link.keys is not None else None
        self.supervisor = sup.Supervisor(
            self.settings, self.table, backend_address, engine, model, launcher, server_key
        )
        self.notifier = Notifier()
        self.gateway = GatewayKeeper.from_settings(self.settings, self.listen)

    def _ray_launcher(self) -> tuple[Launcher, str]:
        """Ray mode: actors anywhere in the cluster, dialling this machine's address."""
        from exgen.daemon.supervisor import launch_ray  # ray is imported in Ray mode only

        address = workerlink.advertised(self.link.address, launch_ray.node_ip())
        return launch_ray.RayLauncher(self.settings, self.link.keys), address

    # --- sockets ---------------------------------------------------------------------

    def _start_metrics(self, listen: str | None) -> Metrics | None:
        if listen is None:
            return None
        # Imported only when asked for: prometheus_client is a daemon-side extra.
        from exgen.daemon.config import parse_metrics_listen
        from exgen.daemon.metrics import Metrics

        metrics = Metrics(*parse_metrics_listen(listen))
        try:
            metrics.start()
        except OSError as exc:
            raise ListenError(f"metrics endpoint {listen}: {exc.strerror or exc}") from None
        return metrics

    # --- the loop ----------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(signum, self._record_signal)
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        logger.info("listening on %s (instance %s)", self.listen, self.router.service.instance)
        self.notifier.notify("STATUS=loading models")
        self.supervisor.start_all()
        self.gateway.start()
        try:
            while self.exit_code is None:
                ready = dict(poller.poll(TICK_MS))
                if wake_r.fileno() in ready:
                    _drain_wakeups(wake_r)
                started = time.monotonic()
                self.tick(started, self.frontend in ready, self.backend in ready)
                self.router.note_turn(started, time.monotonic())
        finally:
            self.shutdown()
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()
        return self.exit_code

    def _record_signal(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)

    def tick(self, now: float, clients: bool = True, workers: bool = True) -> None:
        """One turn of the loop; ``clients``/``workers``: that socket has messages.

        A socket that poll did not flag is not read: an empty read costs an exception
        (zmq.Again) per socket per turn, thousands of turns a second at full load.
        """
        while self.signals:
            self.handle_signal(self.signals.pop(0))
        self.io.send(now)
        if clients:
            self.io.read_clients(now)
        if workers:
            self.io.read_workers()
        else:
            self.router.caught_up_with_workers(now)
        housekeeping = self.child_exited or now >= self.housekeeping_due
        if housekeeping:
            self._housekeep(now)
            self.io.send(now)
        draining = self.drain_deadline is not None
        if draining:
            self._continue_draining(now)
        # Results out (the workers' and those housekeeping failed) before dispatching:
        # a client found gone while sending them gets no more of its items started.
        self.router.flush_results(now)
        self.io.send(now)
        if not draining:
            self.router.dispatch(time.monotonic())
            self.io.send(now)
        if housekeeping:
            self._notify_systemd(now)  # after dispatch: STATUS counts what just went out
        if self.metrics is not None and now >= self.metrics_due:
            self.metrics_due = now + METRICS_EVERY_S
            self.metrics.refresh(self.status(now))

    def _housekeep(self, now: float) -> None:
        """Reap exited workers; unless draining, kill the unresponsive and restart."""
        self.child_exited = False
        self.housekeeping_due = now + HOUSEKEEPING_S
        self.gateway.poll(now)  # reap and restart the HTTP gateway
        for exit_ in self.supervisor.reap_workers(now):
            self.router.on_worker_exit(
                exit_.slot, exit_.pid, exit_.cause, exit_.crashed, now, exit_.blames_work
            )
        self.router.tick(now)
        if self.drain_deadline is None:
            self._kill_unresponsive(now)
            self.supervisor.restart_due(now)
            self._check_all_failed(now)

    def _kill_unresponsive(self, now: float) -> None:
        for kill in self.router.find_unresponsive(now):
            self.supervisor.kill_worker(kill.slot, kill.pid, kill.cause, kill.blames_work)

    def _check_all_failed(self, now: float) -> None:
        if not self.supervisor.all_boot_failed(now):
            return
        reasons = "; ".join(self.supervisor.boot_errors())
        logger.error("no worker could start: %s", reasons)
        self.router.start_draining()
        self.exit_code = EXIT_NO_WORKERS

    # --- signals and draining ------------------------------------------------------------

    def handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.drain_deadline is None:
                self.handle_drain()
            else:
                logger.warning("second %s: stopping now", signal.Signals(signum).name)
                self.exit_code = 0
        elif signum == signal.SIGHUP:
            self.gateway.reload()  # it re-reads its API keys
            if self.auth is not None:
                allowed = curve.reload_allowed(self.auth, self.settings)
                if allowed is not None:
                    self.router.allow_users(allowed)
            else:
                logger.info("SIGHUP: nothing to reload; send SIGTERM to drain and stop")
        elif signum == signal.SIGCHLD:
            self.child_exited = True  # reap on this tick, not at the next housekeeping

    def handle_drain(self) -> None:
        inflight = self.router.inflight
        logger.info(
            "drain: finishing %d items in flight (up to %.0fs), taking no new work",
            inflight,
            self.settings.drain_timeout_s,
        )
        self.notifier.notify("STOPPING=1", f"STATUS=draining {inflight} items")
        self.drain_deadline = time.monotonic() + self.settings.drain_timeout_s
        self.router.start_draining()

    def _continue_draining(self, now: float) -> None:
        assert self.drain_deadline is not None
        alive = any(s.proc is not None for s in self.supervisor.slots.values())
        if self.router.inflight == 0 or now >= self.drain_deadline or not alive:
            if self.router.inflight:
                logger.warning("drain timeout: %d items not finished", self.router.inflight)
            self.exit_code = 0

    def shutdown(self) -> None:
        self.gateway.stop()  # first, so it records no item the stop fails
        keys = list(self.router.ledger.entries)
        if keys:
            self.router.hand_back(keys, "the daemon stopped before this item finished")
        self.io.send(time.monotonic())
        self.supervisor.stop_all(signal.SIGTERM)
        self.supervisor.wait_all(timeout_s=5.0)
        self.supervisor.launcher.close()
        self.frontend.close(linger=500)
        self.link.close()
        if self.auth is not None:
            self.auth.stop()  # before term: its ZAP socket would block it
        self.ctx.term()
        if self.listen.startswith("ipc://"):
            Path(self.listen[len("ipc://") :]).unlink(missing_ok=True)
        for leftover in self.rundir.iterdir():
            leftover.unlink(missing_ok=True)
        self.rundir.rmdir()
        if self.metrics is not None:
            self.metrics.close()
        logger.info("stopped")
        self.notifier.close()

    # --- systemd and status ----------------------------------------------------------------

    def _notify_systemd(self, now: float) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is not None and now - self.last_watchdog >= interval:
            self.notifier.notify("WATCHDOG=1")
            self.last_watchdog = now
        if not self.notifier.enabled:
            return
        # READY=1 the tick enough slots are ready, not on the next status beat.
        if not self.announced_ready and self.drain_deadline is None and self._enough_ready():
            self.announced_ready = True
            self.last_status, self.last_status_at = self._status_line(), now
            self.notifier.notify("READY=1", self.last_status)
            return
        if now - self.last_status_at < STATUS_EVERY_S / 4:
            return
        self.last_status_at = now
        line = self._status_line()
        if line != self.last_status:
            self.notifier.notify(line)
            self.last_status = line
        if not self.announced_ready and self.drain_deadline is None:
            # Loading a big model takes minutes: keep systemd's start timeout ahead of us.
            self.notifier.notify("EXTEND_TIMEOUT_USEC=30000000")

    def _enough_ready(self) -> bool:
        """min_ready slots (default: all) are ready, counting only slots that can start.

        A slot with a boot error or flapping is left out, so one bad card neither
        holds the unit in "activating" forever nor is hidden: STATUS shows it.
        """
        slots = self.supervisor.slots.values()
        startable = sum(1 for s in slots if s.state != sup.FAILED and s.boot_error is None)
        wanted = min(self.settings.min_ready or startable, startable)
        return self.supervisor.count(sup.READY) >= max(1, wanted)

    def _status_line(self) -> str:
        ready = self.supervisor.count(sup.READY)
        total = len(self.supervisor.slots)
        draining = "draining: " if self.router.draining else ""
        return (
            f"STATUS={draining}{ready}/{total} workers ready, "
            f"{self.router.queue.size} queued, {self.router.inflight} in flight"
        )

    def status(self, now: float) -> dict[str, Any]:
        return self.router.status(now)


def _drain_wakeups(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        pass
