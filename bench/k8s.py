"""Kubernetes mode figures: event -> map-update latency and relist
convergence at N Services + EndpointSlices (default 20,000).

    sudo .venv/bin/python -m bench.k8s [--services 20000] [--rate 100 --seconds 10]

Builds the netns lab, serves N Services + EndpointSlices from the
apiserver double (inside the LB namespace), starts `xdplb run` in
Kubernetes mode and reports:

- first sync: daemon start -> maps hold all N services (includes loading
  the BPF program and attaching);
- relist after 410 Gone: the watches are cut, 1000 slices change, the
  history is compacted; time from the watches' return to the maps holding
  every change (a full paged list of 2N objects, diffed);
- event -> map latency: an EndpointSlice change every 1/rate s; for each,
  apiserver write (CLOCK_MONOTONIC) -> the daemon's batch applied (its
  timestamp is taken after the map writes returned). p50/p99/max.

Times come from CLOCK_MONOTONIC in both processes (the same clock).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from k8s_apiserver import FakeApiServer  # noqa: E402
from k8s_scale import Cluster, start_daemon, stop_daemon  # noqa: E402
from bench.memcg import rss_mb  # noqa: E402
from bench.xdplb_maps import applied_at  # noqa: E402
from lb.lab import Lab, build_lb_lab  # noqa: E402
from lbtest import wait_for  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(services: int, rate: float, seconds: float, relist_changes: int = 1000) -> dict:
    out: dict = {"services": services}
    with Lab() as lab, tempfile.TemporaryDirectory(prefix="xdplb-k8s-bench-") as tmp:
        topo = build_lb_lab(lab, 3)
        api = FakeApiServer(netns=topo.lb_ns, bookmark_interval=1.0).start()
        d = None
        try:
            api.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                       "status": {"addresses": [{"type": "InternalIP", "address": "10.96.200.1"}]}})
            cluster = Cluster(api, services)
            last = api.rv
            t0 = time.monotonic()
            d = start_daemon(api, topo, Path(tmp))
            out["first_sync_s"] = time.monotonic() - t0
            out["rss_mb_after_sync"] = rss_mb(d.proc.pid)
            assert d.call("kubernetes", brief=True)["applied_rv"].get("EndpointSlice", 0) >= last - 1

            # Relist after 410: cut the watches, change slices meanwhile, compact.
            wait_for(lambda: api.open_watches() >= 6, 30, "every watch open")
            time.sleep(2.0)                      # a settled daemon (first-sync GC done)
            api.watch_gate.clear()
            api.drop_watches()
            time.sleep(0.2)
            last = max(cluster.change_filler()[1] for _ in range(relist_changes))
            api.compact()
            t0 = time.monotonic()
            api.watch_gate.set()
            wait_for(lambda: d.call("kubernetes", brief=True)["applied_rv"].get("EndpointSlice", 0) >= last,
                 120, "relist applied")
            out["relist_410_s"] = time.monotonic() - t0
            st = d.call("kubernetes", since=10**9)
            out["relists"] = {k: v["relists_410"] for k, v in st["reflectors"].items()}

            # Event -> map latency at `rate` changes/s.
            time.sleep(1.0)
            n0 = d.call("kubernetes", since=10**9, reset_latency=True)["applied_total"]
            rvs = []
            # Paced in 10 ms steps (rate/100 changes each) when rate >= 100/s.
            per_tick = max(1, int(rate // 100))
            period = per_tick / rate
            tick = time.monotonic()
            end = tick + seconds
            while time.monotonic() < end:
                for _ in range(per_tick):
                    rvs.append(cluster.change_filler()[1])
                tick += period
                time.sleep(max(0.0, tick - time.monotonic()))
            wait_for(lambda: d.call("kubernetes", brief=True)["applied_rv"].get("EndpointSlice", 0) >= rvs[-1],
                 30, "last change applied")
            applied = d.call("kubernetes", since=n0)["applied"]
            lat = [(applied_at(applied, "EndpointSlice", rv) - api.emitted_ns[rv]) / 1e6 for rv in rvs]
            out["event_to_map_ms"] = {"n": len(lat), "rate_per_s": rate, "p50": pct(lat, 0.5),
                                      "p99": pct(lat, 0.99), "max": max(lat)}
            out["daemon_receive_to_map_ms"] = d.call("kubernetes", since=10**9)["receive_to_map_ms"]
            out["rss_mb_after_churn"] = rss_mb(d.proc.pid)
            out["gc_full"] = d.call("kubernetes", since=10**9)["gc_full_collections"]
        finally:
            stop_daemon(d)
            api.close()
            if d is not None:              # kept for a look at the daemon's own view
                Path("/tmp/xdplb-k8s-bench.log").write_bytes(d.log.read_bytes())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.k8s", description=__doc__.split("\n")[0])
    p.add_argument("--services", type=int, default=20000)
    p.add_argument("--rate", type=float, default=100.0, help="endpoint changes per second")
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    r = run(a.services, a.rate, a.seconds)
    e = r["event_to_map_ms"]
    print(f"services: {r['services']} (+ as many EndpointSlices)")
    print(f"first sync (daemon start -> maps hold every service): {r['first_sync_s']:.2f} s")
    print(f"relist after 410 Gone (2x{r['services']} objects listed, 1000 changes): "
          f"{r['relist_410_s']:.2f} s   relists={r['relists']}")
    print(f"event -> map: n={e['n']} at {e['rate_per_s']:g}/s  p50 {e['p50']:.2f} ms  "
          f"p99 {e['p99']:.2f} ms  max {e['max']:.2f} ms   (apiserver write -> maps written)")
    print(f"daemon RSS: {r['rss_mb_after_sync']:.0f} MB after the first sync, "
          f"{r['rss_mb_after_churn']:.0f} MB after the changes")
    print(f"daemon full GC passes (after the first sync): {r['gc_full']}")
    dr = r["daemon_receive_to_map_ms"]
    print(f"  daemon share (event received -> maps written): p50 {dr['p50']} ms  p99 {dr['p99']} ms")

    return 0


if __name__ == "__main__":
    sys.exit(main())
