"""Access: local-only by default; beyond loopback only with CURVE keys
(or --insecure); a client without an allowed key gets nothing at all."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from exgen.client import Client, CurveKeys, errors
from exgen.daemon import cli as daemon_cli
from exgen.daemon.config import Settings
from tests.conftest import EXGEN, EXGEN_CLIENT
from tests.integration.curve_support import keygen, start_curve_daemon
from tests.netutil import free_port

pytestmark = pytest.mark.timeout(90)


def test_default_ipc_socket_is_owner_and_group_only(tmp_path):
    # No --listen: the per-user socket, in a directory the daemon makes itself.
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "xdg")}
    env.pop("EXGEN_ADDRESS", None)
    proc = subprocess.Popen(
        [*EXGEN, "serve", "--engine", "synthetic"], env=env, stderr=subprocess.DEVNULL
    )
    sock_path = tmp_path / "xdg" / "exgen" / "exgen.sock"
    try:
        with Client(f"ipc://{sock_path}", timeout=20) as client:
            client.wait_ready(timeout=20)  # no daemon yet is an error at once, not a wait
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660
        assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o750
    finally:
        proc.terminate()
        proc.wait(30)


def test_non_loopback_tcp_without_keys_is_refused_with_one_line(tmp_path):
    out = subprocess.run(
        [*EXGEN, "serve", "--engine", "synthetic", "--listen", f"tcp://0.0.0.0:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "reachable from other machines" in out.stderr and "--insecure" in out.stderr


@pytest.mark.parametrize(
    ("listen", "settings", "ok"),
    [
        ("tcp://0.0.0.0:5555", Settings(), False),
        ("tcp://0.0.0.0:5555", Settings(insecure=True), True),
        ("tcp://10.1.2.3:5555", Settings(curve_secret_key="s", curve_allowed_dir="d"), True),
        ("tcp://127.0.0.1:5555", Settings(), True),
        ("tcp://[::1]:5555", Settings(), True),
        ("tcp://localhost:5555", Settings(), True),
        ("ipc:///tmp/x.sock", Settings(), True),
    ],
)
def test_listen_security_rule(listen, settings, ok):
    if ok:
        daemon_cli.check_listen_security(listen, settings)
    else:
        with pytest.raises(daemon_cli.CliError):
            daemon_cli.check_listen_security(listen, settings)


@pytest.fixture
def curve_daemon(daemon_factory, tmp_path):
    return start_curve_daemon(
        daemon_factory, tmp_path, "--engine", "synthetic", strangers=["mallory"]
    )


def test_curve_lets_in_only_allowed_keys(curve_daemon):
    daemon, keys = curve_daemon
    with daemon.client(timeout=10) as client:
        assert client.generate(["hello"], max_new_tokens=3)[0].ok
    mallory = CurveKeys.from_files(keys / "server.key", keys / "mallory.key_secret")
    for curve in (None, mallory):
        with Client(daemon.address, timeout=2, curve=curve) as stranger:
            with pytest.raises(errors.Timeout):
                stranger.status()
            with pytest.raises(errors.Timeout):
                stranger.generate(["let me in"], max_new_tokens=3)
    assert daemon.status()["completed"] == 1, "the strangers' work must never have run"


def test_exgen_client_cli_with_keys(curve_daemon, tmp_path):
    daemon, keys = curve_daemon
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"k{i}", "prompt": "x"}) + "\n" for i in range(5)))
    base = [*EXGEN_CLIENT, "submit", str(inp), "-o", "-", "--connect", daemon.address]
    keyed = [*base, "--server-key", str(keys / "server.key")]
    keyed += ["--client-key", str(keys / "alice.key_secret")]
    out = subprocess.run(keyed, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 5
    env = {**os.environ, "EXGEN_SERVER_KEY": str(keys / "server.key"),
           "EXGEN_CLIENT_KEY": str(keys / "alice.key_secret")}  # fmt: skip
    status = subprocess.run(
        [*EXGEN_CLIENT, "status", "--json", "--connect", daemon.address],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert status.returncode == 0 and json.loads(status.stdout)["completed"] == 5
    refused = subprocess.run(
        [*EXGEN_CLIENT, "status", "--connect", daemon.address, "--timeout", "2"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 3


def test_curve_setting_errors_are_one_line(tmp_path):
    keygen(tmp_path, "server")
    port = free_port()
    cases = [
        (["--curve-secret-key", str(tmp_path / "server.key")], "no secret key"),
        (["--curve-secret-key", str(tmp_path / "server.key_secret")], "curve_allowed_dir"),
        (
            ["--curve-secret-key", str(tmp_path / "server.key_secret"),
             "--curve-allowed-dir", str(tmp_path / "missing")],
            "not a directory",
        ),
    ]  # fmt: skip
    for args, words in cases:
        args = [*args, "--curve-allowed-dir", str(tmp_path)] if words == "no secret key" else args
        out = subprocess.run(
            [*EXGEN, "serve", "--engine", "synthetic", "--listen", f"tcp://127.0.0.1:{port}",
             *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_revoked_key_loses_service_on_its_open_connection(curve_daemon):
    daemon, _ = curve_daemon
    allowed = Path(next(a for a in daemon.proc.args if str(a).endswith("allowed")))
    with daemon.client(timeout=3) as client:  # one connection, kept open throughout
        assert client.generate(["before"], max_new_tokens=3)[0].ok
        (allowed / "alice.key").unlink()
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        with pytest.raises(errors.Timeout):
            client.generate(["after the revocation"], max_new_tokens=3)
    assert "revoked" in daemon.log_text()


def other_user() -> int:
    """A second unix user's uid (made once; we run as root in CI)."""
    name = "exgen-test-other"
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        pass
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a second unix user")
    subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, timeout=30)
    return pwd.getpwnam(name).pw_uid


def test_an_ipc_directory_of_another_user_is_refused(tmp_path):
    uid = other_user()
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, uid, uid)
    out = subprocess.run(
        [*EXGEN, "serve", "--engine", "synthetic", "--listen", f"ipc://{theirs}/exgen.sock"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(theirs) in lines[0] and "exgen-test-other" in lines[0], lines
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    out = subprocess.run(
        [*EXGEN, "serve", "--engine", "synthetic", "--listen", f"ipc://{open_dir}/exgen.sock"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "writable by others" in out.stderr
