"""The command line: ``minipacs serve``. The only place that configures logging or exits."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from storage import StorageError

from .config import Config, ConfigError, load_config
from .server import Server

DEFAULT_CONFIG = "config.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minipacs", description="A small, fast PACS.")
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
    return parser


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = Path(DEFAULT_CONFIG)
    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["ae.port"] = args.port
    if args.ae_title is not None:
        overrides["ae.title"] = args.ae_title
    if args.bind is not None:
        overrides["ae.bind"] = args.bind
    if args.data_dir is not None:
        overrides["storage.data_dir"] = str(Path(args.data_dir).resolve())
    return load_config(path, overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level != "DEBUG":  # pynetdicom narrates every message at INFO
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def serve(config: Config) -> int:
    """Serve until SIGTERM or Ctrl-C, then stop gracefully; return the exit code."""
    stop = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        logging.getLogger("minipacs").info("signal %d received: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server = Server(config)
    try:
        server.start()
    except OSError as exc:
        logging.getLogger("minipacs").error(
            "cannot listen on %s:%d: %s", config.ae.bind, config.ae.port, exc.strerror or exc
        )
        server.archive.close()
        return 1
    while not stop.wait(0.5):
        pass
    server.stop(grace=config.ae.dimse_timeout)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"minipacs: {exc}", file=sys.stderr)
        return 2
    _setup_logging(config.logging.level)
    try:
        return serve(config)
    except StorageError as exc:
        logging.getLogger("minipacs").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
