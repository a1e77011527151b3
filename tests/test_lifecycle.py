"""An established TCP stream loses no byte across a restart (the signals
systemd sends), a SIGHUP with a new config, and a program upgrade."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import yaml

from lb.demo import WEB_VIP
from lbtest import download as start_download, xdplb

N = 2_500_000
RATE = 800_000           # ~3 s per download


def _download(lab_, topo, result: dict) -> threading.Thread:
    return start_download(lab_, topo, f"http://{WEB_VIP}/bytes?n={N}&rate={RATE}", result)


def test_restart_by_systemd_signals_loses_nothing(lab, daemon_factory):
    lab_, topo = lab
    d = daemon_factory()
    result: dict = {}
    t = _download(lab_, topo, result)
    time.sleep(0.8)
    d.kill(signal.SIGTERM)               # systemctl stop: SIGTERM, the daemon exits 0
    assert d.proc.returncode == 0
    d.start()                            # systemctl start
    t.join(60)
    assert result["out"] == f"{N} 200", result


def test_sighup_with_new_config_loses_nothing(lab, daemon_factory):
    lab_, topo = lab
    d = daemon_factory()
    cfg = yaml.safe_load(d.path.read_text())
    cfg["services"].append({"name": "added", "vip": "10.96.3.3", "port": 80, "protocol": "tcp",
                            "backends": [f"{b.ip}:{topo.backend_port}" for b in topo.backends]})
    result: dict = {}
    t = _download(lab_, topo, result)
    time.sleep(0.8)
    d.path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    d.proc.send_signal(signal.SIGHUP)
    t.join(60)
    assert result["out"] == f"{N} 200", result
    out = lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", "http://10.96.3.3/"]).stdout
    assert out.startswith("backend=b"), out


def test_program_upgrade_loses_nothing(lab, daemon_factory, tmp_path):
    lab_, topo = lab
    d = daemon_factory()
    before = json.loads(xdplb(d, "status", "--json").stdout)["interfaces"]
    new_obj = tmp_path / "xdplb-new.o"
    shutil.copy(Path(__file__).resolve().parent.parent / "bpf/xdp/xdplb.o", new_obj)
    result: dict = {}
    t = _download(lab_, topo, result)
    time.sleep(0.8)
    res = json.loads(xdplb(d, "upgrade", "--object", str(new_obj), "--json").stdout)
    t.join(60)
    assert result["out"] == f"{N} 200", result
    after = json.loads(xdplb(d, "status", "--json").stdout)["interfaces"]
    assert set(after) == set(before)
    assert all(after[i] == res["prog_id"] != before[i] for i in after)     # new program everywhere


def test_upgrade_with_incompatible_layout_is_refused(lab, daemon_factory, tmp_path):
    lab_, topo = lab
    d = daemon_factory()
    src = Path(__file__).resolve().parent.parent / "bpf/xdp"
    shutil.copytree(src, tmp_path / "xdp")
    maps_h = tmp_path / "xdp" / "maps.h"
    maps_h.write_text(maps_h.read_text().replace("__u32 ring_size;", "__u32 ring_size;\n\t__u32 extra;", 1))
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", "-c",
                    str(tmp_path / "xdp" / "xdplb.c"), "-o", str(tmp_path / "bad.o")], check=True)
    p = xdplb(d, "upgrade", "--object", str(tmp_path / "bad.o"), check=False)
    assert p.returncode != 0 and "services" in p.stdout and "value_size" in p.stdout, p.stdout
    # Still serving with the old program.
    assert lab_.run(topo.client_ns, ["curl", "-s", "--max-time", "3", f"http://{WEB_VIP}/"]).stdout


def test_pins_of_another_layout_are_refused_with_what_to_run(bpf_object):
    """Pins made with other map sizes (changed `limits:`, or an older
    build whose layout differs) are not reused; the error says what to run."""
    import pytest

    from lb.config import config_from_dict
    from lb.dataplane import Dataplane, LayoutVersionError
    from lbtest import pin_dir

    pins = pin_dir()
    base = {"interfaces": ["lo"], "bpffs": pins, "services": []}
    try:
        Dataplane.open(config_from_dict(base)).close()
        other = config_from_dict({**base, "limits": {"conntrack": 65536}})
        with pytest.raises(LayoutVersionError) as e:
            Dataplane.open(other)
        msg = str(e.value)
        assert "pinned map 'conntrack'" in msg and "max_entries: pinned=262144 now=65536" in msg, msg
        assert "`xdplb down --purge`" in msg
    finally:
        Dataplane.detach(Path(pins), purge=True)
