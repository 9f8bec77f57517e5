"""Bare HTTP handlers, the ceiling bench/http.py measures against: GET /batch answers fixed JSON bytes,
POST /upload reads the body to its end in 1 MiB pieces and discards it. Run as
`python _bare_http.py KIND PORT [BODY_FILE]`, each on uvloop, one process. KIND:

  aiohttp         batchgate's stack without batchgate: aiohttp's MultipartReader streaming the file part
  aiohttp-pm      aiohttp's raw body through python-multipart's streaming parser (Starlette's parser)
  starlette       Starlette on uvicorn (httptools): the raw body stream, no multipart parsing at all
  starlette-form  Starlette's request.form(), which spools the file to a temporary file first"""

from __future__ import annotations

import sys

BODY = b'{"id": "batch_0", "object": "batch"}'
CHUNK = 1024 * 1024


def run_aiohttp(port: int, body: bytes, python_multipart: bool) -> None:
    import asyncio

    import uvloop
    from aiohttp import web
    from python_multipart.multipart import MultipartParser, parse_options_header

    async def get(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def upload(request: web.Request) -> web.Response:
        size = 0
        if python_multipart:
            def on_part_data(data: bytes, start: int, end: int) -> None:
                nonlocal size
                size += end - start

            _, options = parse_options_header(request.headers["Content-Type"])
            parser = MultipartParser(options[b"boundary"], {"on_part_data": on_part_data})
            async for chunk in request.content.iter_chunked(CHUNK):
                parser.write(chunk)
            parser.finalize()
        else:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                while chunk := await part.read_chunk(CHUNK):
                    size += len(chunk)
        return web.json_response({"bytes": size})

    app = web.Application()
    app.router.add_get("/batch", get)
    app.router.add_post("/upload", upload)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def run_starlette(port: int, body: bytes, form: bool) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def get(request) -> Response:
        return Response(body, media_type="application/json")

    async def upload(request) -> Response:
        size = 0
        if form:
            async with request.form(max_part_size=512 * CHUNK) as data:
                upload_file = data["file"]
                while chunk := await upload_file.read(CHUNK):
                    size += len(chunk)
        else:
            async for chunk in request.stream():
                size += len(chunk)
        return JSONResponse({"bytes": size})

    app = Starlette(routes=[Route("/batch", get), Route("/upload", upload, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    body = open(sys.argv[3], "rb").read() if len(sys.argv) > 3 else BODY
    if kind.startswith("aiohttp"):
        run_aiohttp(port, body, python_multipart=kind == "aiohttp-pm")
    else:
        run_starlette(port, body, form=kind == "starlette-form")


if __name__ == "__main__":
    main()
