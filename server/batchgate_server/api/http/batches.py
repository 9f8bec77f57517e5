"""/v1/batches over core.batches.BatchManager, and the watch as Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from batchgate_server.api.http.errors import json_bytes, json_response
from batchgate_server.api.http.objects import batch_object, list_object
from batchgate_server.api.http.params import (
    authenticate,
    bool_field,
    invalid,
    json_object,
    query_limit,
    string_field,
    string_map,
    whole_number,
)
from batchgate_server.api.revision_cache import RevisionCache
from batchgate_server.core.auth import Authenticator
from batchgate_server.core.batches import BatchManager, CreateBatch
from batchgate_server.core.errors import echo

DEFAULT_BATCHES_LIMIT, MAX_BATCHES_LIMIT = 20, 100  # OpenAI's for GET /v1/batches
# CreateBatch fields OpenAI has and batchgate does not do: refused rather than silently ignored.
_UNSUPPORTED = ("output_expires_after",)


def _sse_event(record_json: bytes, revision: int) -> bytes:
    return b"id: %d\nevent: batch\ndata: %s\n\n" % (revision, record_json)


class BatchRoutes:
    def __init__(self, auth: Authenticator, batches: BatchManager, heartbeat_interval: float) -> None:
        self.auth = auth
        self.batches = batches
        self.heartbeat_interval = heartbeat_interval
        # Every watcher and poller of a state gets the same bytes: encoded once per revision.
        self._json = RevisionCache(lambda record: json_bytes(batch_object(record)))
        self._event = RevisionCache(lambda record: _sse_event(self._json(record), record.revision))
        self._watches: set[asyncio.Task] = set()

    async def close_watches(self, app: web.Application | None = None) -> None:
        """Ends every open event stream (on shutdown): a watch could otherwise hold the server for
        its whole grace period, and its client resumes elsewhere with Last-Event-ID anyway."""
        for task in list(self._watches):
            task.cancel()

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/batches", self.create)
        router.add_get("/v1/batches", self.list)
        router.add_get("/v1/batches/{batch_id}", self.retrieve)
        router.add_post("/v1/batches/{batch_id}/cancel", self.cancel)
        router.add_get("/v1/batches/{batch_id}/events", self.events)

    def _response(self, record) -> web.Response:
        return web.Response(body=self._json(record), content_type="application/json")

    async def create(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.auth, request)
        doc = await json_object(request)
        for name in _UNSUPPORTED:
            if doc.get(name) is not None:
                raise invalid(f"{name} is not supported by batchgate", "UNSUPPORTED_PARAMETER", name,
                              "not supported")
        extension = doc.get("batchgate")
        if extension is not None and not isinstance(extension, dict):
            raise invalid("batchgate must be an object", "INVALID_FIELD_TYPE", "batchgate", "an object")
        record = await self.batches.create(principal, CreateBatch(
            input_file_id=string_field(doc, "input_file_id"), endpoint=string_field(doc, "endpoint"),
            completion_window=string_field(doc, "completion_window"), metadata=string_map(doc, "metadata"),
            model=string_field(doc, "model"), provider=string_field(extension or {}, "provider"),
            request_id=request.headers.get("Idempotency-Key", ""), model_map=string_map(doc, "model_map"),
            spread=bool_field(doc, "spread"), endpoint_required_unless_mixed=True))
        return self._response(record)

    async def list(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.auth, request)
        limit = query_limit(request, DEFAULT_BATCHES_LIMIT, MAX_BATCHES_LIMIT)
        rows, more = await self.batches.list_after(principal, limit, request.query.get("after", ""),
                                                   weigh=lambda b: len(self._json(b)))
        return json_response(list_object([batch_object(b) for b in rows], more))

    async def retrieve(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.auth, request)
        return self._response(await self.batches.get(principal, request.match_info["batch_id"]))

    async def cancel(self, request: web.Request) -> web.Response:
        principal = await authenticate(self.auth, request)
        return self._response(await self.batches.cancel(principal, request.match_info["batch_id"]))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """What WatchBatch sends, as Server-Sent Events: every state as `event: batch` with the Batch
        object as data and its revision as the event id (so `Last-Event-ID` resumes after it), a
        comment as heartbeat, and the end of the stream after a terminal state."""
        principal = await authenticate(self.auth, request)
        batch_id = request.match_info["batch_id"]
        last_event_id = request.headers.get("Last-Event-ID", "").strip()
        start_revision = whole_number(last_event_id) if last_event_id else 0
        if start_revision is None:
            raise invalid(f"Last-Event-ID must be a batch revision (a whole number), not {echo(last_event_id)}",
                          "INVALID_START_REVISION", "Last-Event-ID", "a revision from an earlier event")
        # NOT_FOUND as a JSON error before the stream starts, which then opens at once (a watch
        # resumed at the current revision has nothing to send until the next change or heartbeat).
        await self.batches.get(principal, batch_id)
        task = asyncio.current_task()
        self._watches.add(task)
        try:
            return await self._stream(request, self.batches.watch(principal, batch_id, start_revision,
                                                                  self.heartbeat_interval))
        finally:
            self._watches.discard(task)

    async def _stream(self, request: web.Request, watch) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        async with contextlib.aclosing(watch):  # raises only before its first state: checked above
            async for event in watch:
                await self._send(response, event)
        await response.write_eof()
        return response

    async def _send(self, response: web.StreamResponse, event) -> None:
        if isinstance(event, int):
            await response.write(b": heartbeat revision=%d\n\n" % event)
        else:
            await response.write(self._event(event))
