"""The scoring server's HTTP API (FastAPI) over an :class:`~recpeft.apps.adapter_bank.AdapterBank`.

Endpoints (every answer is JSON; every refusal is ``{"detail": "<one line>"}`` with a 4xx/5xx):

    POST   /score            {"rows": [{column: value, ...}, ...]}  (see :mod:`.rows`)
                             → {"scores": [click probability per row],
                                "adapters": [the adapter that scored each row, or null: the base]}
    GET    /health           → {"status": "ok", "adapters": n, "base": dir, "base_fingerprint": sha256,
                                "batches": b, "requests": q, "rows": m}
    GET    /adapters         → {"adapters": [{"name", "folder", "memory_bytes"}, ...]}
    POST   /adapters         {"name": segment, "path": folder[, "ignore_base_mismatch": false]}
                             → 201 {"name", "folder", "memory_bytes"}; 409 when the name is serving,
                               422 with the bank's reason when the folder does not fit the base
    DELETE /adapters/{name}  → {"removed": name, "adapters": n}; 404 when no such adapter serves

``POST /score`` requests are micro-batched (:class:`~.batcher.MicroBatcher`): concurrent requests
are scored together in one :meth:`AdapterBank.score` call, each row by its segment's adapter, and
each request gets its own rows' answers. A scored value is the bank's float32 probability, sent
as the float64 that holds it exactly. The bank is used from one worker thread only (scoring, adding,
removing and counting memory all queue on it), so an adapter added or removed while requests are
in flight takes effect between two batches, and a batch's ``adapters`` say which served it.

Bounds (:class:`~.limits.ServeLimits`): a body over ``max_body_bytes`` or more than ``max_rows``
rows is 413; a malformed body, a missing or unknown column or a value of the wrong kind is 422
naming the row and column; a full queue or an answer later than ``timeout_s`` is 503; an exception
inside scoring is 500 with its message (and, where only some requests of a batch caused it, only
those get it). None of them stops the server.

Example::

    app = create_app(AdapterBank("runs/base"), ServeLimits(max_rows=512))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from recpeft.apps.adapter_bank import AdapterBank, AdapterRefused
from recpeft.apps.base_checkpoint import base_fingerprint
from recpeft.apps.scoring import scoring_schema
from recpeft.utils.validation import check_adapter_name

from .batcher import MicroBatcher, QueueFull
from .limits import ServeLimits
from .rows import RequestError, RowReader, parse_object, shown

LOG = logging.getLogger("recpeft.serve")
#: bytes of a ``POST /adapters`` body at most (a name and a path)
ADMIN_BODY_BYTES = 64 * 1024


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The request's body, refused (413) as soon as it is known to pass ``limit`` bytes: by its
    Content-Length before reading, or while reading a body sent without one."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(413, f"{what}: the body is {int(length)} bytes, at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"{what}: the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (its type where it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class ScoringService:
    """The state behind the endpoints: the bank, the one worker thread that uses it, the batcher
    that feeds it, and the row checks. Started and stopped by the app's lifespan."""

    def __init__(self, bank: AdapterBank, limits: ServeLimits):
        schema = bank.encoder.schema
        if schema.segment is None:
            raise ValueError(f"base {bank.base_dir} has no segment column: the server routes rows by segment")
        self.bank, self.limits = bank, limits
        self.reader = RowReader(scoring_schema(schema), limits.max_rows)
        self.fingerprint = base_fingerprint(bank.base_dir)
        self.executor: ThreadPoolExecutor | None = None
        self.batcher: MicroBatcher | None = None

    async def start(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recpeft-bank")
        self.batcher = MicroBatcher(
            self.score_rows,
            self.executor,
            batch_rows=self.limits.batch_rows,
            wait_s=self.limits.batch_wait_ms / 1000,
            max_pending=self.limits.max_pending,
        )
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def score_rows(self, frame):
        """(worker thread) The probabilities and serving adapters of ``frame``'s rows."""
        scores = self.bank.score(frame, name="POST /score").tolist()
        serving = self.bank.folders
        return scores, [s if s in serving else None for s in frame[self.reader.schema.segment]]

    async def in_worker(self, fn, *args):
        """``fn(*args)`` on the bank's worker thread, between two batches."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def adapter_entries(self, names=None) -> list[dict]:
        """(worker thread) The rows of ``GET /adapters`` of ``names`` (None: every adapter)."""
        memory = self.bank.memory_bytes()
        return [
            {"name": name, "folder": str(self.bank.folders[name]), "memory_bytes": memory[name]}
            for name in (self.bank.names if names is None else names)
        ]

    # ---- endpoints ----------------------------------------------------------------------------

    async def score(self, request: Request) -> dict:
        body = await read_body(request, self.limits.max_body_bytes, "POST /score")
        rows = self.reader.parse(body)
        if not rows:
            return {"scores": [], "adapters": []}
        frame = self.reader.frame(rows)
        try:
            scores, adapters = await asyncio.wait_for(self.batcher.submit(frame), self.limits.timeout_s)
        except QueueFull as exc:
            raise RequestError(503, f"POST /score: the server is busy: {exc}; try again") from None
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
            raise RequestError(503, f"POST /score: no answer within {self.limits.timeout_s} s; try again") from None
        except ValueError as exc:  # the bank refused these rows (it names the column)
            raise RequestError(422, f"POST /score: {one_line(exc)}") from None
        except Exception as exc:
            LOG.error("POST /score: scoring failed", exc_info=exc)
            raise RequestError(500, f"POST /score: scoring failed: {type(exc).__name__}: {one_line(exc)}") from None
        return {"scores": scores, "adapters": adapters}

    async def health(self) -> dict:
        stats = self.batcher.stats
        return {
            "status": "ok",
            "adapters": len(self.bank.folders),
            "base": str(self.bank.base_dir),
            "base_fingerprint": self.fingerprint,
            "batches": stats.batches,
            "requests": stats.requests,
            "rows": stats.rows,
        }

    async def adapters(self) -> dict:
        return {"adapters": await self.in_worker(self.adapter_entries)}

    async def add_adapter(self, request: Request) -> JSONResponse:
        data = parse_object(await read_body(request, ADMIN_BODY_BYTES, "POST /adapters"), "POST /adapters")
        unknown = sorted(set(data) - {"name", "path", "ignore_base_mismatch"})
        if unknown:
            raise RequestError(
                422, f'POST /adapters: unknown field {unknown[0]!r}; the body is {{"name": ..., "path": ...}}'
            )
        name, path, ignore = data.get("name"), data.get("path"), data.get("ignore_base_mismatch", False)
        for field, value in (("name", name), ("path", path)):
            if not isinstance(value, str) or not value.strip():
                raise RequestError(422, f'POST /adapters: "{field}" must be a non-empty string, got {shown(value)}')
        if not isinstance(ignore, bool):
            raise RequestError(
                422, f'POST /adapters: "ignore_base_mismatch" must be true or false, got {shown(ignore)}'
            )
        name = name.strip()
        try:
            check_adapter_name(name)
        except ValueError as exc:
            raise RequestError(422, f"POST /adapters: {one_line(exc)}") from None

        def add():
            if name in self.bank.folders:
                raise RequestError(409, f"POST /adapters: adapter {name!r} is already serving; DELETE it first")
            self.bank.add(name, Path(path), ignore_base_mismatch=ignore)
            return self.adapter_entries([name])[0]

        try:
            entry = await self.in_worker(add)
        except AdapterRefused as exc:
            raise RequestError(422, f"POST /adapters: {one_line(exc)}") from None
        return JSONResponse(entry, status_code=201)

    async def remove_adapter(self, name: str) -> dict:
        def remove():
            try:
                self.bank.remove(name)
            except KeyError:
                raise RequestError(
                    404, f"DELETE /adapters/{name}: no adapter {name!r} is serving; serving: {list(self.bank.names)}"
                ) from None
            return len(self.bank.folders)

        return {"removed": name, "adapters": await self.in_worker(remove)}


def create_app(bank: AdapterBank, limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI app serving ``bank`` within ``limits`` (see the module docstring)."""
    service = ScoringService(bank, limits or ServeLimits())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="recpeft scoring server", lifespan=lifespan)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"{request.method} {request.url.path}: {type(exc).__name__}: {one_line(exc)}"}, status_code=500
        )

    app.add_api_route("/score", service.score, methods=["POST"])
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/adapters", service.adapters, methods=["GET"])
    app.add_api_route("/adapters", service.add_adapter, methods=["POST"], status_code=201)
    app.add_api_route("/adapters/{name}", service.remove_adapter, methods=["DELETE"])
    return app
