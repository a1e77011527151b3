"""lb.api.ApiServer: requests served by long-lived threads, each accepting
its own connections."""

from __future__ import annotations

import os
import socket
import time

from lb import api


def test_stuck_clients_do_not_block_others_and_close_ends_the_threads(tmp_path):
    server = api.ApiServer(str(tmp_path / "api.sock"), {"ping": lambda req: {"pong": req.get("n")}}).start()
    stuck = []
    try:
        for _ in range(api.WORKERS - 1):                 # connected, never sending a request
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(server.path))
            stuck.append(s)
        time.sleep(0.2)
        assert [api.call(str(server.path), "ping", timeout=5, n=i) for i in range(20)] == \
            [{"pong": i} for i in range(20)]             # the one free thread serves them all
    finally:
        server.close()
        for s in stuck:
            s.close()                                    # their threads see EOF and finish
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in server._threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in server._threads)
    assert not os.path.exists(server.path)
