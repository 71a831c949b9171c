"""Build the Application Entity, bind the handlers, start and stop cleanly."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from pynetdicom import AE
from pynetdicom import events as evt

from storage import Archive, install_decoder_log_filter, open_archive

from . import engine
from .access import Access
from .activity import Activity
from .audit import open_audit
from .commitment import Reporter
from .config import Config
from .contexts import STORAGE, SUPPORTED
from .engine import reactor
from .engine.guards import Guards, close_unassociated
from .engine.sockets import disable_nagle, quick_ack
from .handlers import (
    handle_echo,
    handle_find,
    handle_get,
    handle_move,
    handle_n_action,
    handle_sop_extended,
    handle_store,
)
from .nodes import Heartbeat
from .retention import Retention
from .routing import Router, free_dead_leases
from .tls import server_context

logger = logging.getLogger("minipacs")


class ListenError(OSError):
    """A listener could not bind its address and port."""


def build_ae(config: Config) -> AE:
    """The AE a server of ``config`` listens with: its title, limits, timeouts and every
    presentation context it accepts (``scp/contexts.py``; storage with SCU/SCP role
    selection). ``minipacs conformance-statement`` describes this AE."""
    cfg = config.ae
    ae = AE(ae_title=cfg.title)
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = cfg.max_pdu_size
    ae.acse_timeout = cfg.acse_timeout
    ae.dimse_timeout = cfg.dimse_timeout
    ae.network_timeout = cfg.network_timeout
    ae.connection_timeout = cfg.acse_timeout  # TCP connect to a C-MOVE destination
    for abstract_syntax, transfer_syntaxes in SUPPORTED:
        if abstract_syntax in STORAGE:
            ae.add_supported_context(
                abstract_syntax, transfer_syntaxes, scu_role=True, scp_role=True
            )
        else:
            ae.add_supported_context(abstract_syntax, transfer_syntaxes)
    return ae


class Server:
    """A running minipacs: the archive and one DICOM listener.

    Parameters
    ----------
    config : Config
        The configuration; ``ae.port`` 0 picks a free port (see :attr:`port`).
    archive : Archive, optional
        An archive already open; by default one is opened from ``config``.
    """

    def __init__(self, config: Config, archive: Archive | None = None) -> None:
        self.config = config
        # serving: a second server is kept out, ``delete`` may run beside this one
        self.archive = archive or open_archive(
            dataclasses.replace(config.archive_options(), serving=True))
        self.audit = open_audit(config)
        self.activity = Activity(on_association_end=self.archive.release,
                                 known_peer=lambda title: config.peer(title) is not None,
                                 audit=self.audit)
        self.access = Access(config, self.audit)
        self.router = Router(config, self.archive, self.audit)
        self.reporter = Reporter(config, self.archive, self.audit)
        self.retention = Retention(config, self.archive, self.audit)
        self.heartbeat = Heartbeat(self.archive)
        self.ae = build_ae(config)
        self._server: Any = None
        self._tls_server: Any = None
        self._stopped = False
        self._port = config.ae.port
        self._tls_port = config.tls.port

    def _handlers(self) -> list[Any]:
        a, act, acc = self.archive, self.activity, self.access
        guards = Guards(self.config.ae.network_timeout, self.config.ae.max_pdu_size)
        return [
            *guards.handlers(),  # first: EVT_REQUESTED's aborts before any access check
            (evt.EVT_CONN_OPEN, disable_nagle),
            (evt.EVT_CONN_OPEN, quick_ack),  # after the guards: wraps their reader
            (evt.EVT_CONN_OPEN, reactor.handle_conn_open),
            (evt.EVT_CONN_CLOSE, reactor.handle_conn_close),
            (evt.EVT_REQUESTED, acc.handle_requested),
            (evt.EVT_SOP_EXTENDED, handle_sop_extended, [act]),
            (evt.EVT_C_ECHO, handle_echo, [act, acc]),
            (evt.EVT_C_STORE, handle_store, [a, act, acc]),
            (evt.EVT_C_FIND, handle_find, [a, act, acc]),
            (evt.EVT_C_GET, handle_get, [a, act, acc]),
            (evt.EVT_C_MOVE, handle_move, [a, act, acc]),
            (evt.EVT_N_ACTION, handle_n_action, [a, act, acc]),
            (evt.EVT_ESTABLISHED, act.handle_established),
            (evt.EVT_REJECTED, act.handle_rejected),
            (evt.EVT_RELEASED, act.handle_closed),
            (evt.EVT_ABORTED, act.handle_closed),
            (evt.EVT_CONN_CLOSE, act.handle_closed),
        ]

    def start(self) -> None:
        """Start listening (returns at once; associations run in their own threads).

        Raises
        ------
        ListenError
            A listener could not bind its port; none is left running.
        scp.engine.UntestedVersion
            pynetdicom or pydicom is not a version scp/engine/ is tested with (and
            ``MINIPACS_ALLOW_UNTESTED=1`` is not set); nothing is started.
        """
        cfg, tls = self.config.ae, self.config.tls
        self.archive.deidentifiers.prepare()  # the table read now: a bad one stops the start
        engine.install()  # the wake-ups, spooling, C-FIND responses, context copies, leases
        install_decoder_log_filter()  # pydicom's decoder tracebacks at DEBUG
        if not tls.only:
            self._server = self._listen(cfg.port)
            self._port = int(self._server.server_address[1])
            logger.info(
                "minipacs serving AE title %s on %s:%d; index %s; file store %s",
                cfg.title,
                cfg.bind,
                self.port,
                self.config.index_url,
                self.config.files_path,
            )
        if tls.enabled:
            try:
                self._tls_server = self._listen(
                    tls.port, ssl_context=server_context(tls, cfg.acse_timeout))
            except ListenError:
                if self._server is not None:  # leave nothing half started
                    self._server.shutdown()
                    self._server = None
                raise
            self._tls_port = int(self._tls_server.server_address[1])
            logger.info(
                "minipacs serving AE title %s with DICOM TLS on %s:%d (client certificate"
                " %s)", cfg.title, cfg.bind, self.tls_port,
                "required" if tls.require_client_cert else "not required",
            )
        free_dead_leases(self.archive)
        self.audit.record("application-start", ae_title=cfg.title,
                          port=self.port if self._server is not None else None,
                          tls_port=self.tls_port if self._tls_server is not None else None)
        self.router.start()
        self.reporter.start()
        self.retention.start()
        if self.config.shared_index:
            self.heartbeat.start()
        if self.config.security.allow_unknown_peers:
            logger.warning(
                "security.allow_unknown_peers is true: any AE title may store, query and"
                " retrieve (the limits of peers bind only the AE titles listed there); list"
                " your modalities and viewers under peers and set it to false (README:"
                " Locking the server down)"
            )

    def _listen(self, port: int, **kwargs: Any) -> Any:
        try:
            return self.ae.start_server(
                (self.config.ae.bind, port), block=False, evt_handlers=self._handlers(),
                **kwargs,
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {self.config.ae.bind}:{port}: {exc.strerror or exc}"
            ) from exc

    @property
    def port(self) -> int:
        """The port actually bound (kept after :meth:`stop`)."""
        return self._port

    @property
    def tls_port(self) -> int:
        """The TLS listener's port (kept after :meth:`stop`)."""
        return self._tls_port

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let operations in flight finish (up to ``grace`` seconds), abort
        associations left idle, and close the archive (once; later calls do nothing)."""
        if self._stopped:
            return
        self._stopped = True
        for listener in (self._server, self._tls_server):
            if listener is not None:
                listener.shutdown()
        self._server = self._tls_server = None
        if not self.activity.wait_idle(grace):
            logger.warning("operations still in flight after %.0f s; aborting them", grace)
        close_unassociated(self.ae)
        reactor.settle(self.ae.active_associations, timeout=min(grace, 5.0))
        self.ae.shutdown()
        background = (self.router, self.reporter, self.retention)
        for part in background:
            part.request_stop()
        deadline = time.monotonic() + grace
        for part in background:
            part.join(deadline)
        # the heartbeat last: others must not take over what this node still sends; then
        # its leases go with it
        self.heartbeat.request_stop()
        self.heartbeat.join(time.monotonic() + grace)
        self.archive.close()
        self.audit.record("application-stop", ae_title=self.config.ae.title)
        self.audit.close()
        logger.info("minipacs stopped")

