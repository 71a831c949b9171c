"""The command line: ``minipacs serve | verify | reindex | import | delete | send | export |
queue | retention | doctor | conformance-statement | hash-password | new-token``,
``minipacs --version``. The only place that exits, and the only one that configures logging (with
:func:`scp.logs.setup_logging`, which worker processes call too)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import getpass
import importlib.metadata
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from storage import (
    COMMITMENT,
    ROUTE,
    Archive,
    Selection,
    StorageError,
    is_object_url,
    open_archive,
)
from web import WebListenError, WebServer
from web.auth import ACCOUNT_RIGHTS, hash_password, hash_token, name_problem, new_token

from . import conformance, engine
from .admin import PageOperations, sent_summary
from .audit import Audit, open_audit
from .config import Config, ConfigError, files_store, load_config
from .logs import setup_logging
from .peers import doctor
from .retention import PassRunning, run_pass
from .retrieve import send_to
from .server import ListenError, Server
from .workers import serve_workers

DEFAULT_CONFIG = "config.yaml"

QUEUE_ACTIONS = ("show", "list", "retry", "drop")
"""What ``minipacs queue`` does."""

OVERRIDES: dict[str, tuple[str, str]] = {
    "port": ("ae.port", "--port"),
    "ae_title": ("ae.title", "--ae-title"),
    "bind": ("ae.bind", "--bind"),
    "data_dir": ("storage.data_dir", "--data-dir"),
    "http_port": ("web.port", "--http-port"),
}
"""The flags that override a key of the configuration: argument name -> (key, flag)."""


def version() -> str:
    """The installed distribution's version (``unknown`` when minipacs is not installed)."""
    try:
        return importlib.metadata.version("minipacs")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minipacs", description="A small, fast PACS.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the DICOM server")
    serve.add_argument(
        "--config",
        type=Path,
        help=f"configuration file (default: ./{DEFAULT_CONFIG} if present, else built-ins)",
    )
    serve.add_argument("--port", type=int, help="override ae.port")
    serve.add_argument("--ae-title", help="override ae.title")
    serve.add_argument("--bind", help="override ae.bind")
    serve.add_argument("--data-dir", help="override storage.data_dir")
    serve.add_argument("--http-port", type=int, help="override web.port (DICOMweb, viewer)")
    verify = commands.add_parser(
        "verify", help="check every index row against its file, stray files and counters")
    verify.add_argument("--repair", action="store_true",
                        help="fix what is found (run with the server stopped)")
    reindexer = commands.add_parser(
        "reindex", help="rebuild the whole index from the file store (servers stopped)")
    reindexer.add_argument(
        "--missing", action="store_true",
        help="only index the files no row names, keeping the index (servers may run)")
    migrator = commands.add_parser(
        "migrate-files", help="move every file from storage.files_previous_url to"
        " storage.files_url, checking each (the servers may run)")
    migrator.add_argument("--to", required=True, metavar="URL",
                          help="the store the files move to: storage.files_url, repeated")
    importer = commands.add_parser(
        "import", help="store a folder of DICOM files through the C-STORE path")
    importer.add_argument("folder", type=Path)
    deleter = commands.add_parser(
        "delete", help="delete patients, studies, series or instances (the server may run)")
    _selectors(deleter)
    deleter.add_argument("--dry-run", action="store_true", help="list what would go; change"
                         " nothing")
    deleter.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sender = commands.add_parser(
        "send", help="send patients, studies, series or instances to a peer by C-STORE")
    sender.add_argument("peer", help="the AE title of a peer with a host, from peers")
    _selectors(sender)
    sender.add_argument("--dry-run", action="store_true", help="say what would be sent")
    exporter = commands.add_parser(
        "export", help="write patients, studies, series or instances into a folder as a DICOM"
        " File-set (Part 10 files and a DICOMDIR), as stored or de-identified")
    exporter.add_argument("directory", type=Path, help="a new or empty folder")
    _selectors(exporter)
    exporter.add_argument("--deidentify", metavar="PROFILE", default="",
                          help="de-identify every instance by this profiles entry (PS3.15"
                          " Annex E); instances with burned-in annotation are withheld")
    queue = commands.add_parser(
        "queue", help="routing's outbox: what waits or failed, per peer; retry or drop"
        " items (the server may run)")
    queue.add_argument("action", nargs="?", choices=QUEUE_ACTIONS, default="show",
                       help="show (per peer; the default), list (the items), retry (due"
                       " now, attempts from zero), drop (never sent)")
    queue.add_argument("--peer", help="only this peer's items")
    queue.add_argument("--id", type=int, action="append", default=[], metavar="N",
                       help="retry or drop this item (from list); repeatable")
    queue.add_argument("--all", action="store_true", help="list, retry or drop waiting items"
                       " too, not only failed ones")
    queue.add_argument("--yes", action="store_true", help="drop without asking")
    queue.add_argument("--commitments", action="store_true", help="the Storage Commitment"
                       " reports still to send, instead of routing's items")
    doctor = commands.add_parser(
        "doctor", help="diagnose a peer: connection, association, C-ECHO timing, the"
        " presentation contexts it accepts, a C-FIND; what to change, in plain words")
    doctor.add_argument("peer", help="the AE title of a peer with a host, from peers")
    statement = commands.add_parser(
        "conformance-statement", help="print the DICOM Conformance Statement (PS3.2) of"
        " this code and configuration, as Markdown or HTML")
    statement.add_argument("--format", choices=("markdown", "html"), default="markdown")
    statement.add_argument("--output", type=Path, help="write it to this file instead")
    keeper = commands.add_parser(
        "retention", help="apply the retention rules now: list the studies they choose,"
        " then delete them (the server may run)")
    keeper.add_argument("--dry-run", action="store_true", help="list only")
    keeper.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    commands.add_parser(
        "hash-password", help="print the hash of a password for web.users (asked for at a"
        " prompt, or read from standard input's first line when that is not a terminal)")
    token = commands.add_parser(
        "new-token", help="print a new bearer token and its web.tokens entry")
    token.add_argument("name", help="whom the token is for (logged when it is refused)")
    token.add_argument("rights", choices=ACCOUNT_RIGHTS)
    for sub in (verify, reindexer, migrator, importer, deleter, sender, exporter, queue,
                keeper, doctor, statement):
        sub.add_argument("--config", type=Path, help=f"configuration file (default: ./"
                         f"{DEFAULT_CONFIG} if present, else built-ins)")
        sub.add_argument("--data-dir", help="override storage.data_dir")
    return parser


def _selectors(parser: argparse.ArgumentParser) -> None:
    """The options that select instances (``delete``, ``send``, ``export``)."""
    for flag, what in (("--patient", "every study of this PatientID (any issuer)"),
                       ("--study", "this StudyInstanceUID"), ("--series", "this SeriesInstanceUID"),
                       ("--instance", "this SOPInstanceUID")):
        parser.add_argument(flag, action="append", default=[], metavar="ID",
                            help=f"{what}; repeatable")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="every study a QIDO-RS study search with these parameters"
                        " matches (StudyDate=20200101-20201231, ModalitiesInStudy=CT,"
                        " PatientName=DOE*); repeatable, all must match")


def _selection(args: argparse.Namespace) -> Selection | None:
    """What the selector options name; ``None`` (and a message) when there is none."""
    bad = [pair for pair in args.where if "=" not in pair or pair.startswith("=")]
    if bad:
        print(f"minipacs: --where takes KEY=VALUE, not {bad[0]!r}", file=sys.stderr)
        return None
    selection = Selection(tuple(args.patient), tuple(args.study), tuple(args.series),
                          tuple(args.instance),
                          query=tuple(tuple(pair.split("=", 1)) for pair in args.where))
    if not selection:
        print(f"minipacs: {args.command} needs --patient, --study, --series, --instance or"
              " --where", file=sys.stderr)
        return None
    return selection


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = Path(DEFAULT_CONFIG)
    overrides: dict[str, Any] = {}
    flags: dict[str, str] = {}
    for name, (key, flag) in OVERRIDES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "data_dir":  # relative to where the command runs, not to the file
            value = str(Path(value).resolve())
        overrides[key] = value
        flags[key] = flag
    return load_config(path, overrides, flags)


def serve(config: Config) -> int:
    """Serve until SIGTERM or Ctrl-C, then stop gracefully; return the exit code."""
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        logging.getLogger("minipacs").info("signal %d received: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        engine.install()  # here for the reason, before any listener; each worker again
    except engine.UntestedVersion as exc:
        print(f"minipacs: {exc}", file=sys.stderr)
        return 1
    if config.ae.workers > 1:  # the web listener runs in the supervisor, with its archive
        return serve_workers(config, stop, config.logging.level,
                             beside=lambda: _web_beside_workers(config))
    server = Server(config)
    web: WebServer | None = None
    try:
        server.start()
        if config.web.enabled:
            web = web_server(config, server.archive, server.audit)
            web.start()
    except (ListenError, WebListenError, StorageError) as exc:  # the listeners are closed
        logging.getLogger("minipacs").error("%s", exc)  # again (a bad PS3.15 table: none)
        server.stop(grace=0)
        return 1
    while not stop.wait(0.5):
        pass
    if web is not None:
        web.stop(grace=config.ae.dimse_timeout)
    server.stop(grace=config.ae.dimse_timeout)
    return 0


def web_server(config: Config, archive: Archive, audit: Audit) -> WebServer:
    """The HTTP listener of ``config`` (``web``) serving ``archive``, each request a line
    of ``audit``."""
    return WebServer(config.web, archive, config.tls.certificate, config.tls.private_key,
                     audit=audit.record, operations=PageOperations(config, archive))


@contextlib.contextmanager
def _web_beside_workers(config: Config) -> Iterator[None]:
    if not config.web.enabled:
        yield
        return
    archive = open_archive(dataclasses.replace(config.archive_options(), shared=True))
    audit = open_audit(config)
    web = web_server(config, archive, audit)
    try:
        web.start()
        yield
        web.stop(grace=config.ae.dimse_timeout)
    finally:
        archive.close()
        audit.close()


class _ProgressBar:
    """``done/total`` on one line of standard error, redrawn at most 10 times a second."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._last = 0.0
        self._shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 30
        filled = width * done // total if total else width
        bar = "#" * filled + "." * (width - filled)
        print(f"\r{self.what} [{bar}] {done}/{total}", end="", file=sys.stderr, flush=True)
        self._shown = True

    def close(self) -> None:
        if self._shown:
            print(file=sys.stderr)


def _maintain(config: Config, what: str, work: Callable[[Archive, _ProgressBar], Any]) -> Any:
    """Open the archive, run ``work`` with a progress bar, close it again."""
    archive = open_archive(config.archive_options())
    bar = _ProgressBar(what)
    try:
        return work(archive, bar)
    finally:
        bar.close()
        archive.close()


def verify(config: Config, repair: bool) -> int:
    """Report (and with ``repair`` fix) what disagrees; 0 when nothing is left to fix."""
    report = _maintain(config, "verify", lambda a, bar: a.verify(repair=repair, progress=bar))
    for problem in report.problems:
        print(problem)
    left = len(report.unrepaired)
    print(f"{report.instances} indexed instances, {report.files} files: "
          f"{len(report.problems)} problem(s), {len(report.problems) - left} repaired, "
          f"{left} left")
    return 1 if left else 0


def reindex(config: Config, missing_only: bool = False) -> int:
    report = _maintain(config, "reindex",
                       lambda a, bar: a.reindex(progress=bar, missing_only=missing_only))
    for name, why in report.rejected:
        print(f"not indexed: {name}: {why}")
    print(f"indexed {report.stored} files; {report.duplicates} superseded (another file of"
          f" the instance is indexed; left for verify --repair); {len(report.rejected)} not"
          " indexed")
    return 1 if report.rejected else 0


def migrate_files(config: Config, to: str) -> int:
    """``minipacs migrate-files --to URL``: 0 when every file was moved, 1 when some were
    not (run it again), 2 when the configuration does not say where from and to."""
    storage = config.storage
    if not storage.files_previous_url:
        print("minipacs: set storage.files_previous_url to the store the files move from,"
              " and storage.files_url to the one they move to; restart the servers with it"
              " (README: Moving the files)", file=sys.stderr)
        return 2
    wanted = files_store(to if is_object_url(to) else str(Path(to).resolve()),
                         storage.data_dir)
    if wanted != files_store(storage.files_url, storage.data_dir):
        print(f"minipacs: --to {to} is not storage.files_url"
              f" ({storage.files_url or config.files_path}): the files move to the store"
              " the servers write to", file=sys.stderr)
        return 2
    # beside running servers: their stores shared
    archive = open_archive(dataclasses.replace(config.archive_options(), shared=True))
    bar = _ProgressBar("migrate-files")
    try:
        report = archive.migrate_files(progress=bar)
    finally:
        bar.close()
        archive.close()
    for key, why in report.failed:
        print(f"not moved: {key}: {why}")
    print(f"moved {report.moved} files ({report.already} already copied by an earlier run);"
          f" {report.left} not moved")
    return 1 if report.left else 0


def import_folder(config: Config, folder: Path) -> int:
    if not folder.is_dir():
        print(f"minipacs: {folder} is not a folder", file=sys.stderr)
        return 2
    report = _maintain(config, "import", lambda a, bar: a.import_folder(folder, progress=bar))
    for name, why in report.rejected:
        print(f"rejected: {name}: {why}")
    print(f"stored {report.stored}, duplicates {report.duplicates}, "
          f"rejected {len(report.rejected)}")
    return 1 if report.rejected else 0


def delete(config: Config, args: argparse.Namespace) -> int:
    """``minipacs delete``: list what the selection holds, ask (unless ``--yes``), delete.
    0 when something was deleted (or, dry, would be), 1 when nothing matched or a file
    is left, 2 for a refused request."""
    selection = _selection(args)
    if selection is None:
        return 2
    # beside a running server: the store shared (delete writes no file), no sweep
    archive = open_archive(dataclasses.replace(config.archive_options(), shared=True))
    try:
        plan = archive.plan_delete(selection)
        for part in plan.studies_selected:
            whole = "whole study" if part.selected == part.held else \
                f"{part.selected} of its {part.held} instances"
            print(f"study {part.study_instance_uid} of {part.patient_id!r} "
                  f"({part.patient_name or 'no name'}, {part.study_date or 'no date'}): "
                  f"{whole}")
        if not plan.instances:
            print("nothing selected is stored")
            return 1
        if args.dry_run:
            print(f"would delete {plan.instances} instance(s) of "
                  f"{len(plan.studies_selected)} study(ies)")
            return 0
        if not args.yes and not _confirmed(f"delete {plan.instances} instance(s)?"):
            print("nothing deleted")
            return 1
        done = archive.delete(selection, only=plan.file_keys)  # nothing stored since
        audit = open_audit(config)
        audit.record("delete", user=_os_user(), via="minipacs delete",
                     selection=_described(selection),
                     study_uids=[part.study_instance_uid for part in plan.studies_selected],
                     patient_ids=sorted({part.patient_id for part in plan.studies_selected
                                         if part.patient_id}),
                     instances=done.instances,
                     series=done.series, studies=done.studies, patients=done.patients,
                     files_left=len(done.files_left) or None)
        audit.close()
    finally:
        archive.close()
    if done.instances != plan.instances:
        print(f"{plan.instances - done.instances} of the instances listed were replaced or"
              " deleted meanwhile: left as they are")
    print(f"deleted {done.instances} instance(s): {done.series} series, {done.studies} "
          f"study(ies), {done.patients} patient(s) left nothing; {done.files_removed} "
          f"file(s) removed")
    for key in done.files_left:
        print(f"file {key} could not be removed: verify --repair or the next delete retries")
    return 1 if done.files_left or not done.instances else 0


def send(config: Config, args: argparse.Namespace) -> int:
    """``minipacs send PEER``: the selected instances to a peer, as a C-MOVE sends them, with
    a progress bar and a summary. 0 when every one was sent, 1 when any failed or nothing
    selected is stored, 2 for a refused request."""
    selection = _selection(args)
    if selection is None:
        return 2
    peer = config.destination(args.peer)
    if peer is None:
        print(f"minipacs: {args.peer!r} is not in peers, or has no host", file=sys.stderr)
        return 2
    where = f"{peer.ae_title} at {peer.host}:{peer.port}"
    archive = open_archive(dataclasses.replace(config.archive_options(), shared=True))
    try:
        items = archive.selected(selection)
        if not items:
            print("nothing selected is stored")
            return 1
        if args.dry_run:
            print(f"would send {len(items)} instance(s) to {where}")
            return 0
        bar = _ProgressBar("send")
        try:
            final = send_to(config, archive, peer, items, bar)
        finally:
            bar.close()
        audit = open_audit(config)
        audit.record("send", user=_os_user(), via="minipacs send", peer=peer.ae_title,
                     address=f"{peer.host}:{peer.port}", selection=_described(selection),
                     status=f"{final.status:04X}", completed=final.completed,
                     failed=final.failed, warning=final.warning,
                     profile=peer.deidentify or None,
                     instances=final.sent_uids if peer.deidentify else None,
                     withheld=sorted(final.withheld) or None)
        audit.close()
    finally:
        archive.close()
    print(sent_summary(final, len(items), peer))
    for uid in final.failed_uids:
        print(f"not sent: {uid}")
    return 1 if final.failed else 0


def export(config: Config, args: argparse.Namespace) -> int:
    """``minipacs export DIR``: the selected instances written into ``DIR`` as a File-set,
    de-identified by ``--deidentify PROFILE`` or as stored; audited with the instances'
    UIDs and the profile. 0 when every one was written, 1 when any was withheld or failed
    or nothing selected is stored, 2 for a refused request."""
    selection = _selection(args)
    if selection is None:
        return 2
    profile = args.deidentify
    if profile and profile not in {p.name for p in config.profiles}:
        known = ", ".join(p.name for p in config.profiles) or "none configured"
        print(f"minipacs: no profile {profile!r} in profiles ({known})", file=sys.stderr)
        return 2
    archive = open_archive(dataclasses.replace(config.archive_options(), shared=True))
    try:
        items = archive.selected(selection)
        if not items:
            print("nothing selected is stored")
            return 1
        bar = _ProgressBar("export")
        try:
            done = archive.export(items, args.directory.resolve(), profile, bar)
        finally:
            bar.close()
        audit = open_audit(config)
        audit.record("export", user=_os_user(), via="minipacs export",
                     directory=str(done.directory), profile=profile or None,
                     selection=_described(selection),
                     instances=[uid for uid, _ in done.written],
                     withheld=[uid for uid, _ in done.withheld] or None,
                     failed=[uid for uid, _ in done.failed] or None)
        audit.close()
    finally:
        archive.close()
    how = f", de-identified by profile {profile}" if profile else ""
    print(f"exported {len(done.written)} of {len(items)} instance(s) to {done.directory}"
          f"{how}: {len(done.withheld)} withheld, {len(done.failed)} failed")
    for uid, why in done.withheld:
        print(f"withheld: {uid}: {why}")
    for uid, why in done.failed:
        print(f"not exported: {uid}: {why}")
    return 1 if done.withheld or done.failed else 0


def queue(config: Config, args: argparse.Namespace) -> int:
    """``minipacs queue [show|list|retry|drop]``: routing's outbox, beside a running server.
    0 when done, 1 when retry or drop found nothing, 2 for a refused request."""
    if args.id and args.action not in ("retry", "drop"):
        print("minipacs: --id is for retry and drop", file=sys.stderr)
        return 2
    kind = COMMITMENT if args.commitments else ROUTE
    archive = open_archive(dataclasses.replace(config.archive_options(), shared=True))
    try:
        outbox = archive.outbox
        if args.action == "show":
            queues = [q for q in archive.routing_queue(kind)
                      if args.peer is None or q.peer == args.peer]
            for q in queues:
                oldest = f", oldest queued {q.oldest:%Y-%m-%d %H:%M:%S} UTC" if q.oldest else ""
                print(f"{q.peer}: {q.waiting} waiting, {q.failed} failed{oldest}")
            if not queues:
                print("no Storage Commitment report is waiting" if args.commitments
                      else "the routing queue is empty")
            return 0
        if args.action == "list":
            for e in outbox.entries(args.peer, None if args.all else True, kind=kind):
                state = "failed" if e.failed else f"due {e.due_at:%Y-%m-%d %H:%M:%S}"
                print(f"{e.id} {e.peer} {e.route} {e.sop_instance_uid} {state} after"
                      f" {e.attempts} attempt(s)" + (f": {e.last_error}" if e.last_error else ""))
            return 0
        if args.action == "drop" and not args.yes and not _confirmed(
                "drop these items from the routing queue, never to be sent?"):
            return 2
        act = outbox.retry if args.action == "retry" else outbox.drop
        count = act(args.peer, args.id, failed_only=not args.all and not args.id, kind=kind)
        audit = open_audit(config)
        audit.record(f"queue-{args.action}", user=_os_user(), via="minipacs queue",
                     peer=args.peer or "", ids=args.id, all=args.all, items=count)
        audit.close()
        print(f"{args.action}: {count} item(s)")
        return 0 if count else 1
    finally:
        archive.close()


def diagnose(config: Config, title: str) -> int:
    """``minipacs doctor PEER``: each step of :func:`scp.peers.doctor` on a line, ``ok`` or
    ``FAIL`` with what to do, then the contexts the peer accepted and rejected. 0 when every
    step passed, 1 when one failed, 2 for an unknown peer."""
    peer = config.destination(title)
    if peer is None:
        print(f"minipacs: {title!r} is not in peers, or has no host", file=sys.stderr)
        return 2
    archive = open_archive(dataclasses.replace(config.archive_options(), shared=True))
    try:
        held = archive.held_syntaxes()
    finally:
        archive.close()
    with contextlib.suppress(engine.UntestedVersion):  # a quick rejection seen as one
        engine.install()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the findings say it
    print(f"doctor: {peer.ae_title} at {peer.host}:{peer.port}, called by {config.ae.title}")
    found = doctor(config, peer, held)
    for finding in found.findings:
        print(f"  {'ok  ' if finding.ok else 'FAIL'} {finding.step}: {finding.said}")
        if finding.advice:
            print(f"       -> {finding.advice}")
    for cls, syntax in found.accepted:
        print(f"  accepted {UID(cls).name} ({cls}) in {UID(syntax).name}")
    for cls, reason in found.rejected:
        print(f"  rejected {UID(cls).name} ({cls}): {reason}")
    print("no problem found" if found.ok else "problems found: see FAIL above")
    return 0 if found.ok else 1


def conformance_statement(config: Config, form: str, output: Path | None) -> int:
    """``minipacs conformance-statement``: :mod:`scp.conformance` written out."""
    blocks = conformance.statement(config, version())
    text = conformance.to_html(blocks) if form == "html" else conformance.to_markdown(blocks)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output}")
    return 0


def retention(config: Config, args: argparse.Namespace) -> int:
    """``minipacs retention``: one pass of the retention rules now, beside the server: the
    studies they choose, then (asked first unless ``--yes``; never with ``--dry-run``)
    deleted. 0 when done, 1 when a deletion failed, nothing was confirmed or another pass
    was running, 2 when no rule is on."""
    if not config.retention.rules():
        print("minipacs: no retention rule is on (retention.max_age_days,"
              " retention.max_disk_percent)", file=sys.stderr)
        return 2

    def listed(chosen: list[Any]) -> bool:  # shown the plan: go ahead?
        for study in chosen:
            print(f"study {study.study_instance_uid} of {study.patient_id!r} ("
                  f"{study.study_date or 'no date'}, received {study.received:%Y-%m-%d},"
                  f" {study.instances} instances, {study.bytes / 2**20:.1f} MB):"
                  f" {study.reason}")
        if args.dry_run:
            print(f"{len(chosen)} study(ies) would be deleted")
            return False
        return bool(args.yes) or _confirmed(f"delete these {len(chosen)} study(ies)?")

    archive = open_archive(dataclasses.replace(config.archive_options(), shared=True))
    audit = open_audit(config)
    try:
        outcomes = run_pass(config, archive, audit, _os_user(), "minipacs retention",
                            confirm=listed)
    except PassRunning as exc:
        print(f"minipacs: {exc}", file=sys.stderr)
        return 1
    finally:
        audit.close()
        archive.close()
    if not outcomes:
        print("the retention rules choose no study")
        return 0
    if args.dry_run:
        return 0
    deleted = [o.deletion for o in outcomes if o.deletion is not None]
    failed = sum(1 for o in outcomes if o.error)
    if not deleted and not failed:
        print("nothing deleted")
        return 1
    print(f"deleted {len(deleted)} study(ies), {sum(d.instances for d in deleted)}"
          f" instance(s); {failed} failed")
    return 1 if failed else 0


def _os_user() -> str:
    """Who ran the command, for the audit trail."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}"


def _described(selection: Selection) -> dict[str, Any]:
    """A selection as the audit trail records it."""
    return {key: list(value) for key, value in (
        ("patient_ids", selection.patient_ids), ("study_uids", selection.study_uids),
        ("series_uids", selection.series_uids), ("instance_uids", selection.instance_uids),
        ("query", ["=".join(pair) for pair in selection.query])) if value}


def _confirmed(question: str) -> bool:
    """Ask on the terminal; without one, the answer is no (use ``--yes``)."""
    if not sys.stdin.isatty():
        print(f"minipacs: {question} (no terminal to ask: pass --yes)", file=sys.stderr)
        return False
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def password_hash() -> int:
    """``minipacs hash-password``: print the hash of a password read from a prompt (twice)
    or, when standard input is not a terminal, from its first line; never from argv."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("minipacs: the two passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        print("minipacs: the password is empty", file=sys.stderr)
        return 2
    print(hash_password(password))
    return 0


def token_entry(name: str, rights: str) -> int:
    """``minipacs new-token NAME RIGHTS``: print a new token, then its ``web.tokens`` entry."""
    if why := name_problem(name):
        print(f"minipacs: {why}", file=sys.stderr)
        return 2
    token = new_token()
    print(token)
    print(json.dumps(f"{name}:{rights}:{hash_token(token)}"))  # a YAML string too
    print("minipacs: the first line is the token, for the client (minipacs keeps only its"
          " hash); the second is its entry for web.tokens", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-password":  # no configuration needed
        return password_hash()
    if args.command == "new-token":
        return token_entry(args.name, args.rights)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"minipacs: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, process_ids=config.ae.workers > 1,
                  json_lines=config.logging.json)
    try:
        if args.command == "verify":
            return verify(config, args.repair)
        if args.command == "reindex":
            return reindex(config, args.missing)
        if args.command == "import":
            return import_folder(config, args.folder)
        if args.command == "migrate-files":
            return migrate_files(config, args.to)
        if args.command == "delete":
            return delete(config, args)
        if args.command == "send":
            return send(config, args)
        if args.command == "export":
            return export(config, args)
        if args.command == "queue":
            return queue(config, args)
        if args.command == "retention":
            return retention(config, args)
        if args.command == "doctor":
            return diagnose(config, args.peer)
        if args.command == "conformance-statement":
            return conformance_statement(config, args.format, args.output)
        return serve(config)
    except StorageError as exc:
        logging.getLogger("minipacs").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
