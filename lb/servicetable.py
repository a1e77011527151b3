"""The running config's services, changed one at a time in O(1).

The API changes one service per call. `Config.services` is a tuple of
frozen models: replacing one entry copies all 20k references, and finding a
service by name or by (VIP, port, protocol) needs an index over all of them
(rebuilt after every change, that index cost the daemon ~45 ms per call at
20k services). The daemon keeps this table instead, in the config's order,
and makes the tuple only when something reads the whole config.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import Config, ConfigError, Service, config_from_dict

__all__ = ["ServiceTable", "parse_service"]

# (VIP as int, port, protocol): what Service.key says, without hashing an
# IPv4Address in Python (20k of them when the table is made).
_Key = tuple[int, int, str]


def _key(svc: Service) -> _Key:
    return (svc.vip._ip, svc.port, svc.protocol)


class ServiceTable:
    def __init__(self, services: Iterable[Service]) -> None:
        self._tuple: tuple[Service, ...] | None = tuple(services)      # None once changed
        self._by_name: dict[str, Service] = {s.name: s for s in self._tuple}
        self._by_key: dict[_Key, str] = {_key(s): s.name for s in self._tuple}

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Service | None:
        return self._by_name.get(name)

    def holder(self, svc: Service) -> str | None:
        """The name of the service at svc's (VIP, port, protocol), if any."""
        return self._by_key.get(_key(svc))

    def put(self, svc: Service) -> Service | None:
        """Add `svc` (last) or replace the service of its name (in place);
        returns the one replaced. The caller checked holder()."""
        old = self._by_name.get(svc.name)
        if old is not None:
            del self._by_key[_key(old)]
        self._by_name[svc.name] = svc
        self._by_key[_key(svc)] = svc.name
        self._tuple = None
        return old

    def pop(self, name: str) -> Service | None:
        old = self._by_name.pop(name, None)
        if old is not None:
            del self._by_key[_key(old)]
            self._tuple = None
        return old

    @property
    def changed(self) -> bool:
        """True until services() is next called after a put() or pop()."""
        return self._tuple is None

    def services(self) -> tuple[Service, ...]:
        if self._tuple is None:
            self._tuple = tuple(self._by_name.values())
        return self._tuple


def parse_service(raw: Any, cfg: Config, source: str = "<api>") -> Service:
    """One service for the running `cfg`: validated as `config_from_dict`
    validates an entry of a config with cfg's interfaces and identities,
    without re-validating every identity CIDR: only the identities it names
    go along. If that fails, the whole identity set does, so that a
    rejection reads as before (an unknown identity lists the defined ones).
    Raises ConfigError."""
    named = {}
    if isinstance(raw, dict):
        for field in ("allow", "deny"):
            refs = raw.get(field)
            if isinstance(refs, (list, tuple)):
                named.update((r, ()) for r in refs if isinstance(r, str) and r in cfg.identities)
    try:
        return _parse(raw, cfg, named, source)
    except ConfigError:
        return _parse(raw, cfg, {k: [str(n) for n in v] for k, v in cfg.identities.items()}, source)


def _parse(raw: Any, cfg: Config, identities: dict, source: str) -> Service:
    mini = {"interfaces": list(cfg.interfaces), "services": [raw], "identities": identities}
    if cfg.encap_source is not None:        # what a DSR service needs
        mini["encap_source"] = [str(n) for n in cfg.encap_source]
    return config_from_dict(mini, source=source).services[0]
