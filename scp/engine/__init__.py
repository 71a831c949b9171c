"""The only code of minipacs that touches pynetdicom's internals.

pynetdicom's public API (the AE, events and their handlers, statuses, SOP classes) is all
that the rest of scp/ uses; what minipacs needs below it lives here:

- :mod:`.reactor`: the reactors of our associations wait for work instead of polling every
  1 ms, and the data set of every C-STORE we accept is spooled to a file as it arrives;
- :mod:`.guards`: guards against peers that send garbage or stall;
- :mod:`.sockets`: TCP_NODELAY, TCP_QUICKACK, and the listening sockets a worker process
  shares (``ae.workers``);
- :mod:`.responses`: C-FIND responses packed without pynetdicom's per-response encoding;
- :mod:`.contexts`: cheap per-association copies of the presentation contexts;
- :mod:`.acse`: rejecting an association request (scp/access.py), and a quick rejection
  of ours as a requestor kept as a rejection, not an abort;
- :mod:`.retrieve`: the final response of a C-GET or C-MOVE, rewritten on its way out;
- :mod:`.receiver`: C-STORE requests read and answered by the DUL thread itself;
- :mod:`.sender` and :mod:`.dimse`: the C-STORE sub-operations of retrieves, written to
  the socket by hand (an association of ours to a C-MOVE destination, or the C-GET's
  own, lent by its DUL thread: :func:`.reactor.leased`).

Each relies on names pynetdicom does not promise to keep, every one of them listed in
:data:`PRIVATE_SYMBOLS` (tests/scp/test_engine.py fails when one is gone, and when a module
of scp/ outside this package reaches for one). :func:`install` puts the process-wide
changes in place, once, behind one version gate (:func:`check_versions`, :data:`TESTED`,
the pins of pyproject.toml): on an untested pynetdicom or pydicom it raises
:class:`UntestedVersion`, unless ``MINIPACS_ALLOW_UNTESTED=1`` is set; then it logs a
warning and installs nothing.
"""

from __future__ import annotations

import logging

from .versions import ALLOW_UNTESTED, TESTED, check_versions, pinned, untested_allowed

__all__ = ["ALLOW_UNTESTED", "PRIVATE_SYMBOLS", "PRIVATE_VALUES", "TESTED", "UntestedVersion",
           "check_versions", "install"]

logger = logging.getLogger(__name__)

PRIVATE_SYMBOLS: tuple[tuple[str, str], ...] = (
    # module-level replacements (install(), once per process)
    ("pynetdicom.dul:time", "reactor: the DUL reactor's sleep becomes a wait on its socket"
     " and a wake-up pipe"),
    ("pynetdicom.association:time", "reactor: the association reactor's 1 ms sleep becomes a"
     " wait on an event"),
    ("pynetdicom.dimse_messages:_config", "reactor: STORE_RECV_CHUNKED_DATASET true only in"
     " the DUL threads of associations we accept (spooling)"),
    ("pynetdicom.dimse_messages:create_file_meta", "reactor: no File Meta is built for a"
     " spool"),
    ("pynetdicom.dimse_messages:write_file_meta_info", "reactor: the spool emptied of its"
     " preamble; it holds the data set alone"),
    ("pynetdicom._config:STORE_RECV_CHUNKED_DATASET", "reactor: read through our proxy of"
     " _config"),
    ("pynetdicom._config:LOG_REQUEST_IDENTIFIERS", "responses: identifiers not decoded for"
     " the log below DEBUG"),
    ("pynetdicom._config:LOG_RESPONSE_IDENTIFIERS", "responses: response identifiers not"
     " rendered for the log below DEBUG"),
    ("pynetdicom._config:LOG_HANDLER_LEVEL", "responses: pynetdicom's per-message log"
     " handlers off below DEBUG"),
    ("pynetdicom.acse:ACSE._negotiate_as_requestor", "acse: an A-ASSOCIATE-RJ that"
     " arrived before the requestor looked at its socket is kept as the rejection"),
    ("pynetdicom.service_class:encode", "responses: pre-encoded C-FIND identifiers pass"
     " through"),
    ("pynetdicom.service_class:LOGGER", "retrieve: the A801 line of a move we answer"
     " ourselves is dropped (its logger's name, pynetdicom.service_class)"),
    ("pynetdicom.dimse:DIMSEServiceProvider.send_msg", "responses: plain C-FIND responses"
     " packed by hand; retrieve: per-association rewrite of C-GET/C-MOVE responses"),
    ("pynetdicom.transport:RequestHandler._create_association", "contexts: deep-copies"
     " the supported contexts for every association; PresentationContext gets a cheap"
     " __deepcopy__"),
    ("pynetdicom.presentation:PresentationContext._transfer_syntax", "contexts: the one"
     " mutable part a copy must not share"),
    ("pynetdicom.transport:ThreadedAssociationServer.server_bind", "sockets: a worker adopts"
     " the supervisor's listening socket"),
    ("pynetdicom.transport:ThreadedAssociationServer.server_close", "sockets: closing an"
     " adopted socket must not shut it down for the other workers"),
    # per-connection (bound from EVT_CONN_OPEN and the retrieve handlers)
    ("pynetdicom.association:Association.dul", "every per-connection change reaches the"
     " DUL through it"),
    ("pynetdicom.association:Association.dimse", "guards, reactor, retrieve: the"
     " association's DIMSE provider"),
    ("pynetdicom.association:Association.acse", "guards: A-ABORT of a request with an empty"
     " presentation context; acse: A-ASSOCIATE-RJ of a peer access refuses"),
    ("pynetdicom.acse:ACSE.send_reject", "acse: the A-ASSOCIATE-RJ"),
    ("pynetdicom.acse:ACSE.send_abort", "guards: the A-ABORT"),
    ("pynetdicom.association:Association._reactor_checkpoint", "reactor: a pause request"
     " from another thread wakes the reactor; a response taken while it is cleared goes back"),
    ("pynetdicom.association:Association._serve_request", "reactor: a response a send_*()"
     " waits for is put back, not dropped (pynetdicom#875)"),
    ("pynetdicom.dimse:DIMSEServiceProvider.msg_queue", "reactor: where that response goes"
     " back"),
    ("pynetdicom.dul:DULServiceProvider.socket", "guards, sockets, reactor: the"
     " connection's AssociationSocket"),
    ("pynetdicom.dul:DULServiceProvider.to_provider_queue", "reactor: wake the DUL when a"
     " primitive is queued; responses: back-pressure"),
    ("pynetdicom.dul:DULServiceProvider.to_user_queue", "reactor: wake the association;"
     " guards: end the acceptor's wait"),
    ("pynetdicom.dul:DULServiceProvider.event_queue", "reactor: wake the DUL; guards:"
     " queue Evt19"),
    ("pynetdicom.dul:DULServiceProvider.state_machine", "guards: do_action; receiver: the"
     " DUL state"),
    ("pynetdicom.fsm:StateMachine.current_state", "receiver: C-STORE requests are read"
     " only in Sta6 (data transfer)"),
    ("pynetdicom.dul:DULServiceProvider._kill_thread", "guards: keep the DUL loop running"
     " after a failed action, until Sta1; reactor: a lent socket is given back, and the"
     " DUL's wait ends"),
    ("pynetdicom.dul:DULServiceProvider._idle_timer", "reactor, receiver: the network idle"
     " timer starts over when a lent socket is given back, at every PDU read here and"
     " after a C-STORE answered here"),
    ("pynetdicom.transport:AssociationSocket.ready", "reactor: true while bytes a C-GET"
     " read and gave back wait to be read"),
    ("pynetdicom.dul:DULServiceProvider.send_pdu", "responses: queue a packed P-DATA"),
    ("pynetdicom.fsm:StateMachine.do_action", "guards: an action that raises aborts the"
     " association"),
    ("pynetdicom.dimse:DIMSEServiceProvider.receive_primitive", "guards: an undecodable"
     " command set aborts the association"),
    ("pynetdicom.dimse:DIMSEServiceProvider.msg_queue", "reactor: wake the association"
     " when a message is queued"),
    ("pynetdicom.dimse:DIMSEServiceProvider.message", "guards, reactor: the message being"
     " received, and its spool; receiver: none half received by pynetdicom"),
    ("pynetdicom.dimse:DIMSEServiceProvider.maximum_pdu_size", "responses: fall back when"
     " a response needs fragmenting"),
    ("pynetdicom.dimse_messages:DIMSEMessage._data_set_file", "guards, reactor: remove the"
     " spool of a message no handler will see"),
    ("pynetdicom.transport:AssociationSocket.recv", "guards: PDU header checks; sockets:"
     " TCP_QUICKACK after each read; reactor: bytes a C-GET gave back read first"),
    ("pynetdicom.transport:AssociationSocket.socket", "guards, sockets, reactor: the socket"
     " (timeout, options, select, A-ABORT bytes)"),
)
"""Every private or undocumented pynetdicom name scp/engine/ relies on, as
``module:attribute.path`` and why. An attribute a class sets only on its instances is
found in its source (``self.<name>``)."""

PRIVATE_VALUES: tuple[tuple[str, str, str], ...] = (
    ("pynetdicom.fsm:STATES", "Sta6", "receiver: the DUL state of data transfer"),
    ("pynetdicom.fsm:EVENTS", "Evt19", "guards: the event queued for an undecodable command"
     " set (invalid PDU)"),
    ("pynetdicom.association:Association._run_reactor", "time.sleep(0.001)",
     "reactor: the association loop's sleep, recognised by its value"),
    ("pynetdicom.dul:DULServiceProvider.run_reactor", "time.sleep(", "reactor: the DUL"
     " loop's sleep"),
    ("pynetdicom.transport:RequestHandler._create_association", "deepcopy(", "contexts: the"
     " copy our __deepcopy__ makes cheap"),
)
"""Values of pynetdicom's that scp/engine/ recognises: (``module:object``, value, why); the
value is a key of the object, or a piece of its source."""

NOT_INSTALLED = (
    "the reactors of each association poll every 1 ms (slower C-STORE, CPU when idle);"
    " C-STORE data sets are held in memory, not spooled to a file; C-FIND responses are"
    " encoded by pynetdicom; each association copies every presentation context the slow"
    " way; C-STORE requests go through pynetdicom's per-PDU path; C-GET cannot send"
    " sub-operations (its socket cannot be lent: answered A702);"
    " pynetdicom logs \"Unknown Move Destination\" before the final response of every"
    " C-MOVE")
"""What does not happen when :func:`install` installs nothing."""


class UntestedVersion(RuntimeError):
    """The installed pynetdicom or pydicom is not a version scp/engine/ is tested with."""


_installed: bool | None = None


def install(allow_untested: bool | None = None) -> bool:
    """Put scp/engine/'s process-wide changes into pynetdicom (once per process).

    Returns ``True`` when they are installed; ``False`` when the versions are untested and
    that is allowed: a warning says what does not work, and nothing is installed.

    Parameters
    ----------
    allow_untested : bool, optional
        Run on untested versions; by default, whether ``MINIPACS_ALLOW_UNTESTED=1``.

    Raises
    ------
    UntestedVersion
        The installed pynetdicom or pydicom is outside :data:`TESTED`, and that is not
        allowed; the message names both and the override.
    """
    global _installed
    if _installed is not None:
        return _installed
    problems = check_versions()
    if problems:
        if allow_untested is None:
            allow_untested = untested_allowed()
        if not allow_untested:
            raise UntestedVersion(
                "; ".join(problems) + ". scp/engine/ changes pynetdicom's internals and was"
                " not tested with these versions: install "
                + " and ".join(f"{name}{pinned(name)}" for name in TESTED)
                + f" (pyproject.toml), or set {ALLOW_UNTESTED}=1 to run without those"
                " changes")
        logger.warning("%s=1: running on untested versions (%s); scp/engine/ installs"
                       " nothing: %s", ALLOW_UNTESTED, "; ".join(problems), NOT_INSTALLED)
        _installed = False
        return False
    from . import acse, contexts, reactor, responses, retrieve

    acse.keep_quick_rejections()  # a peer's quick A-ASSOCIATE-RJ is not taken for an abort
    reactor.install()  # also: C-STORE data sets spooled to files (storage.Spooled)
    retrieve.install()  # pynetdicom's A801 line, before our final response, dropped
    responses.install()  # C-FIND responses encoded by storage, command set by hand
    contexts.cheap_context_copies()  # association set-up 46.6 -> 5.3 ms
    _installed = True
    return True
