"""Traffic peers of the churn test: a UDP sender and a UDP recorder.

    python churn_peers.py send VIPS_JSON SECONDS FLOWS SOURCE OUT   (client namespace)
    python churn_peers.py record LISTEN_JSON ECHO OUT               (backend namespace)

Every datagram says which service it is for and when it was sent
(CLOCK_MONOTONIC, the same clock in every namespace). The recorder writes
down, per received datagram, the port it arrived on, the service, the send
and receive times; the test then checks it against the control plane's log.
A recorder with ECHO 1 (DSR backends, listening on the VIPs themselves)
sends every datagram back from the address it came to; the sender counts
those answers by the interface they arrived on and by whether they came
from the VIP of the service they name.
"""

from __future__ import annotations

import collections
import json
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time

PORTS = list(range(9100, 9106))      # where the NAT recorders listen, in every backend namespace
IP_PKTINFO = 8                       # <linux/in.h>; not exported by Python's socket module


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class Answers:
    """What the sender's sockets received: answers by arrival interface,
    and answers whose source is not their service's VIP."""

    def __init__(self, vips: list[list]) -> None:
        self.vip_of = {svc: socket.inet_pton(family_of(vip), vip) for svc, vip, _ in vips}
        self.by_iface: collections.Counter = collections.Counter()
        self.wrong_source = 0

    def watch(self, s: socket.socket) -> None:
        if s.family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.setblocking(False)

    def drain(self, s: socket.socket) -> None:
        while True:
            try:
                data, anc, _flags, peer = s.recvmsg(256, 64)
            except (BlockingIOError, ConnectionRefusedError):
                return
            ifindex = next((struct.unpack_from("i", d, 16 if level == socket.IPPROTO_IPV6 else 0)[0]
                            for level, _type, d in anc), 0)
            self.by_iface[socket.if_indextoname(ifindex) if ifindex else "?"] += 1
            if socket.inet_pton(s.family, peer[0]) != self.vip_of.get(int(data.split()[0])):
                self.wrong_source += 1


def send(vips: list[list], seconds: float, flows: int, source: str, out: str) -> None:
    answers = Answers(vips)

    def flow_socket() -> socket.socket:            # one socket per flow: a fixed source port
        s = socket.socket(family_of(source), socket.SOCK_DGRAM)
        s.bind((source, 0))
        answers.watch(s)
        return s

    socks = [flow_socket() for _ in range(flows)]
    sent = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            svc, vip, port = vips[sent % len(vips)]
            s = socks[sent % flows]
            try:
                s.sendto(f"{svc} {time.monotonic_ns()}".encode(), (vip, port))
            except BlockingIOError:
                continue
            sent += 1
            if sent % 2000 == 0:
                # ~31 answers a socket since the last drain: far from its buffer's size.
                for s in socks:
                    answers.drain(s)
                # A few new flows now and then: re-bind a socket to a new port.
                k = (sent // 2000) % flows
                socks[k].close()
                socks[k] = flow_socket()
                time.sleep(0.001)
    except KeyboardInterrupt:                      # the test's stop: collect the last answers
        time.sleep(0.2)
    for s in socks:
        answers.drain(s)
    with open(out, "w") as f:
        json.dump({"sent": sent, "answers": dict(answers.by_iface), "wrong_source": answers.wrong_source}, f)


def record(listen: list[list], echo: bool, out: str) -> None:
    sel = selectors.DefaultSelector()
    for host, port in listen:
        s = socket.socket(family_of(host), socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((host, port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, port)
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
                    data, peer = key.fileobj.recvfrom(256)
                except BlockingIOError:
                    break
                svc, sent = data.split()
                rows.append((key.data, int(svc), int(sent), time.monotonic_ns()))
                if echo:
                    try:
                        key.fileobj.sendto(data, peer)
                    except (BlockingIOError, ConnectionRefusedError):
                        pass
    with open(out, "w") as f:
        json.dump(rows, f)


class Peers:
    """The recorders (one per backend) and the sender, as lab processes.
    stop() ends them in order (sender, then recorders, which write their
    files); call it in a finally."""

    def __init__(self) -> None:
        self.recorders: list[subprocess.Popen] = []
        self.sender: subprocess.Popen | None = None

    def start(self, lab_, topo, out_dir, vips: list[list], *, source: str, listen: list[list],
              echo: bool = False) -> None:
        for b in topo.backends:
            p = lab_.popen(b.ns, [sys.executable, __file__, "record", json.dumps(listen), str(int(echo)),
                                  str(out_dir / f"{b.name}.json")], stdout=subprocess.PIPE, text=True)
            self.recorders.append(p)
            assert p.stdout.readline().strip() == "ready"
        self.sender = lab_.popen(topo.client_ns, [sys.executable, __file__, "send", json.dumps(vips), "3600",
                                                  "64", source, str(out_dir / "sent.json")])

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
        send(json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        record(json.loads(sys.argv[2]), sys.argv[3] == "1", sys.argv[4])
