"""Which heartbeat the frontend runs: the short one on an ipc address, where only
this machine's processes can connect, the longer one over TCP, loopback included (the
far end of an SSH tunnel has a network behind it). Checked on real bound sockets."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from exgen.daemon.config import Settings
from exgen.daemon.net.listen import bind_frontend, heartbeat_s
from tests.netutil import free_port

SETTINGS = Settings(client_heartbeat_s=1.0, ipc_heartbeat_s=0.1)


@pytest.mark.parametrize(
    ("listen", "expected_ms"), [("ipc", 100), ("tcp://127.0.0.1", 1000), ("tcp://0.0.0.0", 1000)]
)
def test_the_frontend_beats_fast_only_on_ipc(tmp_path: Path, listen: str, expected_ms: int) -> None:
    address = f"ipc://{tmp_path}/run/exgen.sock" if listen == "ipc" else f"{listen}:{free_port()}"
    ctx = zmq.Context()
    try:
        sock, _ = bind_frontend(ctx, SETTINGS, address)
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == expected_ms
        assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 3 * expected_ms
        sock.close(linger=0)
    finally:
        ctx.term()


def test_every_tcp_address_gets_the_network_beat() -> None:
    assert heartbeat_s(SETTINGS, "tcp://[::1]:5555") == 1.0
    assert heartbeat_s(SETTINGS, "tcp://localhost:5555") == 1.0
    assert heartbeat_s(SETTINGS, "tcp://192.0.2.7:5555") == 1.0
    assert heartbeat_s(SETTINGS, "ipc:///run/exgen/exgen.sock") == 0.1
