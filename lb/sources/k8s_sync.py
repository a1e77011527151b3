"""Kubernetes state -> xdplb services, incrementally (no I/O).

`KubeState` holds the slim objects and indexes and turns a batch of events
into the set of Services to re-translate; `Syncer` translates only those,
validates only the resulting xdplb services (pydantic, per service; cross
checks against O(1) indexes) and returns a `Plan` for the daemon.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import ValidationError

from ..config import _COLLECT, Backend, KubernetesSource, Service, _dsr_problems, _identity_ids, encap_problems, _table_size_problems
from . import k8s_model as m
from .k8s_reflector import Event, _kv, _short

log = logging.getLogger("xdplb.k8s")

# ---- state -------------------------------------------------------------------------


class KubeState:
    """Slim objects and the indexes that say what an event touches."""

    def __init__(self, node_name: str | None, proxy_name: str | None, network_policy: bool) -> None:
        self.node_name, self.proxy_name, self.network_policy = node_name, proxy_name, network_policy
        self.services: dict[tuple[str, str], m.KService] = {}
        self.slices: dict[tuple[str, str], m.KSlice] = {}
        self.slices_of: dict[tuple[str, str], set[tuple[str, str]]] = collections.defaultdict(set)
        self.node: m.KNode | None = None
        self.pods: dict[tuple[str, str], m.KPod] = {}
        self.namespaces: dict[str, m.KNamespace] = {}
        self.policies: dict[tuple[str, str], m.KPolicy] = {}
        self.ranges: collections.Counter[str] = collections.Counter()   # every loadBalancerSourceRange

    def apply(self, ev: Event, dirty: set, flags: set) -> None:
        """Record one event; add the Services it touches to `dirty`, and
        'policy' / 'node' to `flags` when every Service may be touched."""
        k, key, obj = ev.kind, ev.key, ev.obj
        if k == "Service":
            old = self.services.pop(key, None)
            if old is not None:
                self.ranges.subtract(old.lb_source_ranges)
            if obj is not None:
                self.services[key] = obj
                self.ranges.update(obj.lb_source_ranges)
            if (old.lb_source_ranges if old else ()) != (obj.lb_source_ranges if obj else ()):
                flags.add("policy")                  # the CIDR identities change
            dirty.add(key)
        elif k == "EndpointSlice":
            old = self.slices.pop(key, None)
            if old is not None and old.service_key:
                self.slices_of[old.service_key].discard(key)
                dirty.add(old.service_key)
            if obj is not None:
                self.slices[key] = obj
                if obj.service_key:
                    self.slices_of[obj.service_key].add(key)
                    dirty.add(obj.service_key)
        elif k == "Node":
            if key[1] == self.node_name:
                self.node = obj
                flags.add("node")
        elif k in ("Pod", "Namespace", "NetworkPolicy"):
            if not self.network_policy:
                return
            store = {"Pod": self.pods, "NetworkPolicy": self.policies}.get(k)
            if k == "Namespace":
                store, key = self.namespaces, key[1]
            old = store.pop(key, None)
            if obj is not None:
                store[key] = obj
            if k == "Pod" and old is not None and obj is not None and \
                    (old.labels, old.ips, old.host_network) == (obj.labels, obj.ips, obj.host_network):
                return                               # a status change that moves no identity
            flags.add("policy")

    def slices_for(self, key: tuple[str, str]) -> list[m.KSlice]:
        return [self.slices[s] for s in self.slices_of.get(key, ())]

    def policy_view(self) -> m.PolicyView:
        return m.PolicyView(self.pods, self.namespaces, self.policies)


# ---- the syncer ------------------------------------------------------------------------


@dataclass
class Plan:
    """One batch's outcome: apply `identities` (if not None) first, then
    delete and upsert these services, each atomically."""

    identities: dict[str, tuple[m.Network, ...]] | None = None
    upserts: list[Service] = field(default_factory=list)
    deletes: list[tuple] = field(default_factory=list)       # SvcKey
    rvs: dict[str, int] = field(default_factory=dict)        # kind -> highest resourceVersion in the batch
    received_ns: list[int] = field(default_factory=list)     # when each event of the batch arrived


@dataclass
class SyncStats:
    batches: int = 0
    events: int = 0
    translated: int = 0
    upserts: int = 0
    deletes: int = 0
    rejected: int = 0
    conflicts: int = 0
    skipped_sctp: int = 0
    skipped_family: int = 0          # addresses of a family the Service has no clusterIP of
    not_served: int = 0
    bad_annotations: int = 0         # annotation values ignored (the default served instead)


def to_service(e: m.Entry) -> Service:
    """Validate one translated entry as a config.Service. Backends were
    built from checked values (addresses of the VIP's family, ports
    1..65535) and are constructed without re-validation; the service
    itself is validated in full."""
    backends = tuple(Backend.model_construct(address=a, port=p, weight=1, state=s)
                     for a, p, s in e.backends)
    # _COLLECT skips config._service_problems(): duplicate backends, an
    # identity listed twice, allow/deny overlap and udp health checks cannot
    # occur in a translation (backends come from a dict, allow is a sorted
    # set, there is no deny and no health check), and the check stringifies
    # every backend address (2/3 of a 20k-service first sync).
    return Service.model_validate({"name": e.name, "vip": e.vip, "port": e.port,
                                   "protocol": e.protocol, "backends": backends,
                                   "allow": e.allow, "client_affinity_s": e.client_affinity_s,
                                   "forwarding": e.forwarding, "maglev_table_size": e.maglev_table_size},
                                  context={_COLLECT: True})


def usable_options(s: Service, encap_families: frozenset[int]) -> tuple[Service, list[str]]:
    """`s` without the annotated options it cannot take (config's rules for
    them, which _COLLECT skipped), each back to its default, and why."""
    why = []
    if s.maglev_table_size is not None and (problems := _table_size_problems(s)):
        why.append(f"{s.name}: annotation {m.TABLE_SIZE_ANNOTATION}: {'; '.join(problems)}; "
                   f"the table size follows the backend count")
        s = s.model_copy(update={"maglev_table_size": None})
    if s.dsr:
        problems = encap_problems(s, encap_families) + _dsr_problems(s)
        if problems:
            why.append(f"{s.name}: annotation {m.FORWARDING_ANNOTATION}={s.forwarding}: "
                       f"{'; '.join(problems)}; forwarding nat")
            s = s.model_copy(update={"forwarding": "nat"})
    return s, why


class Syncer:
    """Kubernetes state -> xdplb services, incrementally."""

    def __init__(self, settings: KubernetesSource) -> None:
        self.settings = settings
        self.state = KubeState(settings.node_name, settings.proxy_name, settings.network_policy)
        self.entries: dict[str, Service] = {}                   # xdplb name -> service
        self.by_key: dict[tuple, str] = {}                       # SvcKey -> xdplb name
        self.owned: dict[tuple[str, str], tuple[str, ...]] = {}  # k8s service -> xdplb names
        self.owner: dict[str, tuple[str, str]] = {}              # xdplb name -> k8s service
        self.identities: dict[str, tuple[m.Network, ...]] = {}
        self.view: m.PolicyView = self.state.policy_view()
        self.pod_ips: set[str] = set()
        self.stats = SyncStats()
        self.notes: dict[tuple[str, str], list[str]] = {}       # why parts of a service are not served
        self.bad_notes: dict[tuple[str, str], list[str]] = {}   # annotation values ignored, and why
        # SvcKey -> k8s services that wanted it while another held it: retried when it frees up.
        self.waiting: dict[tuple, set[tuple[str, str]]] = {}
        self.identity_limit = 65536          # the identities map's size (the daemon sets it)
        self.encap_families: frozenset[int] = frozenset()   # of the daemon's encap_source (it sets them)

    # -- batches ---------------------------------------------------------------------

    def plan(self, events: Iterable[Event]) -> Plan:
        plan = Plan()
        dirty: set[tuple[str, str]] = set()
        flags: set[str] = set()
        for ev in events:
            if ev.type == "SYNCED":
                continue
            self.stats.events += 1
            plan.received_ns.append(ev.received_ns)
            plan.rvs[ev.kind] = max(plan.rvs.get(ev.kind, 0), ev.rv)
            self.state.apply(ev, dirty, flags)
        if "policy" in flags:
            new = self._identities()
            if new != self.identities:
                plan.identities = new
            # Every service whose answer may depend on the policy view.
            pods = self.pod_ips | set(self.view.pod_by_ip)
            for key, names in self.owned.items():
                if any(self.entries[n].allow is not None for n in names) or \
                        any(str(b.address) in pods for n in names for b in self.entries[n].backends):
                    dirty.add(key)
            dirty |= {k for k, s in self.state.services.items() if s.lb_source_ranges}
            self.pod_ips = set(self.view.pod_by_ip)
        if "node" in flags:
            dirty |= {k for k, s in self.state.services.items()
                      if s.type in ("NodePort", "LoadBalancer") or s.etp_local or s.itp_local}
        for key in sorted(dirty):
            self._retranslate(key, plan)
        freed = {k for sk in plan.deletes for k in self.waiting.pop(sk, ())} - dirty
        for key in sorted(freed):                     # an address a Service waited for is free now
            self._retranslate(key, plan)
        self.stats.batches += 1
        self.stats.upserts += len(plan.upserts)
        self.stats.deletes += len(plan.deletes)
        return plan

    def _identities(self) -> dict[str, tuple[m.Network, ...]]:
        view = self.state.policy_view()
        ids = view.identities(+self.state.ranges)
        problems = _identity_ids(ids, None, None)[1]
        cidrs = sum(len(v) for v in ids.values())
        if cidrs > self.identity_limit:
            problems.append(f"{cidrs} identity CIDRs (pod IPs, policy and source-range CIDRs) exceed "
                            f"the identities map's {self.identity_limit} entries")
        if problems:
            log.error(_kv("identities not updated; keeping the previous identities and policy",
                          problems="; ".join(problems)))
            return self.identities
        self.view = view
        return ids

    def _retranslate(self, key: tuple[str, str], plan: Plan) -> None:
        svc = self.state.services.get(key)
        new: dict[str, Service] = {}
        if svc is not None:
            why = m.serves(svc, self.settings.proxy_name)
            if why is not None:
                self.stats.not_served += 1
                log.debug(_kv("not served", service=f"{key[0]}/{key[1]}", reason=why))
            else:
                tr = m.translate(svc, self.state.slices_for(key), self.state.node,
                                 self.settings.node_name, self.view)
                self.stats.translated += 1
                self.stats.skipped_sctp += tr.sctp
                self.stats.skipped_family += tr.other_family
                if tr.skipped and self.notes.get(key) != tr.skipped:
                    for reason in tr.skipped:
                        log.warning(_kv("not served", reason=reason))
                self.notes[key] = tr.skipped
                try:
                    new = {e.name: to_service(e) for e in tr.entries}
                    bad = list(tr.bad_annotations)
                    for name, s in new.items():
                        new[name], why = usable_options(s, self.encap_families)
                        bad += why
                    self._note_bad_annotations(key, bad)
                except ValidationError as err:
                    # Nothing of this Service changes: the maps keep its last good state.
                    self.stats.rejected += 1
                    log.error(_kv("service rejected, keeping its last applied state",
                                  service=f"{key[0]}/{key[1]}", error=_short(err)))
                    return
        old = self.owned.get(key, ())
        known = set(plan.identities or self.identities) | {"world"}
        for name in list(new):
            s = new[name]
            holder = self.by_key.get(s.key)
            if holder is not None and holder != name and self.owner.get(holder) != key:
                self.stats.conflicts += 1
                self.waiting.setdefault(s.key, set()).add(key)
                log.error(_kv("address already served by another Service; not serving this one",
                              service=f"{key[0]}/{key[1]}", address=f"{s.vip}:{s.port}/{s.protocol}",
                              holder=f"{self.owner[holder][0]}/{self.owner[holder][1]}"))
                del new[name]
            elif s.allow is not None and not set(s.allow) <= known:
                self.stats.rejected += 1
                log.error(_kv("service refers to unknown identities; keeping its last state", service=name))
                if name in self.entries:
                    new[name] = self.entries[name]
                else:
                    del new[name]
        for name in old:
            if name not in new:
                s = self.entries.pop(name)
                self.by_key.pop(s.key, None)
                self.owner.pop(name, None)
                plan.deletes.append(s.key)
        for name, s in new.items():
            if self.entries.get(name) != s:
                plan.upserts.append(s)
            self.entries[name] = s
            self.by_key[s.key] = name
            self.owner[name] = key
        if new:
            self.owned[key] = tuple(new)
        else:
            self.owned.pop(key, None)

    def _note_bad_annotations(self, key: tuple[str, str], bad: list[str]) -> None:
        """Count and log them when they change (not at every retranslation)."""
        if bad and self.bad_notes.get(key) != bad:
            self.stats.bad_annotations += len(bad)
            for reason in bad:
                log.warning(_kv("annotation ignored", reason=reason))
        self.bad_notes[key] = bad

    def services(self) -> tuple[Service, ...]:
        return tuple(self.entries.values())


