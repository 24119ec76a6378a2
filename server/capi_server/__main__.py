"""`capi-server [serve|migrate]` and `python -m capi_server`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from capi_server.config import Settings
from capi_server.logs import configure_logging

log = logging.getLogger("capi_server")

Runner = Callable[[Coroutine[Any, Any, None]], None]


def event_loop_runner(choice: str) -> Runner:
    """What runs the server's coroutine, by CAPI_EVENT_LOOP.

    uvloop (libuv's loop, in C) when installed, unless turned off: on this server's hot
    paths asyncio's own loop, pure Python, was a third of the CPU per call, and uvloop
    answered more calls per second at the same CPU (bench/README, twelfth session).
    """
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            from capi_server.bootstrap import StartupError

            raise StartupError("CAPI_EVENT_LOOP=uvloop but uvloop is not installed") from None
        return asyncio.run
    return uvloop.run


async def _migrate(settings: Settings) -> None:
    from capi_server.adapters.db.database import Database, create_engine, migrate

    db = Database(create_engine(settings.database_url))
    try:
        await migrate(db.engine)
    finally:
        await db.dispose()
    log.info("database migrated to head")


async def _serve(settings: Settings, migrate_first: bool) -> None:
    from capi_server.bootstrap import build_app
    from capi_server.rpc.app import serve

    app = await build_app(settings, run_migrations=migrate_first or settings.migrate_on_start)
    await serve(app)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="capi-server", description=__doc__)
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    parser.add_argument("--migrate", action="store_true", help="migrate to head before serving")
    args = parser.parse_args(argv)
    try:
        settings = Settings()
    except ValueError as exc:
        print(f"capi-server: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    from capi_server.bootstrap import StartupError

    try:
        run = event_loop_runner(settings.event_loop)
        if args.command == "migrate":
            run(_migrate(settings))
        else:
            run(_serve(settings, args.migrate))
    except StartupError as exc:
        log.error("refusing to start: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
