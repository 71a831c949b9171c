"""Who may associate with us, and what each peer may do.

Two levels, as PS3.7 and PS3.8 give them:

- the association: in EVT_REQUESTED, before any negotiation, an A-ASSOCIATE-RQ is rejected
  (A-ASSOCIATE-RJ, rejected-permanent, source DICOM UL service-user, PS3.8 9.3.4) with
  "called AE title not recognised" when ``security.require_called_ae_title`` is on and
  the request does not call ``ae.title``, and with "calling AE title not recognised"
  when the calling AE title is not in ``peers`` (and ``security.allow_unknown_peers`` is
  off), or is, but the connection comes from outside its ``network`` (by default, for a
  peer with a ``host``, from anywhere but that host). pynetdicom skips its
  own negotiation once a handler of EVT_REQUESTED has rejected (association.py: "User used
  EVT_REQUESTED to send an A-ABORT or A-ASSOCIATE-RJ");
- the service: a known peer may use only its ``services``; any other request is answered
  0124 Refused: Not Authorised (PS3.7 C.5.x general status) by the handlers.

Both are logged with the peer, its address and the reason.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from pynetdicom import events as evt

from . import metrics
from .audit import Audit, NoAudit
from .config import Config, PeerConfig
from .engine import acse

logger = logging.getLogger(__name__)

# PS3.8 Table 9-21, A-ASSOCIATE-RJ
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


class Access:
    """The ``security`` and ``peers`` settings, applied to associations and requests."""

    def __init__(self, config: Config, audit: Audit | None = None) -> None:
        self.config = config
        self.audit: Audit = audit or NoAudit()
        self._networks = {
            p.ae_title.strip(" "): _networks(p) for p in config.peers if p.network or p.host
        }

    def refusal(self, calling: str, called: str, address: str) -> tuple[int, str] | None:
        """Why an association from ``calling`` at ``address`` to ``called`` is rejected
        (the A-ASSOCIATE-RJ reason and a sentence for the log), or ``None``."""
        security = self.config.security
        calling, called = calling.strip(" "), called.strip(" ")
        if security.require_called_ae_title and called != self.config.ae.title.strip(" "):
            return CALLED_AE_NOT_RECOGNISED, (
                f"it calls {called!r}, not {self.config.ae.title!r}"
                " (security.require_called_ae_title)")
        peer = self.config.peer(calling)
        if peer is None:
            if security.allow_unknown_peers:
                return None
            return CALLING_AE_NOT_RECOGNISED, (
                f"{calling!r} is not in peers (security.allow_unknown_peers is false)")
        networks = self._networks.get(peer.ae_title.strip(" "))
        if networks is not None and not any(_within(address, n) for n in networks):
            allowed = ", ".join(map(str, networks)) or f"{peer.host} (not resolvable)"
            return CALLING_AE_NOT_RECOGNISED, (
                f"{calling!r} may connect from {allowed} only"
                f" (peers[].{'network' if peer.network else 'host'})")
        return None

    def handle_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED: reject an association that :meth:`refusal` refuses."""
        assoc = event.assoc
        request = assoc.requestor.primitive
        if request is None or assoc.is_aborted:  # aborted by scp.engine.guards: malformed
            return
        calling = _text(request.calling_ae_title)
        called = _text(request.called_ae_title)
        address = assoc.requestor.address
        refused = self.refusal(calling, called, address)
        if refused is None:
            return
        reason, why = refused
        logger.warning("association from %s@%s to %s rejected: %s", calling, address, called,
                       why)
        # counted first: the peer learns of the rejection before reject() returns
        metrics.REJECTED.labels(metrics.calling_ae(
            calling, lambda title: self.config.peer(title) is not None)).inc()
        self.audit.record("association-rejected", calling_ae=calling, called_ae=called,
                          address=address, reason=why)
        acse.reject(assoc, REJECTED_PERMANENT, SOURCE_SERVICE_USER, reason)

    def allows(self, event: evt.Event, service: str) -> bool:
        """May ``event``'s peer use ``service`` (one of ``config.SERVICES``)? Logs a
        refusal. An unknown peer got in only if unknown peers are allowed: it may do
        everything."""
        calling = event.assoc.requestor.ae_title
        peer = self.config.peer(calling)
        if peer is None or service in peer.services:
            return True
        logger.warning("%s from %s@%s refused: not in its peers[].services (%s)",
                       service, calling.strip(" "), event.assoc.requestor.address,
                       ", ".join(peer.services) or "none")
        return False


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(peer: PeerConfig) -> list[Network]:
    """Where ``peer`` may connect from: its ``network``; without one, its ``host`` (the
    address, or every address the name resolves to now): a peer listed as a C-MOVE
    destination does not lend its AE title to anyone elsewhere."""
    if peer.network:
        return [_unmapped(ipaddress.ip_network(peer.network, strict=False))]
    try:
        return [_unmapped(ipaddress.ip_network(peer.host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        logger.warning("peers: cannot resolve %s (%s): %s cannot associate until restart",
                       peer.host, exc, peer.ae_title)
        return []
    return sorted({_unmapped(ipaddress.ip_network(info[4][0])) for info in infos}, key=str)


def _unmapped(network: Network) -> Network:
    """``::ffff:10.0.0.0/104`` as ``10.0.0.0/8``: addresses are compared unmapped too."""
    if isinstance(network, ipaddress.IPv6Network):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None and network.prefixlen >= 96:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
    return network


def _within(address: str, network: Network) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 peer on a dual-stack listener
    return ip in network


def _text(value: str | bytes) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
