"""A submit swallowed by a daemon that died before answering anything is sent again
to the daemon that replaces it: the client library never hangs on lost work."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import zmq

from exgen.client import Client
from exgen.client import protocol as P
from tests.conftest import start_daemon

pytestmark = pytest.mark.timeout(120)


def test_submit_lost_before_any_answer_is_resent_to_the_next_daemon(tmp_path):
    address = f"ipc://{tmp_path}/exgen.sock"
    ctx = zmq.Context.instance()
    doomed = ctx.socket(zmq.ROUTER)  # takes the submit and dies without a word
    doomed.setsockopt(zmq.LINGER, 0)
    doomed.bind(address)
    results: list = []
    items = [{"id": f"i{k}", "prompt": f"prompt {k}"} for k in range(20)]

    def run() -> None:
        with Client(address, timeout=60) as client:
            results.extend(client.iter_results(items, max_new_tokens=4))

    thread = threading.Thread(target=run)
    thread.start()
    commands = []
    while P.SUBMIT not in commands:  # a HELLO comes first
        assert doomed.poll(10_000), f"the client sent no submit (only {commands})"
        commands.append(P.unpack(doomed.recv_multipart()[1:])[0])
    doomed.close()
    daemon = start_daemon(tmp_path, "--engine", "synthetic", "--workers", "1")
    try:
        thread.join(60)
        assert not thread.is_alive(), "the client hung on a submit nobody answered"
        assert Counter(r.id for r in results) == Counter(i["id"] for i in items)
        assert all(r.ok for r in results)
    finally:
        assert daemon.stop() == 0
