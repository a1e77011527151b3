"""Shared by the Kubernetes churn test and `python -m bench.k8s`: a cluster
of many Services + EndpointSlices in the apiserver double, a daemon in
Kubernetes mode following it; the reader of the pinned maps and of the
daemon's applied batches is bench/xdplb_maps.py's."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

from k8s_apiserver import FakeApiServer
from lb.dataplane import Dataplane
from lb.demo import DaemonProcess
from lbtest import pin_dir

READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}
NOT_READY = {"ready": False, "serving": False, "terminating": False}


def filler_vip(i: int) -> str:
    return f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}"


def filler_ep(i: int, j: int) -> str:
    return f"10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}" if j == 0 else \
        f"10.{210 + j}.{i // 256 % 256}.{i % 256}"


def service(name: str, ip: str, port: int, target: int, proto: str = "TCP") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "load"},
            "spec": {"clusterIP": ip, "selector": {"app": name},
                     "ports": [{"name": "p", "port": port, "targetPort": target, "protocol": proto}]}}


def slice_(name: str, port: int, eps: dict[str, dict], proto: str = "TCP") -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-s", "namespace": "load",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": [{"name": "p", "port": port, "protocol": proto}],
            "endpoints": [{"addresses": [ip], "conditions": dict(c), "nodeName": "node-a"}
                          for ip, c in sorted(eps.items())]}


class Cluster:
    """`n` filler Services (TCP, 3 endpoints each, never sent traffic) in
    the double; callers add their own traffic services."""

    def __init__(self, api: FakeApiServer, n: int, seed: int = 1):
        self.api, self.n = api, n
        self.rnd = random.Random(seed)
        self.eps = {i: {filler_ep(i, j): dict(READY) for j in range(3)} for i in range(n)}
        objs = []
        for i in range(n):
            objs.append(service(f"f{i}", filler_vip(i), 80, 8080))
            objs.append(slice_(f"f{i}", 8080, self.eps[i]))
        for k in range(0, len(objs), 2000):
            api.apply_many(objs[k:k + 2000])

    def change_filler(self) -> tuple[int, int]:
        """One endpoint change of a random filler service; (index, rv)."""
        i = self.rnd.randrange(self.n)
        eps = self.eps[i]
        ip = self.rnd.choice(sorted(eps))
        op = self.rnd.random()
        if op < 0.5:
            eps[ip] = dict(NOT_READY if eps[ip]["ready"] else READY)
        else:                                   # replace an endpoint by a new address
            del eps[ip]
            eps[f"10.220.{self.rnd.randrange(256)}.{self.rnd.randrange(1, 255)}"] = dict(READY)
        if not any(c["ready"] for c in eps.values()):
            eps[sorted(eps)[0]] = dict(READY)
        return i, self.api.apply(slice_(f"f{i}", 8080, eps))

    def expected_filler(self, i: int) -> set[tuple[str, int, str]]:
        return {(ip, 8080, "active" if c["ready"] else "draining") for ip, c in self.eps[i].items()}


def start_daemon(api: FakeApiServer, topo, tmp: Path, batch_ms: int = 5) -> DaemonProcess:
    cfg = {"interfaces": [i.name for i in topo.lb_ifaces], "bpffs": pin_dir(),
           "api_socket": f"/run/xdplb/k8s-scale-{os.getpid()}.sock", "metrics_address": False,
           # 20k services x 3 backends: Maglev tables of 307 slots each.
           "limits": {"maglev_slots": 16 * 1024 * 1024},
           "kubernetes": {"kubeconfig": str(api.kubeconfig(tmp / "kubeconfig")), "node_name": "node-a",
                          "batch_ms": batch_ms}}
    return DaemonProcess(cfg, tmp, topo.lb_ns).start(timeout=600)


def stop_daemon(d: DaemonProcess | None) -> None:
    if d is not None:
        d.kill(signal.SIGKILL)
        Dataplane.detach(Path(d.config["bpffs"]), purge=True)
