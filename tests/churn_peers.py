"""Traffic peers of the churn test: a UDP sender and a UDP recorder.

    python churn_peers.py send VIPS_JSON SECONDS FLOWS OUT      (client namespace)
    python churn_peers.py record PORTS_JSON OUT                 (backend namespace)

Every datagram says which service it is for and when it was sent
(CLOCK_MONOTONIC, the same clock in every namespace). The recorder writes
down, per received datagram, the port it arrived on, the service, the send
and receive times; the test then checks it against the control plane's log.
"""

from __future__ import annotations

import json
import selectors
import signal
import socket
import subprocess
import sys
import time

PORTS = list(range(9100, 9106))      # where the recorders listen, in every backend namespace


def send(vips: list[list], seconds: float, flows: int, out: str) -> None:
    socks = []
    for i in range(flows):                       # one socket per flow: a fixed source port
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("10.1.0.10", 0))
        socks.append(s)
    sent = 0
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        svc, vip, port = vips[i % len(vips)]
        s = socks[i % flows]
        s.sendto(f"{svc} {time.monotonic_ns()}".encode(), (vip, port))
        sent += 1
        i += 1
        if i % 2000 == 0:
            # A few new flows now and then: re-bind a socket to a new port.
            k = (i // 2000) % flows
            socks[k].close()
            socks[k] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks[k].bind(("10.1.0.10", 0))
            time.sleep(0.001)
    with open(out, "w") as f:
        json.dump({"sent": sent}, f)


def record(ports: list[int], out: str) -> None:
    sel = selectors.DefaultSelector()
    for p in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("0.0.0.0", p))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, p)
    rows: list[tuple] = []
    stop = False

    def finish(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, finish)
    print("ready", flush=True)
    while not stop:
        for key, _ in sel.select(0.2):
            while True:
                try:
                    data = key.fileobj.recv(256)
                except BlockingIOError:
                    break
                svc, sent = data.split()
                rows.append((key.data, int(svc), int(sent), time.monotonic_ns()))
    with open(out, "w") as f:
        json.dump(rows, f)


class Peers:
    """The recorders (one per backend) and the sender, as lab processes.
    stop() ends them in order (sender, then recorders, which write their
    files); call it in a finally."""

    def __init__(self) -> None:
        self.recorders: list[subprocess.Popen] = []
        self.sender: subprocess.Popen | None = None

    def start(self, lab_, topo, out_dir, vips: list[list]) -> None:
        for b in topo.backends:
            p = lab_.popen(b.ns, [sys.executable, __file__, "record", json.dumps(PORTS),
                                  str(out_dir / f"{b.name}.json")], stdout=subprocess.PIPE, text=True)
            self.recorders.append(p)
            assert p.stdout.readline().strip() == "ready"
        self.sender = lab_.popen(topo.client_ns, [sys.executable, __file__, "send", json.dumps(vips), "3600",
                                                  "64", str(out_dir / "sent.json")])

    def stop(self) -> None:
        if self.sender:
            self.sender.send_signal(signal.SIGINT)
            self.sender.wait(10)
        time.sleep(0.3)
        for p in self.recorders:
            p.send_signal(signal.SIGTERM)
            p.wait(20)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        record(json.loads(sys.argv[2]), sys.argv[3])
