"""Serving the simulator: the aiohttp application, and ``rightfoot-poller simulate``.

:func:`build_app` puts the vendor endpoints (:mod:`rightfoot_simulator.api`) and the control
API (:mod:`rightfoot_simulator.control`) in one application; :func:`run_simulator` serves
it until cancelled. :func:`add_simulate_arguments` and :func:`simulate_main` are the
``simulate`` subcommand, which ``service.cli`` imports only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import structlog
from aiohttp import web

from rightfoot_simulator.api import (
    _CLOSING_KEY,
    _SIM_KEY,
    _balances,
    _export,
    _request_log,
)
from rightfoot_simulator.control import (
    _control_errors,
    _get_batch_records,
    _get_batches,
    _get_faults,
    _get_requests,
    _post_batch,
    _post_faults,
    _post_invalidate_tokens,
    _post_keys,
)
from rightfoot_simulator.data import DEMO_MISSING_BATCH_ID
from rightfoot_simulator.simulator import DEFAULT_API_KEY, Simulator

log = structlog.get_logger("rightfoot_simulator")


async def _wake_sleepers(app: web.Application) -> None:
    app[_CLOSING_KEY].set()


def build_app(sim: Simulator) -> web.Application:
    """The aiohttp application serving ``sim``: the API and the ``/_sim/`` control API."""
    app = web.Application(middlewares=[_request_log, _control_errors])
    app[_SIM_KEY] = sim
    app[_CLOSING_KEY] = asyncio.Event()
    app.on_shutdown.append(_wake_sleepers)
    app.router.add_get("/v1/balances", _balances, name="balances")
    app.router.add_get("/v1/balances/export", _export, name="export")
    app.router.add_get("/_sim/faults", _get_faults)
    app.router.add_post("/_sim/faults", _post_faults)
    app.router.add_get("/_sim/batches", _get_batches)
    app.router.add_post("/_sim/batches", _post_batch)
    app.router.add_get("/_sim/batches/{batch_id}/records", _get_batch_records)
    app.router.add_get("/_sim/requests", _get_requests)
    app.router.add_post("/_sim/keys", _post_keys)
    app.router.add_post("/_sim/invalidate-tokens", _post_invalidate_tokens)
    return app


async def run_simulator(host: str, port: int, sim: Simulator) -> None:
    """Serve ``sim`` on host:port until cancelled, then shut down cleanly."""
    runner = web.AppRunner(
        build_app(sim), handler_cancellation=True, shutdown_timeout=5.0, access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        log.info("simulator listening", addresses=[str(a) for a in runner.addresses])
        await asyncio.Event().wait()
    finally:
        log.info("simulator stopping")
        await runner.cleanup()
        log.info("simulator stopped")


# --------------------------------------------------------------------------- CLI


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rightfoot-poller simulate``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8099, help="port to listen on")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_key",
        metavar="KEY",
        help=f"an accepted API key; repeatable (default: {DEFAULT_API_KEY})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--no-demo", action="store_true", help="start without demo batches")
    parser.add_argument(
        "--demo-spread-s",
        type=float,
        default=120.0,
        help="seconds over which demo records appear (default: 120)",
    )
    parser.add_argument(
        "--fault-5xx-rate", type=float, default=0.0, help="share of requests answered 5xx"
    )
    parser.add_argument(
        "--fault-429-rate", type=float, default=0.0, help="share of requests answered 429"
    )
    parser.add_argument(
        "--retry-after-s", type=float, default=1.0, help="Retry-After sent with 429"
    )
    parser.add_argument(
        "--latency-s", type=float, default=0.0, help="delay added to every API request"
    )


def _simulator_from_args(args: argparse.Namespace) -> Simulator:
    sim = Simulator(api_keys=args.api_key or [DEFAULT_API_KEY], seed=args.seed)
    sim.faults.update(
        {
            "error_5xx_rate": args.fault_5xx_rate,
            "rate_limit_rate": args.fault_429_rate,
            "retry_after_s": args.retry_after_s,
            "latency_s": args.latency_s,
        }
    )
    if not args.no_demo:
        ids = sim.seed_demo(spread_s=args.demo_spread_s)
        log.info(
            "simulator demo batches",
            codes=ids[0],
            large=ids[1],
            late=ids[2],
            metadata=ids[3],
            missing=DEMO_MISSING_BATCH_ID,
        )
    return sim


async def simulate_main(args: argparse.Namespace) -> int:
    """Run the simulator until SIGINT or SIGTERM; what ``rightfoot-poller simulate`` calls."""
    try:
        sim = _simulator_from_args(args)
    except ValueError as exc:
        log.error("simulator invalid option", error=str(exc))
        return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = asyncio.create_task(run_simulator(args.host, args.port, sim))
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({server, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        stopping.cancel()
        server.cancel()
    (outcome,) = await asyncio.gather(server, return_exceptions=True)
    if isinstance(outcome, OSError):
        log.error("simulator could not listen", error=str(outcome))
        return 1
    return 0
