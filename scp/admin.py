"""The DICOM side of the administrator's page (:class:`web.Operations`): the peers of the
configuration, C-ECHO (:func:`scp.peers.echo`), sending as ``minipacs send`` does, and the
end of the audit trail. ``minipacs serve`` hands one to the HTTP listener."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from storage import Archive, Selection
from web import Done, Peer

from . import peers
from .config import Config, PeerConfig
from .retrieve import Final, send_to

AUDIT_TAIL_BYTES = 1024 * 1024
"""How much of each audit file's end is read for its last lines (a ``route`` line names up
to 100 instances: about 7 KB)."""


def sent_summary(final: Final, total: int, peer: PeerConfig) -> str:
    """One line saying what a send did."""
    return (f"sent {final.completed} of {total} instance(s) to {peer.ae_title} at"
            f" {peer.host}:{peer.port}: {final.warning} with a warning, {final.failed} failed"
            + (f" ({final.comment})" if final.comment else ""))


class PageOperations:
    """What the page's buttons do on the DICOM side, for ``config`` and ``archive``."""

    def __init__(self, config: Config, archive: Archive) -> None:
        self.config = config
        self.archive = archive

    def peers(self) -> list[Peer]:
        return [Peer(p.ae_title, p.host, p.port, p.services) for p in self.config.peers]

    def _peer(self, ae_title: str) -> PeerConfig | None:
        return self.config.destination(ae_title)

    def echo(self, ae_title: str) -> Done:
        peer = self._peer(ae_title)
        if peer is None:
            return Done(False, f"{ae_title!r} is not in peers, or has no host")
        result = peers.echo(self.config, peer)
        return Done(result.ok, f"{result.message} ({result.seconds * 1000:.0f} ms)")

    def send(self, ae_title: str, selection: Selection) -> Done:
        peer = self._peer(ae_title)
        if peer is None:
            return Done(False, f"{ae_title!r} is not in peers, or has no host")
        try:
            items = self.archive.selected(selection)
            if not items:
                return Done(False, "nothing selected is stored")
            final = send_to(self.config, self.archive, peer, items)
        finally:
            self.archive.release()
        counts: dict[str, Any] = {"completed": final.completed, "failed": final.failed,
                                  "warning": final.warning}
        if peer.deidentify:  # the audit line says what left de-identified, by which profile
            counts.update(profile=peer.deidentify, instances=final.sent_uids,
                          withheld=sorted(final.withheld))
        return Done(not final.failed, sent_summary(final, len(items), peer), counts)

    def audit_tail(self, count: int) -> list[dict[str, Any]]:
        if not self.config.audit.enabled:
            return []
        path = self.config.audit_path
        out, whole = _last_lines(path, count)
        if len(out) < count and whole:  # just rotated: the newest rotated file goes on
            out = _last_lines(path.with_name(path.name + ".1"), count - len(out))[0] + out
        return out


def _last_lines(path: Path, count: int) -> tuple[list[dict[str, Any]], bool]:
    """The last ``count`` JSON objects of ``path``'s last :data:`AUDIT_TAIL_BYTES`, and
    whether that was the whole file (else lines before them were not read: nothing older
    may be put before them)."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(size - AUDIT_TAIL_BYTES, 0))
            lines = file.read().splitlines()
    except FileNotFoundError:
        return [], True
    out: list[dict[str, Any]] = []
    for line in reversed(lines):
        if len(out) == count:
            break
        try:
            item = json.loads(line)
        except ValueError:  # the first, cut in the middle, or a torn one
            continue
        if isinstance(item, dict):
            out.append(item)
    return out[::-1], size <= AUDIT_TAIL_BYTES
