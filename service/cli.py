"""The command line: run, track, export, simulate, check-config."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from aiokafka.errors import KafkaError

from service import __version__
from service.config import Settings, load_settings
from service.errors import ConfigError, PollerError, RequestRejected
from service.logs import configure_logging


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser whose arguments may be added only when it is the one used.

    ``simulate`` takes its options from ``rightfoot_simulator``, which is not part of the
    service and must not be loaded by any other command: they are added when ``simulate``
    is parsed (``rightfoot-poller simulate --help`` included), not when the parser is built.
    """

    def __init__(
        self,
        *args: Any,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)
        return super().parse_known_args(args, namespace)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=os.environ.get("RFP_CONFIG"),
        help="YAML configuration file (default: $RFP_CONFIG; without one, defaults and "
        "RFP_* environment variables)",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from service.app import run_service
    from service.runtime import tune_gc

    settings = _settings(args)
    configure_logging(
        level=settings.logging.level,
        fmt=settings.logging.format,
        instance_id=settings.instance_id,
        secrets=settings.secrets(),
    )
    tune_gc()
    return asyncio.run(run_service(settings))


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    sys.stdout.write(yaml.safe_dump(settings.masked(), sort_keys=False))
    return 0


def _cmd_track(args: argparse.Namespace) -> int:
    from service.intake import send_requests
    from service.requests import TrackingRequest

    settings = _settings(args)
    try:
        reqs = [
            TrackingRequest(batch_id=b, expected_count=args.expected_count) for b in args.batch_ids
        ]
    except ValueError as exc:
        raise RequestRejected(str(exc).splitlines()[0]) from None
    asyncio.run(send_requests(settings, reqs))
    for req in reqs:
        print(f"tracking requested: {req.batch_id}")
    return 0


def _add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    from rightfoot_simulator import add_simulate_arguments

    add_simulate_arguments(p)
    p.add_argument("--log-level", default="INFO")


def _cmd_simulate(args: argparse.Namespace) -> int:
    from rightfoot_simulator import simulate_main

    configure_logging(level=args.log_level, fmt="json")
    return asyncio.run(simulate_main(args))


def _cmd_export(args: argparse.Namespace) -> int:
    from service.export import export_main

    settings = _settings(args)
    configure_logging(level="WARNING", fmt=settings.logging.format, secrets=settings.secrets())
    return asyncio.run(export_main(settings, args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rightfoot-poller",
        description="Poll Rightfoot balance batches and publish every record to Kafka.",
    )
    parser.add_argument("--version", action="version", version=f"rightfoot-poller {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Subcommand)

    p = sub.add_parser("run", help="run the service")
    _add_config(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("track", help="ask the running service(s) to track batches")
    p.add_argument("batch_ids", nargs="+", metavar="BATCH_ID")
    p.add_argument("--expected-count", type=int, default=None, metavar="N")
    _add_config(p)
    p.set_defaults(func=_cmd_track)

    p = sub.add_parser("export", help="stream the CSV export of batches to a file")
    p.add_argument("batch_ids", nargs="+", metavar="BATCH_ID")
    p.add_argument("-o", "--output", required=True, help="file to write, or - for stdout")
    p.add_argument("--progress", choices=["auto", "always", "never"], default="auto")
    _add_config(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "simulate",
        help="run a local Rightfoot API simulator",
        add_arguments=_add_simulate_arguments,
    )
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("check-config", help="print the effective configuration, secrets masked")
    _add_config(p)
    p.set_defaults(func=_cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ConfigError as exc:
        print(f"rightfoot-poller: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except PollerError as exc:
        print(f"rightfoot-poller: {exc}", file=sys.stderr)
        return 1
    except KafkaError as exc:
        print(f"rightfoot-poller: Kafka: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
