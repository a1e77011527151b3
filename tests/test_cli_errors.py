"""Operational errors of the real CLI and daemon end in one clear line and
a non-zero exit, never a traceback; and `ip netns exec NS xdplb run`, whose
/sys has no bpffs, binds the host's and keeps its pins there.

"One line" is checked on stdout and stderr together, after dropping the
normal INFO/DEBUG log lines (the daemon logs `starting ...` before it fails):
exactly one line is left, and it says what failed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lb import api
from lb.dataplane import Dataplane
from lb.lab import REPO_ROOT, Lab
from loader import Map, XdpLink
from lbtest import pin_dir

PID = os.getpid()
# `2025-01-01 12:00:00,123 INFO xdplb: ...` (daemon) or `... xdplb INFO ...` (CLI).
NORMAL_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\S+ )?(INFO|DEBUG)\b")
CLI = [sys.executable, "-m", "lb.cli"]
ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
_n = iter(range(1000))


@pytest.fixture(scope="module")
def veth_ns():
    """A namespace with a veth pair, xe0 <-> xe1: something to attach to."""
    with Lab(prefix="xce") as lab:
        ns = lab.netns("e")
        lab.veth(ns, "xe0", ns, "xe1")
        yield lab, ns


@pytest.fixture
def conf(tmp_path, bpf_object):
    """conf(**overrides) -> (path of a config file, the config); its pins
    are removed afterwards, whatever happened."""
    made: list[dict] = []

    def make(**over) -> tuple[Path, dict]:
        n = next(_n)
        cfg = {"interfaces": ["xe0"], "bpffs": pin_dir(), "api_socket": f"/run/xdplb/test-err-{PID}-{n}.sock",
               "metrics_address": False, "services": []}
        cfg.update(over)
        path = tmp_path / f"xdplb-{n}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        made.append(cfg)
        return path, cfg

    yield make
    for cfg in made:
        if str(cfg["bpffs"]).startswith("/sys/fs/bpf/"):
            Dataplane.detach(Path(cfg["bpffs"]), purge=True)
        Path(cfg["api_socket"]).unlink(missing_ok=True)


def xdplb(*args: str, prefix: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *CLI, *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=ENV, timeout=timeout)


def one_error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert: a non-zero exit, no traceback, exactly one line besides the
    normal log lines, and that line contains every needle."""
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip() and not NORMAL_LOG.match(line)]
    assert len(lines) == 1, out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class Daemon:
    """`xdplb run` as a process (optionally behind a prefix such as
    `ip netns exec NS`); ready once its API answers."""

    def __init__(self, config: Path, cfg: dict, log: Path, prefix: tuple[str, ...] = (),
                 args: tuple[str, ...] = ()):
        self.cfg, self.log = cfg, log
        self.proc = subprocess.Popen([*prefix, *CLI, "run", "--config", str(config), *args],
                                     stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                     env=ENV)

    def ready(self, timeout: float = 120) -> "Daemon":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if api.call(self.cfg["api_socket"], "status", timeout=5)["pid"] == self.proc.pid:
                    return self
            except api.ApiError:
                pass
            time.sleep(0.1)
        raise TimeoutError(self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(30)


# ---- the API socket -----------------------------------------------------------


def stale_socket(path: str) -> None:
    """A socket file nobody listens on: what a killed daemon leaves."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()


def test_status_without_a_daemon():
    sock = f"/run/xdplb/test-err-{PID}-nobody.sock"
    Path(sock).unlink(missing_ok=True)
    one_error_line(xdplb("--socket", sock, "status"), "error: xdplb daemon is not running", sock,
                   "xdplb run --config FILE")


def test_status_with_a_stale_socket():
    sock = f"/run/xdplb/test-err-{PID}-stale.sock"
    stale_socket(sock)
    try:
        one_error_line(xdplb("--socket", sock, "status"), "error: xdplb daemon is not running",
                       f"nothing listens on {sock}")
    finally:
        Path(sock).unlink(missing_ok=True)


def test_run_replaces_a_stale_socket_and_a_second_daemon_is_refused(veth_ns, conf, daemons, tmp_path):
    lab, ns = veth_ns
    path, cfg = conf()
    sock = cfg["api_socket"]
    stale_socket(sock)
    first = Daemon(path, cfg, tmp_path / "first.log", args=("--netns", ns))
    daemons.append(first)
    first.ready()                                   # started over the stale socket
    before = api.call(sock, "status")
    inode = os.stat(sock).st_ino

    second = Daemon(path, cfg, tmp_path / "second.log", args=("--netns", ns))
    daemons.append(second)
    second.proc.wait(60)
    out = (tmp_path / "second.log").read_text()
    one_error_line(subprocess.CompletedProcess([], second.proc.returncode, out, ""),
                   f"another xdplb daemon (pid {first.proc.pid}) is serving {sock}")

    # The first one still owns its socket and its data plane: the second
    # touched neither the maps (generation) nor the links (program ids).
    assert os.stat(sock).st_ino == inode
    after = api.call(sock, "status")
    assert after["pid"] == first.proc.pid
    assert after["generation"] == before["generation"]
    assert after["interfaces"] == before["interfaces"] == {"xe0": link_prog(cfg)}
    assert first.stop() == 0


def link_prog(cfg: dict) -> int:
    """The program the pinned link of xe0 runs."""
    with XdpLink.from_pin(Path(cfg["bpffs"]) / "links" / "xe0") as link:
        return link.info().prog_id


# ---- run: interfaces, pins, bpffs ------------------------------------------------


def test_run_with_a_missing_interface(veth_ns, conf):
    lab, ns = veth_ns
    path, _ = conf(interfaces=["nope0"])
    one_error_line(xdplb("run", "--config", str(path), "--netns", ns),
                   "ERROR xdplb: exiting on error", "interface 'nope0' not found")


def test_a_missing_interface_writes_nothing(veth_ns, conf, daemons, tmp_path):
    """Interfaces are checked before any map is written: a restart, or a
    SIGHUP, with a config naming a missing interface leaves the pinned maps
    holding the running config, and the running daemon keeps serving."""
    lab, ns = veth_ns
    svc = {"name": "a", "vip": "10.96.9.1", "port": 80, "protocol": "tcp", "backends": ["10.9.9.2:80"]}
    path, cfg = conf(services=[svc])
    d = Daemon(path, cfg, tmp_path / "a.log", args=("--netns", ns)).ready()
    daemons.append(d)
    services = Map.open_pinned(Path(cfg["bpffs"]) / "maps" / "services")

    def held() -> int:
        return len(services.lookup_batch())

    assert held() == 1
    bad = dict(cfg, interfaces=["xe0", "nope0"], services=[svc, dict(svc, name="b", port=81)])
    path.write_text(yaml.safe_dump(bad))
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "reload rejected" not in (tmp_path / "a.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "interface 'nope0' not found" in (tmp_path / "a.log").read_text()
    assert d.proc.poll() is None and held() == 1
    assert d.stop() == 0
    one_error_line(xdplb("run", "--config", str(path), "--netns", ns), "interface 'nope0' not found")
    assert held() == 1                       # the restart wrote nothing either
    services.close()


def test_run_with_a_missing_netns(conf):
    path, _ = conf()
    name = f"xce{PID}-missing"
    try:
        one_error_line(xdplb("run", "--config", str(path), "--netns", name),
                       f"network namespace '{name}' does not exist")
        assert not Path("/var/run/netns", name).exists()     # and it was not created
    finally:
        if Path("/var/run/netns", name).exists():
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_run_without_the_bpf_object_says_so_before_reading_the_config(tmp_path):
    """A missing object is found before the config is parsed (at 20k
    services that parse took seconds before the same one line)."""
    path = tmp_path / "broken.yaml"
    path.write_text("interfaces: [xe0]\nservices: [oops\n")      # would be a YAML error
    one_error_line(xdplb("run", "--config", str(path), "--object", str(tmp_path / "none.o")),
                   f"BPF object {tmp_path / 'none.o'} not found: build it with `make bpf`")


def test_run_with_a_pin_dir_off_bpffs(conf):
    where = f"/proc/xdplb-test-{PID}"
    path, _ = conf(bpffs=where)
    one_error_line(xdplb("run", "--config", str(path)), "ERROR xdplb: exiting on error",
                   f"the pin directory {where} is not on a BPF filesystem (/proc is on proc)",
                   f"mount -t bpf bpf {where}")


def test_run_with_a_read_only_pin_dir(conf):
    """The pin directory under a read-only bind mount (in a mount namespace
    of the daemon's own, so the host's bpffs stays writable)."""
    ro = Path(pin_dir())
    ro.mkdir()
    try:
        path, _ = conf(bpffs=str(ro / "pins"))
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        p = xdplb("run", "--config", str(path), prefix=("unshare", "--mount", "sh", "-c", script, str(ro)))
        one_error_line(p, "ERROR xdplb: exiting on error", f"{ro / 'pins'}: Read-only file system")
    finally:
        ro.rmdir()


# Without bpffs at /sys/fs/bpf (unmounted in a mount namespace of its own)
# and without CAP_SYS_ADMIN, the command can neither bind nor mount one.
NO_BPFFS = ("unshare", "--mount", "sh", "-c",
            "while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf || exit 99; done; "
            'exec setpriv --bounding-set=-sys_admin -- "$@"', "sh")


@pytest.mark.parametrize("command", ["run", "down"])
def test_no_bpffs_and_no_right_to_mount_one(conf, command):
    path, cfg = conf()
    args = ("run", "--config", str(path)) if command == "run" else \
        ("--socket", cfg["api_socket"], "down", "--bpffs", cfg["bpffs"])
    p = xdplb(*args, prefix=NO_BPFFS)
    assert p.returncode != 99, p.stderr                     # bpffs was unmounted
    line = one_error_line(p, "bpffs is not mounted at /sys/fs/bpf in this mount namespace",
                          "Operation not permitted", "`xdplb run --netns NS` keeps /sys")
    if command == "run":
        assert "ERROR xdplb: exiting on error" in line, line
    else:
        assert line.startswith("error: "), line


def test_ip_netns_exec_binds_the_hosts_bpffs(veth_ns, conf, daemons, tmp_path):
    """`ip netns exec NS xdplb run`: bpffs is bound from the host, so the
    pins are the host's; they outlive the daemon, the next start reuses
    them, and `ip netns exec NS xdplb down` finds and removes them."""
    lab, ns = veth_ns
    path, cfg = conf()
    pins = Path(cfg["bpffs"])
    in_ns = ("ip", "netns", "exec", ns)
    d = Daemon(path, cfg, tmp_path / "run.log", prefix=in_ns)
    daemons.append(d)
    d.ready()
    log = d.log.read_text()
    assert "bpffs was not mounted at /sys/fs/bpf in this mount namespace" in log, log
    assert "bound the host's bpffs there" in log, log

    # Seen from the host (this process):
    ifindex = lab.ifindex(ns, "xe0")
    with XdpLink.from_pin(pins / "links" / "xe0") as link:
        info = link.info()
    assert info.ifindex == ifindex
    assert api.call(cfg["api_socket"], "status")["interfaces"] == {"xe0": info.prog_id}
    with Map.open_pinned(pins / "maps" / "services") as m:
        services_id = m.info().id

    # Stopped: the pins (on the host's bpffs) keep XDP attached...
    assert d.stop() == 0
    with XdpLink.from_pin(pins / "links" / "xe0") as link:
        assert link.info().ifindex == ifindex

    # ...and the next start, in a new mount namespace, reuses them.
    d = Daemon(path, cfg, tmp_path / "run2.log", prefix=in_ns)
    daemons.append(d)
    d.ready()
    with Map.open_pinned(pins / "maps" / "services") as m:
        assert m.info().id == services_id

    p = xdplb("--socket", cfg["api_socket"], "down", "--bpffs", str(pins), prefix=in_ns)
    assert p.returncode == 0 and "detached from xe0" in p.stdout, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert not (pins / "links").exists()
    assert d.proc.wait(30) == 0                      # `down` stopped it through the API


# ---- config files -------------------------------------------------------------

BAD_CONFIGS = {
    "missing": (None, "cannot read: No such file or directory"),
    "yaml": ("services: [oops\n", "YAML syntax error at line 2, column 1"),
    "invalid": ("interfaces: [xe0]\nservices:\n- {name: web, vip: 10.96.0.1, port: 70000, "
                "protocol: tcp, backends: ['10.0.0.1:80']}\n", "services[0] 'web': port must be in 1..65535"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("command", ["run", "apply"])
def test_bad_config_file(tmp_path, command, kind):
    text, why = BAD_CONFIGS[kind]
    path = tmp_path / f"{kind}.yaml"
    if text is not None:
        path.write_text(text)
    sock = f"/run/xdplb/test-err-{PID}-nobody.sock"
    if command == "run":
        p = xdplb("run", "--config", str(path))
        one_error_line(p, "ERROR xdplb: exiting on error", f"{path}: {why}")
    else:
        p = xdplb("--socket", sock, "apply", "-f", str(path))
        line = one_error_line(p, f"{path}: {why}")
        assert line.startswith("error: config rejected, nothing changed: "), line
