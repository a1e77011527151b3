"""A tiny backend for the lab: HTTP on --port, UDP echo on --udp-port.

    python -m lb.backend_server --name b1 --port 8080 --udp-port 9090

HTTP  GET /                   -> "backend=<name> client=<ip>:<port>\\n"
      GET /bytes?n=N[&rate=R] -> N bytes (R bytes/s if given, for long downloads)
      POST /sink              -> reads the body: "backend=<name> received=<bytes>\n"
UDP   any datagram           -> "backend=<name> client=<ip>:<port>\\n"
TCP   --echo-port: that line on connect, then every byte echoed (long-lived
      streams that notice a reset or a stall in either direction)

The peer address is what the server's socket sees, so tests can tell whether
the LB preserved the client address (DNAT) or replaced it (SNAT).
Prints "ready" on stdout once every socket listens.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Config:
    name: str
    host: str
    port: int
    udp_port: int | None
    echo_port: int | None = None


def identity(name: str, peer: tuple[str, int]) -> bytes:
    return f"backend={name} client={peer[0]}:{peer[1]}\n".encode()


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so benchmarks can reuse connections; every reply has a length.
    protocol_version = "HTTP/1.1"
    server_version = "xdplb-backend/1"
    backend_name = "?"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/":
            self._reply(identity(self.backend_name, self.client_address))
        elif url.path == "/bytes":
            self._bytes(parse_qs(url.query))
        else:
            self._reply(b"not found\n", status=404)

    def do_POST(self) -> None:
        """An upload (the client's data crosses the load balancer: DSR's
        path MTU test). The body is counted, not kept."""
        if urlsplit(self.path).path != "/sink":
            return self._reply(b"not found\n", status=404)
        try:
            left = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(b"need a Content-Length\n", status=411)
        received = 0
        while received < left:
            chunk = self.rfile.read(min(CHUNK, left - received))
            if not chunk:
                break
            received += len(chunk)
        self._reply(f"backend={self.backend_name} received={received}\n".encode())

    def _reply(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", self.backend_name)
        self.end_headers()
        self.wfile.write(body)

    def _bytes(self, query: dict[str, list[str]]) -> None:
        try:
            n = int(query.get("n", ["0"])[0])
            rate = float(query.get("rate", ["0"])[0])
        except ValueError:
            return self._reply(b"bad n or rate\n", status=400)
        if n < 0 or rate < 0:
            return self._reply(b"bad n or rate\n", status=400)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.send_header("X-Backend", self.backend_name)
        self.end_headers()
        stream(self.wfile, n, rate)

    def log_message(self, format: str, *args: object) -> None:
        pass  # nobody reads our stderr; keep it from filling a pipe


def stream(out, n: int, rate: float) -> None:
    """Write n bytes in chunks; with rate > 0, pace to `rate` bytes/s."""
    chunk = min(CHUNK, max(1, int(rate / 10))) if rate else CHUNK
    block = b"x" * chunk
    start, sent = time.monotonic(), 0
    while sent < n:
        size = min(chunk, n - sent)
        out.write(block[:size])
        sent += size
        if rate:
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    out.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # benchmarks open many connections at once


def serve_udp(sock: socket.socket, name: str) -> None:
    while True:
        _data, peer = sock.recvfrom(65535)
        sock.sendto(identity(name, peer), peer)


class EchoHandler(socketserver.BaseRequestHandler):
    backend_name = "?"

    def handle(self) -> None:
        sock = self.request
        sock.sendall(identity(self.backend_name, self.client_address))
        with contextlib.suppress(OSError):
            while data := sock.recv(CHUNK):
                sock.sendall(data)


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--udp-port", type=int, default=None)
    p.add_argument("--echo-port", type=int, default=None)
    a = p.parse_args(argv)
    return Config(name=a.name, host=a.host, port=a.port, udp_port=a.udp_port, echo_port=a.echo_port)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    handler = type("BoundHandler", (Handler,), {"backend_name": cfg.name})
    # An IPv6 host ("::" also takes IPv4, as ::ffff:a.b.c.d) needs an IPv6 socket.
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    httpd = type("BoundServer", (Server,), {"address_family": family})((cfg.host, cfg.port), handler)
    if cfg.udp_port:
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((cfg.host, cfg.udp_port))
        threading.Thread(target=serve_udp, args=(udp, cfg.name), daemon=True).start()
    if cfg.echo_port:
        echo_handler = type("BoundEcho", (EchoHandler,), {"backend_name": cfg.name})
        echo = type("BoundEchoServer", (EchoServer,), {"address_family": family})(
            (cfg.host, cfg.echo_port), echo_handler)
        threading.Thread(target=echo.serve_forever, daemon=True).start()
    print("ready", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
