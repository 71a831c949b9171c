"""Retention (issue 16, item 4): the rules of ``retention`` applied by the server every
``retention.interval_minutes`` and by ``minipacs retention``.

A pass asks the archive which studies the rules choose
(:meth:`storage.Archive.plan_retention`) and deletes each as ``minipacs delete`` would
(:meth:`storage.Archive.delete_retained`), with a log line and an audit line (``retention``)
for each. One pass at a time per data folder: a pass holds ``<data_dir>/.retention.lock``
(worker processes, and the command beside the server, do not run theirs meanwhile).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage import Archive, Deletion, Doomed

from .audit import Audit
from .config import Config

logger = logging.getLogger(__name__)

LOCK_NAME = ".retention.lock"


class PassRunning(Exception):
    """Another retention pass holds the data folder's lock."""


@dataclass(frozen=True)
class Outcome:
    """One study a pass chose, and what its deletion did (``None``: not confirmed, or it
    failed with ``error``)."""

    study: Doomed
    deletion: Deletion | None
    error: str = ""


@contextlib.contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Hold the data folder's retention lock.

    Raises
    ------
    PassRunning
        Another process or thread holds it.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK_NAME, "a+b") as fp:
        try:
            fcntl.flock(fp, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PassRunning("another retention pass is running") from exc
        try:
            yield
        finally:
            fcntl.flock(fp, fcntl.LOCK_UN)


def run_pass(config: Config, archive: Archive, audit: Audit, user: str, via: str,
             confirm: Callable[[list[Doomed]], bool] = lambda _: True,
             stop: threading.Event | None = None) -> list[Outcome]:
    """One pass of ``config.retention``'s rules: what they choose, deleted unless
    ``confirm`` (shown the list; the command's ``--dry-run`` says no) says no; ``stop`` set
    ends it after the study being deleted; a study protected since it was chosen is kept
    and left out.

    Raises
    ------
    PassRunning
        Another pass is running.
    StorageError
        The plan could not be made (an invalid ``protect`` search, the index unreadable).
    """
    rules = config.retention.rules()
    with exclusive(config.storage.data_dir):
        chosen = archive.plan_retention(rules)
        if not chosen or not confirm(chosen):
            return [Outcome(study, None) for study in chosen]
        outcomes = []
        for number, study in enumerate(chosen):
            if stop is not None and stop.is_set():
                break
            error = ""
            try:
                deletion = archive.delete_retained(study, rules, tidy=number == 0)
            except Exception as exc:  # noqa: BLE001 - logged; the next study goes on
                deletion, error = None, str(exc)
                logger.error("retention: study %s could not be deleted: %s",
                             study.study_instance_uid, exc)
            else:
                if deletion is None:  # protected since it was chosen
                    logger.info("retention: study %s is protected now: kept",
                                study.study_instance_uid)
                    continue
                logger.info("retention: deleted study %s of %r (%d instances): %s",
                            study.study_instance_uid, study.patient_id,
                            deletion.instances, study.reason)
            audit.record("retention", user=user, via=via,
                         study_instance_uid=study.study_instance_uid,
                         patient_id=study.patient_id, reason=study.reason,
                         instances=deletion.instances if deletion else 0,
                         files_left=len(deletion.files_left) if deletion else 0,
                         error=error)
            outcomes.append(Outcome(study, deletion, error))
        return outcomes


class Retention:
    """The server's retention thread: a pass every ``retention.interval_minutes``, the first
    one :data:`FIRST_PASS_SECONDS` after the start (none when no rule is on)."""

    FIRST_PASS_SECONDS = 5.0

    def __init__(self, config: Config, archive: Archive, audit: Audit) -> None:
        self.config = config
        self.archive = archive
        self.audit = audit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.config.retention.rules():
            return
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="minipacs-retention")
        self._thread.start()

    def request_stop(self) -> None:
        """Stop after the study being deleted (see :meth:`join`)."""
        self._stop.set()

    def join(self, deadline: float) -> None:
        """Wait for the thread until ``deadline`` (``time.monotonic()``)."""
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        wait = min(self.FIRST_PASS_SECONDS, self.config.retention.interval_minutes * 60)
        while not self._stop.wait(wait):
            wait = self.config.retention.interval_minutes * 60
            try:
                run_pass(self.config, self.archive, self.audit, "retention", "server",
                         stop=self._stop)
            except PassRunning:
                logger.info("retention: another pass is running; this one is skipped")
            except Exception:  # noqa: BLE001 - the next pass tries again
                logger.exception("retention pass failed")
            finally:
                with contextlib.suppress(Exception):
                    self.archive.release()


__all__ = ["LOCK_NAME", "Outcome", "PassRunning", "Retention", "exclusive", "run_pass"]
