"""The control API: JSON over a root-only Unix socket. There is no TCP API.

One request per connection: the client sends one JSON object and a newline,
the daemon answers one JSON object ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "...", "errors": [...]}``. Peers are checked with
SO_PEERCRED: only uid 0 may talk to it, and the socket file is mode 0600.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("xdplb.api")

DEFAULT_SOCKET = "/run/xdplb/api.sock"
MAX_REQUEST = 64 << 20            # a 20k-service config is a few MiB of JSON
WORKERS = 8                       # threads serving requests (handlers mostly wait for the daemon's lock)
REQUEST_TIMEOUT = 60.0            # a client that connects and sends nothing frees its worker then


class ApiError(Exception):
    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors or []


Handler = Callable[[dict[str, Any]], Any]


class _RequestHandler(socketserver.StreamRequestHandler):
    server: "_Server"
    timeout = REQUEST_TIMEOUT

    def handle(self) -> None:
        creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != 0:
            self._reply({"ok": False, "error": "permission denied: the xdplb API is root-only"})
            return
        try:
            line = self.rfile.readline(MAX_REQUEST)
        except TimeoutError:
            log.warning("api: no request within %gs; connection closed", REQUEST_TIMEOUT)
            return
        if not line:
            return          # closed without a request: a liveness probe (check_not_served)
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not a JSON object")
            cmd = req.pop("cmd")
            handler = self.server.handlers[cmd]
        except (ValueError, KeyError, TypeError) as e:
            self._reply({"ok": False, "error": f"bad request ({e}): {line[:200]!r}; "
                                               f"commands: {', '.join(sorted(self.server.handlers))}"})
            return
        try:
            self._reply({"ok": True, "result": handler(req)})
        except ApiError as e:
            self._reply({"ok": False, "error": str(e), "errors": e.errors})
        except Exception as e:   # report, keep serving
            log.exception("api %s failed", cmd)
            self._reply({"ok": False, "error": f"{type(e).__name__}: {e}",
                         "errors": list(getattr(e, "errors", []) or [])})

    def _reply(self, obj: dict) -> None:
        self.wfile.write(json.dumps(obj, default=str).encode() + b"\n")


class _Server(socketserver.UnixStreamServer):
    handlers: dict[str, Handler]


class ApiServer:
    """One request per connection, each accepted and served by one of
    WORKERS long-lived threads (the kernel wakes one accept() per
    connection): a thread started per request (socketserver.ThreadingMixIn)
    cost ~0.3 ms of CPU and as much latency per call on a busy 2-core
    machine, and a hand-off from one accepting thread to a worker ~0.1 ms
    (bench.loaded_update measures the calls)."""

    def __init__(self, path: str, handlers: dict[str, Handler]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        check_not_served(self.path)     # a live daemon's socket is never taken over
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()          # stale: its daemon is gone
        old = os.umask(0o177)          # created 0600, no window with wider bits
        try:
            self._server = _Server(str(self.path), _RequestHandler)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._server.handlers = handlers
        self._threads = [threading.Thread(target=self._serve, name=f"xdplb-api-{i}", daemon=True)
                         for i in range(WORKERS)]
        self._closing = False

    def start(self) -> "ApiServer":
        for t in self._threads:
            t.start()
        return self

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def _serve(self) -> None:
        server = self._server
        while True:
            try:
                request, client_address = server.get_request()
            except OSError as e:
                if self._closing:
                    return              # close(): shutdown() wakes every accept() with EINVAL
                log.warning("api: accept failed: %s", e)      # e.g. EMFILE: try again
                time.sleep(0.1)
                continue
            try:
                server.finish_request(request, client_address)
            except Exception:
                server.handle_error(request, client_address)
            finally:
                server.shutdown_request(request)

    def close(self) -> None:
        """Stop accepting; a request being served finishes in its thread."""
        self._closing = True
        with contextlib.suppress(OSError):
            self._server.socket.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def check_not_served(path: str | Path) -> None:
    """Raise ApiError if a daemon listens on `path`. Nothing there, or a
    socket nobody listens on (left by a daemon that was killed), is fine;
    anything else at the path is not removed."""
    path = Path(path)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISSOCK(mode) or stat.S_ISLNK(mode)):
        raise ApiError(f"{path} exists and is not a socket: remove it or set another api_socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return                                  # stale
        except OSError as e:
            raise ApiError(f"cannot tell whether a daemon serves {path}: {e.strerror or e}") from None
        pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))[0]
    finally:
        s.close()
    raise ApiError(f"another xdplb daemon (pid {pid}) is serving {path}: stop it first "
                   f"(SIGTERM keeps XDP attached; `xdplb down` detaches) or set another api_socket")


def call(path: str, cmd: str, timeout: float = 120.0, **args: Any) -> Any:
    """Send one request; return its result or raise ApiError."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ApiError(f"xdplb daemon is not running (no API socket at {path}); "
                           f"start it with `xdplb run --config FILE`") from None
        except ConnectionRefusedError:
            raise ApiError(f"xdplb daemon is not running (nothing listens on {path}, a socket left "
                           f"by a daemon that exited); start it with `xdplb run --config FILE`") from None
        except PermissionError:
            raise ApiError(f"permission denied on {path}: the xdplb API is root-only") from None
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise ApiError(f"no answer from the daemon on {path} within {timeout:g} s") from None
    except OSError as e:
        raise ApiError(f"talking to the daemon on {path} failed: {e.strerror or e}") from None
    finally:
        s.close()
    if not buf:
        raise ApiError(f"no answer from the daemon on {path}")
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ApiError(f"not an xdplb answer from {path}: {buf[:200]!r}") from None
    if not reply.get("ok"):
        raise ApiError(reply.get("error", "unknown error"), reply.get("errors"))
    return reply["result"]
