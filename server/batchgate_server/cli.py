"""`batchgate-server`: run the server, or manage API keys (`batchgate-server keys create --project P`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from batchgate_server.app import BatchgateServer, StartupError
from batchgate_server.config import ConfigError
from batchgate_server.core.auth import create_api_key
from batchgate_server.settings import build_parser, settings_from_args
from batchgate_server.store.errors import StorageError, StorageFull
from batchgate_server.store.urls import StoreUrlError, database_url, open_database


async def _serve(server: BatchgateServer) -> None:
    try:
        await server.start()
    except BaseException:
        # e.g. a ConfigError: release what start() had opened (the SQLite thread would keep
        # the process alive) before the error is reported
        await server.stop(grace=0)
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down: finishing in-flight calls")
    await server.stop()


async def _create_key(settings, project: str) -> None:
    url = database_url(settings.database_url, settings.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = await open_database(url, settings.data_dir)
    try:
        key_id, secret = await create_api_key(database.metadata, project)
    finally:
        await database.close()
    print(f"key_id:  {key_id}\nproject: {project}\napi_key: {secret}\n(the key is shown once; only its hash is stored)")


def run(coro) -> None:
    """asyncio.run on uvloop when it is installed: the executor's request rate is bound by the
    event loop (measured in bench/executor.py), and uvloop's loop is markedly faster."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def main(argv: list[str] | None = None) -> None:
    try:
        _main(sys.argv[1:] if argv is None else argv)
    except StorageError as err:  # e.g. a disk so full that not even an API key fits
        what = "the disk is full" if isinstance(err, StorageFull) else "storage error"
        print(f"batchgate-server: {what}: {err}", file=sys.stderr)
        sys.exit(1)


def _main(argv: list[str]) -> None:
    if argv[:2] == ["keys", "create"]:
        keys = argparse.ArgumentParser(prog="batchgate-server keys create", parents=[build_parser(add_help=False)])
        keys.add_argument("--project", required=True)
        args = keys.parse_args(argv[2:])
        try:
            asyncio.run(_create_key(settings_from_args(args), args.project))
        except StoreUrlError as err:
            print(f"batchgate-server: {err}", file=sys.stderr)
            sys.exit(2)
        return
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run(_serve(BatchgateServer(settings_from_args(args))))
    except ConfigError as err:  # a clear start-up error naming the entry, no traceback
        print(f"batchgate-server: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    except StoreUrlError as err:  # a --database-url / --blob-url this build cannot open
        print(f"batchgate-server: {err}", file=sys.stderr)
        sys.exit(2)
    except StartupError as err:  # the data directory or the address is taken
        print(f"batchgate-server: {err}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
