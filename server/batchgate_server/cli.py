"""`batchgate-server`: run the server, or manage API keys (`batchgate-server keys create|list|revoke`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from datetime import datetime, timezone

from batchgate_server.malloc_tuning import keep_large_buffers
from batchgate_server.app import BatchgateServer, StartupError
from batchgate_server.config import ConfigError
from batchgate_server.core.admin import create_checked_key, revoke_key
from batchgate_server.core.errors import ApiError
from batchgate_server.domain.models import ApiKeyRecord
from batchgate_server.observability.logs import configure as configure_logging
from batchgate_server.observability.tracing import configure_from_environment as configure_traces
from batchgate_server.settings import build_parser, settings_from_args
from batchgate_server.store.errors import StorageError, StorageFull
from batchgate_server.store.ports import MetadataStore
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


KEYS_USAGE = "batchgate-server keys {create,list,revoke} ..."


async def _with_store(settings, action):
    """Run `action(store)` on the server's metadata database (the one --database-url names)."""
    url = database_url(settings.database_url, settings.data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = await open_database(url, settings.data_dir)
    try:
        return await action(database.metadata)
    finally:
        await database.close()


def _when(seconds: float | None) -> str:
    return "" if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_json(key: ApiKeyRecord) -> dict:
    return {"key_id": key.id, "project": key.project, "name": key.name, "created_at": _when(key.created_at),
            "expires_at": _when(key.expires_at) or None, "revoked_at": _when(key.revoked_at) or None,
            "last_used_at": _when(key.last_used_at) or None}


def _key_status(key: ApiKeyRecord, now: float) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= now:
        return "expired"
    return "active"


def _print_table(keys: list[ApiKeyRecord]) -> None:
    now = time.time()
    header = ("KEY_ID", "PROJECT", "NAME", "STATUS", "CREATED", "LAST_USED", "EXPIRES")
    rows = [header] + [(k.id, k.project, k.name, _key_status(k, now), _when(k.created_at),
                        _when(k.last_used_at) or "never", _when(k.expires_at) or "never") for k in keys]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


async def _all_keys(store: MetadataStore, project: str | None) -> list[ApiKeyRecord]:
    keys: list[ApiKeyRecord] = []
    after = None
    while page := await store.list_api_keys(project, 500, after):
        keys += page
        after = (page[-1].created_at, page[-1].id)
    return keys


def _expiry(args: argparse.Namespace) -> float | None:
    if args.expires_in is not None:
        return time.time() + args.expires_in * 86400
    if args.expires_at is not None:
        moment = datetime.fromisoformat(args.expires_at.replace("Z", "+00:00"))
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    return None


def _keys(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="batchgate-server keys", description="Manage project API keys.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{create,list,revoke}")
    server_flags = [build_parser(add_help=False)]
    create = commands.add_parser("create", parents=server_flags, help="make a key; prints its secret once")
    create.add_argument("--project", required=True)
    create.add_argument("--name", default="", help="a label for people (at most 128 characters)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", type=float, metavar="DAYS", help="the key stops working after DAYS days")
    expiry.add_argument("--expires-at", metavar="ISO8601", help="the key stops working at this time (UTC if no zone)")
    listing = commands.add_parser("list", parents=server_flags, help="list keys (never their secrets)")
    listing.add_argument("--project", default=None, help="only this project's keys")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    revoke = commands.add_parser("revoke", parents=server_flags, help="refuse a key from its next call on")
    revoke.add_argument("key_id", help="the key's id (key_…), as `keys list` shows it")
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    try:
        if args.command == "create":
            try:
                expires_at = _expiry(args)
            except ValueError as err:
                parser.error(f"--expires-at: {err}")
            key, secret = asyncio.run(_with_store(
                settings, lambda store: create_checked_key(store, args.project, args.name, expires_at)))
            print(f"key_id:  {key.id}\nproject: {key.project}\nname:    {key.name}\n"
                  f"expires: {_when(key.expires_at) or 'never'}\napi_key: {secret}\n"
                  "(the key is shown once; only its hash is stored)")
        elif args.command == "list":
            keys = asyncio.run(_with_store(settings, lambda store: _all_keys(store, args.project)))
            if args.json:
                print(json.dumps([_key_json(k) for k in keys], indent=2))
            else:
                _print_table(keys)
        else:
            key = asyncio.run(_with_store(settings, lambda store: revoke_key(store, args.key_id)))
            print(f"revoked {key.id} (project {key.project}) at {_when(key.revoked_at)}")
    except ApiError as err:  # a bad project name, an unknown key id: what the admin RPC would say
        print(f"batchgate-server keys {args.command}: {err.message} ({err.reason})", file=sys.stderr)
        sys.exit(2)
    except StoreUrlError as err:
        print(f"batchgate-server: {err}", file=sys.stderr)
        sys.exit(2)


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
    if argv[:1] == ["keys"]:
        _keys(argv[1:])
        return
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    keep_large_buffers()  # before the first upload's buffers: see malloc_tuning.py
    configure_traces()  # OTEL_TRACES_EXPORTER / OTEL_EXPORTER_OTLP_ENDPOINT; off unless set
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
