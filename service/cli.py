"""The command line: run, track, export, simulate, check-config."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import yaml
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from service import __version__
from service.config import Settings, load_settings
from service.errors import ConfigError, PollerError
from service.logs import configure_logging

if TYPE_CHECKING:
    from service.requests import TrackingRequest


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
    settings.require_api_key()
    configure_logging(
        level=settings.logging.level,
        fmt=settings.logging.format,
        instance_id=settings.instance_id,
        secrets=settings.secrets(),
    )
    tune_gc()
    return asyncio.run(run_service(settings))


def _cmd_check_config(args: argparse.Namespace) -> int:
    """Checks what ``run`` checks before it starts: the API key too."""
    settings = _settings(args)
    settings.require_api_key()
    sys.stdout.write(yaml.safe_dump(settings.masked(), sort_keys=False))
    return 0


# Exit code of a command line that cannot be used as given (as argparse's own errors).
EXIT_USAGE = 2
# At most this much of a bad argument is repeated in an error.
SHOWN_CHARS = 64

BATCH_ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ : -"


def _shown(value: str) -> str:
    cut = value[:SHOWN_CHARS]
    return repr(cut) + ("..." if len(value) > SHOWN_CHARS else "")


def _count_rule(field: Any) -> str:
    """``an integer from 1 to 100000000``, from the bounds the request model declares."""
    low = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in field.metadata if hasattr(m, "le")), None)
    return f"an integer from {low} to {high}"


def _track_requests(args: argparse.Namespace) -> list[TrackingRequest] | str:
    """The tracking requests of ``track``; or, for a bad argument, one line naming it."""
    from service.requests import TrackingRequest

    reqs: list[TrackingRequest] = []
    for batch_id in args.batch_ids:
        try:
            reqs.append(TrackingRequest(batch_id=batch_id, expected_count=args.expected_count))
        except ValidationError as exc:
            where = exc.errors()[0]["loc"][0]
            if where == "expected_count":
                rule = _count_rule(TrackingRequest.model_fields["expected_count"])
                return f"--expected-count {args.expected_count}: {rule}"
            return f"BATCH_ID {_shown(batch_id)}: {BATCH_ID_RULE}"
    return reqs


def _cmd_track(args: argparse.Namespace) -> int:
    from service.intake import send_requests

    reqs = _track_requests(args)
    if isinstance(reqs, str):
        print(f"rightfoot-poller track: {reqs}", file=sys.stderr)
        return EXIT_USAGE
    settings = _settings(args)
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
