"""The systemd unit and the daemon's side of it: sd_notify messages over a
real NOTIFY_SOCKET, the watchdog's health check, journald log lines, the
capability set, and `make install` into a temporary root.

PID 1 here is not systemd, so the unit itself is checked with
systemd-analyze and the daemon is run the way systemd would run it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from lb import api
from lb.dataplane import Dataplane
from lb.demo import WEB_VIP, DaemonProcess, curl_many, lab_config
from lb.lab import REPO_ROOT
from loader import Map
from lbtest import pin_dir, with_dsr_services

UNIT = REPO_ROOT / "systemd" / "xdplb.service"
VENV_XDPLB = Path(sys.executable).parent / "xdplb"


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values in order (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                          timeout=60)


def verified_ok(p: subprocess.CompletedProcess) -> bool:
    # Bad values and unknown keys are only warnings ("..., ignoring"): any
    # output about the unit counts as a failure.
    return p.returncode == 0 and "xdplb" not in p.stdout + p.stderr


def test_unit_verifies_and_a_broken_one_does_not(tmp_path):
    text = UNIT.read_text().replace("/opt/xdplb/venv/bin/xdplb", str(VENV_XDPLB))
    good = tmp_path / "xdplb.service"
    good.write_text(text)
    p = verify(good)
    assert verified_ok(p), p.stdout + p.stderr
    for broken in (text.replace("ProtectSystem=strict", "ProtectSystem=strictt"),
                   text.replace("WatchdogSec=10s", "WatchdogSecs=10s"),
                   text.replace(str(VENV_XDPLB), "/nonexistent/xdplb")):
        bad = tmp_path / "broken" / "xdplb.service"
        bad.parent.mkdir(exist_ok=True)
        bad.write_text(broken)
        assert not verified_ok(verify(bad))

    p = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(good)],
                       capture_output=True, text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for xdplb.service: ([\d.]+)", p.stdout).group(1))
    assert exposure <= 3.0, p.stdout                # systemd calls < 4 "OK"

    s = unit_settings(text)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"] and s["Restart"] == ["on-failure"]
    assert "ExecStop" not in s and "ExecStopPost" not in s       # stopping never detaches
    assert s["KillMode"] == ["mixed"] and s["WatchdogSec"] == ["10s"]
    assert set(s["CapabilityBoundingSet"][0].split()) == {"CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_NET_RAW"}
    assert s["AmbientCapabilities"] == s["CapabilityBoundingSet"]
    assert s["ProtectSystem"] == ["strict"] and s["ProtectHome"] == ["yes"]
    assert "/sys/fs/bpf" in s["ReadWritePaths"][0].split()
    assert s["RuntimeDirectory"] == ["xdplb"] and s["RuntimeDirectoryMode"] == ["0700"]


# ---- sd_notify ---------------------------------------------------------------


class NotifySocket:
    """The service manager's end: a Unix datagram socket that records every
    message, and runs `on_ready` the moment a READY=1 arrives (to look at
    the maps before anything else can change them)."""

    def __init__(self, path: Path, on_ready=None):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self.at_ready: list = []
        self.on_ready = on_ready
        self.cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if fields.get("READY") == "1" and self.on_ready:
                self.at_ready.append(self.on_ready())
            with self.cv:
                self.messages.append((time.monotonic(), fields))
                self.cv.notify_all()

    def wait_for(self, key: str, value: str = "1", after: int = 0, timeout: float = 60) -> int:
        """Index of the first message at or after `after` with key=value."""
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for i in range(after, len(self.messages)):
                    if self.messages[i][1].get(key) == value:
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {key}={value} after message {after}: {self.messages}")
                self.cv.wait(left)

    def count(self, key: str, since: int = 0) -> int:
        with self.cv:
            return sum(1 for _, f in self.messages[since:] if key in f)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


def pinned_state(bpffs: str) -> dict:
    """What the maps and links hold right now (read from the pins)."""
    m = Map.open_pinned(Path(bpffs) / "maps" / "services")
    try:
        services = sum(1 for _ in m.keys())
    finally:
        m.close()
    links = Path(bpffs) / "links"
    return {"services": services, "links": sorted(p.name for p in links.iterdir()) if links.is_dir() else []}


@pytest.fixture
def notified_daemon(lab, bpf_object, tmp_path):
    """Start `xdplb run` with NOTIFY_SOCKET (and JOURNAL_STREAM naming its
    log file, as systemd's journal stream would be)."""
    lab_, topo = lab
    started: list[tuple[DaemonProcess, NotifySocket]] = []

    def start(fillers: int = 0) -> tuple[DaemonProcess, NotifySocket]:
        cfg = lab_config(topo, fillers=fillers, bpffs=pin_dir(),
                         socket=f"/run/xdplb/test-sd-{os.getpid()}-{len(started)}.sock")
        cfg["metrics_address"] = False      # several daemons in one namespace
        work = tmp_path / f"d{len(started)}"
        work.mkdir()
        log = work / "daemon.log"
        log.touch()
        st = log.stat()
        notify = NotifySocket(work / "notify.sock", on_ready=lambda: pinned_state(cfg["bpffs"]))
        d = DaemonProcess(cfg, work, topo.lb_ns, env={"NOTIFY_SOCKET": str(notify.path),
                                                      "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        started.append((d, notify))
        return d.start(), notify

    yield start
    for d, notify in started:
        d.kill(signal.SIGKILL)
        notify.close()
        Dataplane.detach(Path(d.config["bpffs"]), purge=True)


def test_ready_watchdog_reload_stopping_and_xdp_survives_stop(lab, notified_daemon):
    lab_, topo = lab
    d, n = notified_daemon(fillers=3000)       # an apply that takes a while
    services = len(d.config["services"])
    links = sorted(i.name for i in topo.lb_ifaces)

    ready = n.wait_for("READY")
    assert n.count("WATCHDOG", 0) == n.count("WATCHDOG", ready)   # no ping before READY
    # READY=1 came only once the maps held the config and every link ran it.
    assert n.at_ready[0] == {"services": services, "links": links}
    assert n.messages[ready][1]["STATUS"] == f"serving generation=1 services={services}"
    assert curl_many(lab_, topo, f"http://{WEB_VIP}/", 2, topo.client_ip)

    # Pings from the loop, about one per second.
    first = n.wait_for("WATCHDOG", after=ready)
    n.wait_for("WATCHDOG", after=first + 1)
    n.wait_for("WATCHDOG", after=first + 2)

    # SIGHUP with a new config: RELOADING=1 (with the monotonic clock), then
    # READY=1 once the new service is in the maps.
    cfg = yaml.safe_load(d.path.read_text())
    cfg["services"].append({"name": "extra", "vip": "10.96.2.2", "port": 80, "protocol": "tcp",
                            "backends": [f"{topo.backends[0].ip}:{topo.backend_port}"]})
    d.path.write_text(yaml.safe_dump(cfg))
    mark = len(n.messages)
    d.proc.send_signal(signal.SIGHUP)
    reloading = n.wait_for("RELOADING", after=mark)
    usec = int(n.messages[reloading][1]["MONOTONIC_USEC"])
    assert abs(usec - time.monotonic_ns() // 1000) < 30_000_000
    again = n.wait_for("READY", after=reloading)
    assert n.at_ready[1]["services"] == services + 1
    assert n.messages[again][1]["STATUS"] == f"serving generation=2 services={services + 1}"
    assert lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", "http://10.96.2.2/"]).stdout

    # An invalid config: RELOADING=1, READY=1, the state unchanged, the why logged.
    d.path.write_text("services: [oops")
    mark = len(n.messages)
    d.proc.send_signal(signal.SIGHUP)
    n.wait_for("READY", after=n.wait_for("RELOADING", after=mark))
    assert n.at_ready[2]["services"] == services + 1
    assert d.call("status")["errors"] == 1

    # SIGTERM: STOPPING=1, a clean exit, and XDP stays attached.
    mark = len(n.messages)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    n.wait_for("STOPPING", after=mark, timeout=5)
    assert pinned_state(d.config["bpffs"]) == {"services": services + 1, "links": links}
    answers = curl_many(lab_, topo, f"http://{WEB_VIP}/", 5, topo.client_ip)
    assert len(answers) == 5, "traffic must survive the daemon's stop"

    # journald: no timestamps, a priority on every line, key=value fields.
    lines = d.log.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines), lines[:5]
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line) for line in lines)
    text = "\n".join(lines)
    for pattern in (r"<6>INFO xdplb: starting pid=\d+ config=",
                    rf"<6>INFO xdplb: applied config .* services={services} added={services} ",
                    r"<6>INFO xdplb: attached interfaces=l0,l1,l2,l3 mode=native prog_id=\d+",
                    r"<6>INFO xdplb: ready pid=\d+ generation=1",
                    rf"<6>INFO xdplb: reload ok .* generation=2 services={services + 1} added=1 ",
                    r"<3>ERROR xdplb: reload rejected, keeping the running state .* reason=\".*YAML",
                    r"<6>INFO xdplb: stopped; XDP stays attached"):
        assert re.search(pattern, text), (pattern, text[-3000:])


def test_watchdog_stops_while_the_health_check_fails(lab, notified_daemon):
    lab_, topo = lab
    d, n = notified_daemon()
    n.wait_for("WATCHDOG", after=n.wait_for("READY"))
    pin = Path(d.config["bpffs"]) / "maps" / "conntrack"
    m = Map.open_pinned(pin)
    map_id = m.info().id
    m.close()
    pin.unlink()            # a restart would now start with an empty conntrack
    time.sleep(1.5)         # a ping already on its way may still arrive
    mark = len(n.messages)
    time.sleep(3)
    assert n.count("WATCHDOG", mark) == 0
    log = d.log.read_text()
    assert re.search(r"ERROR xdplb: health check failed, not pinging the watchdog "
                     r"problems=\".*map conntrack is no longer pinned", log), log[-2000:]

    subprocess.run(["bpftool", "map", "pin", "id", str(map_id), str(pin)], check=True, timeout=30)
    mark = len(n.messages)
    n.wait_for("WATCHDOG", after=mark, timeout=5)
    assert "health check passes again" in d.log.read_text()
    assert d.call("status")["services"] == 2


# ---- capabilities --------------------------------------------------------------


RAW_REFUSED = "raw sockets not permitted"


def _run_with_caps(lab_, topo, tmp_path: Path, caps: list[str], name: str):
    """The daemon with exactly `caps` (root's set bounded, as the unit does),
    started inside the LB's namespace (no setns, which would need
    CAP_SYS_ADMIN), with DSR services whose health checks probe through
    their tunnels. Returns (whether curl through a NAT VIP was answered,
    the log once a DSR backend was first marked down: the lab's backends
    decapsulate nothing, so the reason shows how the probe failed)."""
    work = tmp_path / name
    work.mkdir()
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket=f"/run/xdplb/test-caps-{os.getpid()}.sock")
    cfg["metrics_address"] = False
    with_dsr_services(cfg, topo, health_check={"type": "tcp", "interval": 0.3, "timeout": 0.25,
                                               "fall": 2, "rise": 2})
    (work / "xdplb.yaml").write_text(yaml.safe_dump(cfg))
    notify = NotifySocket(work / "notify.sock")
    bounding = ",".join(["-all"] + [f"+{c.removeprefix('CAP_').lower()}" for c in caps])
    argv = ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--",
            sys.executable, "-m", "lb.cli", "--socket", cfg["api_socket"], "run",
            "--config", str(work / "xdplb.yaml")]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), NOTIFY_SOCKET=str(notify.path))
    log = work / "daemon.log"
    proc = lab_.popen(topo.lb_ns, argv, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                      env=env, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                n = notify.wait_for("READY", timeout=0.5)
                ready = n >= 0
                break
            except TimeoutError:
                pass
        works = ready and len(curl_many(lab_, topo, f"http://{WEB_VIP}/", 2, topo.client_ip)) == 2
        while ready and time.monotonic() < deadline and "backend down service=dsr-ipip" not in log.read_text():
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        return works, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
        Dataplane.detach(Path(cfg["bpffs"]), purge=True)


def test_the_units_capabilities_suffice_and_each_is_needed(lab, bpf_object, tmp_path):
    lab_, topo = lab
    caps = unit_settings(UNIT.read_text())["CapabilityBoundingSet"][0].split()
    works, log = _run_with_caps(lab_, topo, tmp_path, caps, "all")
    assert works, log[-3000:]
    assert "backend down service=dsr-ipip" in log and RAW_REFUSED not in log, log[-3000:]
    why = {"CAP_BPF": "Operation not permitted", "CAP_NET_ADMIN": "Operation not permitted",
           "CAP_PERFMON": "pointer -= pointer prohibited"}
    for cap in caps:
        works, log = _run_with_caps(lab_, topo, tmp_path, [c for c in caps if c != cap], f"no-{cap}")
        if cap == "CAP_NET_RAW":        # only DSR health checks need it: NAT traffic flows
            assert works and RAW_REFUSED in log, f"DSR probes work without {cap}: drop it from the unit"
            continue
        assert not works, f"runs without {cap}: drop it from the unit"
        assert why[cap] in log, (cap, log[-2000:])


# ---- make install ---------------------------------------------------------------


def test_make_install_into_a_temporary_root(lab, bpf_object, tmp_path):
    """The real `make install`, with PREFIX/CONFDIR/UNITDIR in a temp dir: the
    unit verifies as installed (its ExecStart exists), a second install keeps
    an edited config, and the installed daemon runs with the unit's
    environment (XDPLB_OBJECT)."""
    lab_, topo = lab
    root = tmp_path / "root"
    dirs = {"PREFIX": root / "opt/xdplb", "CONFDIR": root / "etc/xdplb", "UNITDIR": root / "etc/systemd/system"}
    argv = ["make", "-s", "-C", str(REPO_ROOT), "install", *(f"{k}={v}" for k, v in dirs.items())]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skipped systemctl daemon-reload" in p.stdout or Path("/run/systemd/system").is_dir()
    unit = dirs["UNITDIR"] / "xdplb.service"
    s = unit_settings(unit.read_text())
    assert s["ExecStart"] == [f"{dirs['PREFIX']}/venv/bin/xdplb run --config {dirs['CONFDIR']}/xdplb.yaml"]
    p = verify(unit)
    assert verified_ok(p), p.stdout + p.stderr
    assert (dirs["PREFIX"] / "xdplb.o").read_bytes() == bpf_object.read_bytes()
    example = dirs["CONFDIR"] / "xdplb.yaml"
    assert example.read_text() == (REPO_ROOT / "systemd" / "xdplb.yaml").read_text()

    # The installed package, not this tree: run from elsewhere, no PYTHONPATH.
    xdplb = dirs["PREFIX"] / "venv" / "bin" / "xdplb"
    cfg = lab_config(topo, fillers=0, bpffs=pin_dir(), socket=f"/run/xdplb/test-inst-{os.getpid()}.sock")
    cfg["metrics_address"] = False
    example.write_text(yaml.safe_dump(cfg))           # "the admin edits the config"
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "kept the existing" in p.stdout, p.stdout + p.stderr
    assert yaml.safe_load(example.read_text()) == cfg

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for assignment in s["Environment"]:
        k, _, v = assignment.partition("=")
        env[k] = v
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    notify = NotifySocket(tmp_path / "notify.sock")
    env["NOTIFY_SOCKET"] = str(notify.path)
    proc = subprocess.Popen([str(xdplb), "run", "--config", str(example), "--netns", topo.lb_ns],
                            stdout=(tmp_path / "installed.log").open("wb"), stderr=subprocess.STDOUT,
                            env=env, cwd=tmp_path)
    try:
        notify.wait_for("READY", timeout=180)
        assert len(curl_many(lab_, topo, f"http://{WEB_VIP}/", 3, topo.client_ip)) == 3
        st = api.call(cfg["api_socket"], "status")
        assert st["services"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
        Dataplane.detach(Path(cfg["bpffs"]), purge=True)
    log = (tmp_path / "installed.log").read_text()
    assert f"starting pid={proc.pid} config={example} object={dirs['PREFIX']}/xdplb.o" in log, log
    site = next((dirs["PREFIX"] / "venv" / "lib").glob("python*/site-packages"))
    assert (site / "lb" / "daemon.py").is_file() and not list(site.glob("__editable__*"))
    shutil.rmtree(root)
