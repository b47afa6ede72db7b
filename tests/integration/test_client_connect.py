"""Where a client may connect, the client's side, with real sockets, processes and a real second
unix user: a socket in another user's directory is refused before anything is sent;
"permission denied" says so; no daemon at an ipc path is an error at once; a TCP
address that never answers fails within the connect timeout; a string that cannot be
encoded costs its own line only."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from exgen.client import Client, errors
from tests.conftest import EXGEN_CLIENT, submit_batch

pytestmark = pytest.mark.timeout(120)

OTHER_USER = "exgen-test-eve"


@pytest.fixture(scope="module")
def other_user() -> pwd.struct_passwd:
    """A second, unprivileged unix user (made once; we run as root here)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add a second unix user")
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        pass
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
        capture_output=True, text=True,
    )  # fmt: skip
    if made.returncode != 0 and "already exists" not in made.stderr:
        pytest.skip(f"cannot add a unix user: {made.stderr.strip()}")
    return pwd.getpwnam(OTHER_USER)


def as_user(user: pwd.struct_passwd, code: str) -> list[str]:
    """A python command that drops to ``user`` first (imports done before: this
    interpreter lives under /root, which the other user may not read)."""
    prelude = (
        "import os, sys, socket, time, json\n"
        "from exgen.client import Client, errors\n"
        f"os.setgroups([]); os.setgid({user.pw_gid}); os.setuid({user.pw_uid})\n"
    )
    return [sys.executable, "-c", prelude + code]


@pytest.fixture
def foreign_socket(other_user: pwd.struct_passwd) -> Iterator[tuple[Path, Path]]:
    """A directory in /tmp made by the other user, with a unix socket it listens on;
    the marker file says whether anything ever connected to it."""
    base = Path(tempfile.mkdtemp(prefix="exgen-eve-"))
    os.chmod(base, 0o777)
    directory, marker = base / "exgen", base / "connected"
    listener = subprocess.Popen(
        as_user(
            other_user,
            f"os.mkdir({str(directory)!r}, 0o755)\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            f"s.bind({str(directory / 'exgen.sock')!r}); s.listen(8); s.settimeout(30)\n"
            f"os.chmod({str(directory / 'exgen.sock')!r}, 0o777)\n"
            "print('listening', flush=True)\n"
            f"s.accept(); open({str(marker)!r}, 'w').write('yes')\n",
        ),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        yield directory, marker
    finally:
        listener.kill()
        listener.wait()
        if listener.stdout is not None:
            listener.stdout.close()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_a_socket_in_another_users_directory_is_refused_before_anything_is_sent(
    foreign_socket, other_user
):
    directory, marker = foreign_socket
    assert directory.stat().st_uid == other_user.pw_uid
    address = f"ipc://{directory}/exgen.sock"
    run = subprocess.run(
        [*EXGEN_CLIENT, "status", "--connect", address], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 3, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert str(directory) in line and OTHER_USER in line and "refusing" in line
    with pytest.raises(errors.UnsafeSocket), Client(address) as client:
        client.generate(["secret prompt"])
    time.sleep(0.2)
    assert not marker.exists(), "the client connected to a socket another user controls"


def test_permission_denied_is_reported_as_such(other_user):
    base = Path(tempfile.mkdtemp(prefix="exgen-perm-"))
    os.chmod(base, 0o755)
    path = base / "exgen.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"ipc://{path}")
    os.chmod(path, 0o600)  # root's daemon, and the other user not in its group
    try:
        out = subprocess.run(
            as_user(
                other_user,
                f"try:\n    Client('ipc://{path}').status()\n"
                "except errors.ExgenError as exc:\n"
                "    print(type(exc).__name__, exc, sep=': ')\n",
            ),
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        router.close()
        subprocess.run(["rm", "-rf", str(base)], check=False)
    assert out.stdout.startswith("ConnectionFailed: permission denied"), out.stdout + out.stderr
    assert str(path) in out.stdout and "mode 0600" in out.stdout and OTHER_USER in out.stdout


def test_no_daemon_at_an_ipc_path_is_an_error_at_once(tmp_path):
    missing = f"ipc://{tmp_path}/nobody.sock"
    stale = tmp_path / "stale.sock"
    raw = socket.socket(socket.AF_UNIX)
    raw.bind(str(stale))  # the file of a daemon that died: nothing listens
    raw.close()
    for address, words in ((missing, "does not exist"), (f"ipc://{stale}", "nothing is listening")):
        started = time.monotonic()
        with pytest.raises(errors.ConnectionFailed, match=words), Client(address) as client:
            client.status()
        assert time.monotonic() - started < 1.0
    run = subprocess.run(
        [*EXGEN_CLIENT, "submit", "-", "--connect", missing],
        input='{"prompt": "x"}\n', capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 3 and "does not exist" in run.stderr and "exgen serve" in run.stderr


def test_a_tcp_address_that_never_answers_fails_within_the_connect_timeout():
    silent = socket.socket()  # takes connections (the kernel's backlog), never speaks ZMTP
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
    try:
        started = time.monotonic()
        client = Client(address, timeout=60, connect_timeout=1.0)
        with pytest.raises(errors.ConnectTimeout, match="within 1s"), client:
            client.status()
        assert 0.9 < time.monotonic() - started < 5.0
        run = subprocess.run(
            [*EXGEN_CLIENT, "status", "--connect", address, "--connect-timeout", "1"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    finally:
        silent.close()
    assert run.returncode == 3 and "within 1s" in run.stderr, run.stderr


def test_a_lone_surrogate_costs_its_own_line_only(daemon_factory, tmp_path):
    daemon = daemon_factory("--engine", "synthetic", "--workers", "1")
    with daemon.client() as client:
        results = client.generate(["fine", "scraped \ud800 text", "also fine"], max_new_tokens=3)
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, errors.BadRequest) and results[1].error.field == "prompt"
    lines = [
        {"id": "a", "prompt": "fine"},
        {"id": "b", "messages": [{"role": "user", "content": "bad \ud800"}]},  # written \\ud800
        {"id": "c", "prompt": "fine too"},
    ]
    records = {r["id"]: r for r in submit_batch(daemon.address, lines, tmp_path, returncode=1)}
    assert records["a"]["error"] is None and records["c"]["error"] is None
    assert records["b"]["error"]["line"] == 2
    assert "messages[0].content: holds a lone surrogate" in records["b"]["error"]["message"]
