"""UDP to one service VIP, in Cisco TRex stateless (STL) profile format.

    --flows 0     every packet is a new flow: the source address steps every
                  packet and the source port every 65,536 (tuple generator)
    --flows N     N flows replayed in turn (established traffic)

The payload starts with the bench stamp ("XLB1", then --stamp): the sink
checks that the packet reached a backend of that service. Checksums are
fixed per packet (fix_chksum_hw), so conntrack does not see the packets as
invalid.

Runs on a TRex server (`xdplb bench --generator trex`) and, compiled, on
the in-kernel generator of the lab.
"""
import argparse
import struct

from trex.stl.api import *  # noqa: F401,F403


class STLS1:
    def get_streams(self, tunables=(), **kwargs):
        p = argparse.ArgumentParser(prog="udp_flows", description=__doc__)
        p.add_argument("--vip", default="10.96.0.10")
        p.add_argument("--port", type=int, default=80)
        p.add_argument("--stamp", type=int, default=1)
        p.add_argument("--src-mac", default="02:00:00:00:00:01")
        p.add_argument("--dst-mac", default="02:00:00:00:00:02")
        p.add_argument("--src-min", default="10.2.0.1")
        p.add_argument("--src-max", default="10.2.255.254")
        p.add_argument("--flows", type=int, default=0)
        p.add_argument("--pps", type=float, default=1e6)
        a = p.parse_args(list(tunables))

        payload = struct.pack("!II", 0x584C4231, a.stamp) + bytes(10)   # 60-byte frame
        base = (Ether(src=a.src_mac, dst=a.dst_mac) /
                IP(src=a.src_min, dst=a.vip, ttl=64, id=0) /
                UDP(sport=1025, dport=a.port) / Raw(payload))
        vm = STLVM()
        vm.tuple_var(name="client", ip_min=a.src_min, ip_max=a.src_max,
                     port_min=1025, port_max=65535, limit_flows=a.flows)
        vm.write(fv_name="client.ip", pkt_offset="IP.src")
        vm.write(fv_name="client.port", pkt_offset="UDP.sport")
        vm.fix_chksum_hw(l3_offset="IP", l4_offset="UDP", l4_type=CTRexVmInsFixHwCs.L4_TYPE_UDP)
        return [STLStream(packet=STLPktBuilder(pkt=base, vm=vm), mode=STLTXCont(pps=a.pps))]


def register():
    return STLS1()
