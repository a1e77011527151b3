"""Gateway-mode replies found through the reply index and conntrack
(bpf/xdp/reply.h, lb/replies.py): one state entry per new flow, replies
still translated, services that share backends told apart, and the
reverse-NAT fallback for services that do not fit in an index entry."""

from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP

from lb.demo import filler_vip, lab_config
from lb.reconcile import Reconciler, bkey
from lb.replies import ReplyIndex, addr_key
from lbtest import XDP_PASS, XDP_REDIRECT, Harness, assert_checksums_valid, tcp

CLIENT = "10.1.0.10"
WEB_VIP = "10.96.0.10"


# -- the bookkeeping, no kernel ------------------------------------------------

def _dirty(ix):
    d = ix.take_dirty()
    return ({int(k): [int(i) for i in v if i] for k, v in zip(d.keys, d.values)},
            sorted(int(k) for k in d.deletes))


def test_index_lists_up_to_its_slots_and_queues_the_rest():
    ix = ReplyIndex(2)
    key = addr_key((1 << 16) | 80, 6)
    for sid in (5, 6, 7, 8):
        ix.add(sid, key)
    ix.add(6, key)                               # again: no change
    assert ix.listed(key) == [5, 6]
    assert [ix.needs_rev_nat(s) for s in (5, 6, 7, 8)] == [False, False, True, True]
    assert _dirty(ix) == ({key: [5, 6]}, [])
    ix.remove(7, key)                            # a waiting one leaves: nothing to write
    assert _dirty(ix) == ({}, []) and not ix.needs_rev_nat(7)
    ix.remove(5, key)                            # a listed one leaves: 8 takes its slot
    assert ix.listed(key) == [6, 8] and not ix.needs_rev_nat(8)
    assert _dirty(ix) == ({key: [6, 8]}, [])
    ix.remove(6, key)
    assert ix.listed(key) == [8]
    ix.remove(8, key)
    assert _dirty(ix) == ({}, [key]) and ix.listed(key) == []


def test_index_counts_every_address_a_service_waits_at():
    ix = ReplyIndex(1)
    a, b = addr_key(1, 6), addr_key(2, 6)
    for key in (a, b):
        ix.add(1, key)
        ix.add(2, key)
    ix.remove(1, a)
    assert ix.needs_rev_nat(2)                   # still waits at b
    ix.remove(1, b)
    assert not ix.needs_rev_nat(2)


def test_bulk_adds_match_one_by_one_adds():
    keys = np.array([addr_key(i << 16 | 80, 17) for i in range(1, 1001)], np.int64)
    ids = np.arange(1, 1001, dtype=np.uint32) % 7 + 1
    bulk, one = ReplyIndex(8), ReplyIndex(8)
    bulk.add_many(ids, keys)                     # all new and distinct: the fast path
    for s, k in zip(ids.tolist(), keys.tolist()):
        one.add(s, k)
    assert _dirty(bulk) == _dirty(one)
    # Overlapping keys take the general path, with the same result.
    bulk.add_many(ids[:10] + 100, keys[:10])
    for s, k in zip((ids[:10] + 100).tolist(), keys[:10].tolist()):
        one.add(s, k)
    assert _dirty(bulk) == _dirty(one)
    assert bulk.listed(int(keys[0])) == [int(ids[0]), int(ids[0]) + 100]
    # A bulk-added key removed before the write is written, then deleted.
    fresh, key = ReplyIndex(8), addr_key(99 << 16, 6)
    fresh.add_many(np.array([3, 4], np.uint32), np.array([key, key + 1], np.int64))
    fresh.remove(3, key)
    d = fresh.take_dirty()
    assert d.keys.tolist() == [key, key + 1] and d.deletes.tolist() == [key]
    # Duplicate keys in one batch take the general path.
    dup = ReplyIndex(8)
    dup.add_many(np.array([1, 2], np.uint32), np.array([key, key], np.int64))
    assert dup.listed(key) == [1, 2]


def test_rebuilt_index_rewrites_only_what_differs():
    ix = ReplyIndex(2)
    ix.add(1, 10)
    ix.add(2, 10)
    ix.add(3, 20)
    ix.keep_written({10: [1, 2], 20: [4], 30: [9]})
    assert _dirty(ix) == ({20: [3]}, [30])


# -- the real program ------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(lab, bpf_object):
    """web plus 24 one-backend services on the same 3 backends: 9 services
    per backend address, one more than an index entry lists."""
    lab_, topo = lab
    cfg = lab_config(topo, fillers=24, bpffs="", socket="/run/xdplb/test-replies.sock")
    with Harness(lab_, topo, cfg, attach=False) as h:
        yield h


def _svc(h, name: str):
    return h.rec.services[next(s.key for s in h.cfg.services if s.name == name)]


def _reply(h, fwd, client_port: int):
    b = next(b for b in h.topo.backends if b.ip == fwd[IP].dst)
    return h.run(tcp(b.ip, fwd[TCP].dport, CLIENT, client_port, flags="SA"), ifname=b.lb_iface.name)


def test_new_flow_writes_one_entry_and_its_reply_is_translated(shared):
    h = shared
    ct, nat = h.entries("conntrack"), h.entries("rev_nat")
    rc, fwd = h.run(tcp(CLIENT, 46000, WEB_VIP, 80))
    assert rc == XDP_REDIRECT
    assert h.entries("conntrack") == ct + 1 and h.entries("rev_nat") == nat
    rc, out = _reply(h, fwd, 46000)
    assert rc == XDP_REDIRECT
    assert (out[IP].src, out[TCP].sport, out[IP].dst, out[TCP].dport) == (WEB_VIP, 80, CLIENT, 46000)
    assert_checksums_valid(out)


def test_services_sharing_a_backend_get_their_own_replies(shared):
    h = shared
    # filler-0 and filler-3 both have only backend 0; web may pick it too.
    for port, vip in ((46100, filler_vip(0)), (46101, filler_vip(3))):
        rc, fwd = h.run(tcp(CLIENT, port, vip, 80))
        assert rc == XDP_REDIRECT and fwd[IP].dst == h.topo.backends[0].ip
        rc, out = _reply(h, fwd, port)
        assert rc == XDP_REDIRECT and (out[IP].src, out[TCP].sport) == (vip, 80)


def test_reply_from_another_backend_of_the_service_is_not_translated(shared):
    h = shared
    rc, fwd = h.run(tcp(CLIENT, 46200, WEB_VIP, 80))
    other = next(b for b in h.topo.backends if b.ip != fwd[IP].dst)
    rc, out = h.run(tcp(other.ip, h.topo.backend_port, CLIENT, 46200, flags="SA"),
                    ifname=other.lb_iface.name)
    assert rc == XDP_PASS and out[IP].src == other.ip


def test_a_service_past_the_index_slots_writes_reverse_nat(shared):
    h = shared
    c = h.dp.consts
    # Per backend: web, then fillers i, i+3, ...: filler-21..23 are the 9th.
    waiting = [f"filler-{i}" for i in (21, 22, 23)]
    for name in [s.name for s in h.cfg.services]:
        flagged = bool(h.dp.maps["services"].lookup(_key(h, name)).flags & c.SVC_F_REV_NAT)
        assert flagged == (name in waiting), name
        assert h.rec.replies.needs_rev_nat(_svc(h, name).svc_id) == (name in waiting)
    nat = h.entries("rev_nat")
    rc, fwd = h.run(tcp(CLIENT, 46300, filler_vip(21), 80))
    assert rc == XDP_REDIRECT and h.entries("rev_nat") == nat + 1
    rc, out = _reply(h, fwd, 46300)
    assert rc == XDP_REDIRECT and (out[IP].src, out[IP].dst) == (filler_vip(21), CLIENT)
    # The index entry itself lists the first 8, as the control plane says.
    b0 = h.topo.backends[0]
    key = addr_key(bkey(_ip(b0.ip), h.topo.backend_port), 6)
    assert _index_entry(h, b0.ip, h.topo.backend_port) == h.rec.replies.listed(key)
    assert len(h.rec.replies.listed(key)) == c.REPLY_INDEX_SVCS


def test_removing_a_listed_service_lets_a_waiting_one_in(lab, bpf_object):
    lab_, topo = lab
    cfg = lab_config(topo, fillers=24, bpffs="", socket="/run/xdplb/test-replies2.sock")
    with Harness(lab_, topo, cfg, attach=False) as h:
        c = h.dp.consts
        d = h.edit()
        d["services"] = [s for s in d["services"] if s["name"] != "filler-0"]
        h.apply(d)
        waiting_id = _svc(h, "filler-21").svc_id
        assert not h.rec.replies.needs_rev_nat(waiting_id)
        assert waiting_id in _index_entry(h, topo.backends[0].ip, topo.backend_port)
        # Its record is rewritten without the flag on its next change.
        d["services"] = [dict(s, client_affinity_s=60) if s["name"] == "filler-21" else s
                         for s in d["services"]]
        h.apply(d)
        assert not h.dp.maps["services"].lookup(_key(h, "filler-21")).flags & c.SVC_F_REV_NAT
        # A restarted control plane finds the same index and rewrites nothing.
        again = Reconciler(h.dp)
        assert _dirty(again.replies) == ({}, [])
        for b in topo.backends:
            key = addr_key(bkey(_ip(b.ip), topo.backend_port), 6)
            assert again.replies.listed(key) == h.rec.replies.listed(key)
        assert again.replies.needs_rev_nat(_svc(h, "filler-22").svc_id)


def _ip(s: str):
    from ipaddress import IPv4Address
    return IPv4Address(s)


def _key(h, name: str):
    from lb.reconcile import _svc_key
    svc = next(s for s in h.cfg.services if s.name == name)
    k = h.dp.maps["services"].key_type()
    _svc_key(k, svc.key, h.dp.consts)
    return k


def _index_entry(h, ip: str, port: int) -> list[int]:
    from lb.dataplane import addr_word, htons
    m = h.dp.maps["reply_index"]
    k = m.key_type(port=htons(port), proto=6, family=h.dp.consts.FAMILY_IPV4)
    k.addr[0] = addr_word(_ip(ip))
    return [int(i) for i in m.lookup(k).svc_id if i]
