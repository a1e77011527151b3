"""Run a profile on a real TRex server (`xdplb bench --generator trex`).

On hardware, TRex port 0 sends the profile towards the load balancer and
port 1 receives what the load balancer forwards; the result is TRex's own
port counters. The client (PyPI `lbr-trex-client`) runs in a subprocess,
since it swaps in its own scapy for the whole interpreter.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any

from .profile import ProfileError, profile_path, trex_client_available, tunable_args

RPC_PORT = 4501     # TRex's JSON-RPC port (STL)


class TrexError(RuntimeError):
    pass


_RUN = r"""
import json, sys
import lbr_trex_client  # noqa: F401
from trex.stl.api import STLClient, STLProfile
server, path, tunables, seconds, tx, rx = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
c = STLClient(server=server)
c.connect()
try:
    c.reset(ports=[tx, rx])
    profile = STLProfile.load_py(path, direction=0, port_id=tx, tunables=tunables)
    c.add_streams(profile.get_streams(), ports=[tx])
    c.clear_stats()
    c.start(ports=[tx], duration=seconds)
    c.wait_on_traffic(ports=[tx])
    st = c.get_stats()
    print(json.dumps({"offered": st[tx]["opackets"], "delivered": st[rx]["ipackets"], "seconds": seconds}))
finally:
    c.disconnect()
"""


def check_server(host: str, timeout: float = 3.0) -> None:
    if not trex_client_available():
        raise TrexError("--generator trex needs the TRex client: pip install 'xdplb[trex]' "
                        "(PyPI lbr-trex-client)")
    try:
        with socket.create_connection((host, RPC_PORT), timeout=timeout):
            pass
    except OSError as e:
        raise TrexError(f"TRex server {host}:{RPC_PORT} is not reachable: {e}") from None


def run(host: str, profile: str, tunables: dict[str, Any], seconds: float, tx_port: int = 0,
        rx_port: int = 1) -> dict:
    """Send the profile from tx_port for `seconds`; offered and delivered packets."""
    check_server(host)
    path = profile_path(profile)
    r = subprocess.run([sys.executable, "-c", _RUN, host, str(path), json.dumps(tunable_args(tunables)),
                        str(seconds), str(tx_port), str(rx_port)], capture_output=True, text=True,
                       timeout=seconds + 120)
    if r.returncode != 0:
        raise TrexError(f"TRex run failed: {r.stderr.strip()[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["offered_mpps"] = out["offered"] / seconds / 1e6
    out["delivered_mpps"] = out["delivered"] / seconds / 1e6
    return out


__all__ = ["ProfileError", "TrexError", "check_server", "run"]
