"""The coordinator's HTTP API (FastAPI), served over HTTPS by uvicorn.

Every endpoint but ``/healthz`` needs a signed request (see
:mod:`prifed.deploy.auth`). Signatures are checked before a body is read,
bodies are read with a size limit and checked against their signed SHA-256,
and JSON is validated before any state changes. A rejected request gets a
JSON body ``{"error": code, "detail": sentence}`` and a log line naming the
site, and leaves the coordinator's state as it was.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from prifed.deploy import auth, wire
from prifed.deploy.config import FederationConfig
from prifed.deploy.errors import RequestRejected
from prifed.deploy.pki import token_digest
from prifed.deploy.store import SITE_REVOKED, Store
from prifed.deploy.transport import NetworkTransport, TaskBoard
from prifed.log import get_logger, redact

logger = get_logger(__name__)

OFFSET_HEADER = "Upload-Offset"
ZSTD_MEDIA_TYPE = "application/zstd"
_TOUCH_INTERVAL = 10.0


class Gatekeeper:
    """Authenticates requests: signature, clock skew, replay, revocation."""

    def __init__(self, config: FederationConfig, store: Store) -> None:
        self.federation = config.federation.name
        self.store = store
        self.skew = config.limits.clock_skew_seconds
        self._touched: dict[str, float] = {}
        self._last_purge = 0.0

    def verify(self, method: str, target: str, signed: auth.SignedRequest,
               public_key: bytes | None = None) -> str:
        """Check a parsed signature and record its nonce; return the site name.

        ``public_key`` is given only for a join, whose body carries the key.
        """
        auth.check_timestamp(signed, self.skew)
        if public_key is None:
            info = self.store.site(signed.site)
            if info is None:
                raise RequestRejected(401, "unknown_site",
                                      f"site {signed.site!r} is not known to this "
                                      "federation")
            if info.status == SITE_REVOKED:
                raise RequestRejected(403, "revoked",
                                      f"site {signed.site!r} is revoked; ask the "
                                      "federation operator")
            if info.public_key is None:
                raise RequestRejected(401, "not_joined",
                                      f"site {signed.site!r} has not joined; start "
                                      "the site agent with its join token")
            public_key = info.public_key
        auth.verify_signature(public_key, self.federation, method, target, signed)
        self.store.record_nonce(signed.site, signed.nonce, self.skew)
        self._housekeeping(signed.site)
        return signed.site

    def _housekeeping(self, site: str) -> None:
        now = time.time()
        if now - self._touched.get(site, 0.0) > _TOUCH_INTERVAL:
            self._touched[site] = now
            self.store.touch(site)
        if now - self._last_purge > self.skew:
            self._last_purge = now
            self.store.purge_nonces(now - 2 * self.skew)


def request_target(request: Request) -> str:
    """Return the raw path and query as the client sent them (what it signed)."""
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    target = raw_path.decode("latin-1")
    query = request.scope.get("query_string", b"")
    return f"{target}?{query.decode('latin-1')}" if query else target


async def read_body(request: Request, limit: int, subject: str) -> bytes:
    """Read a request body, refusing more than ``limit`` bytes (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestRejected(413, "too_large",
                              f"{subject} of {declared} bytes is over the limit of "
                              f"{limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRejected(413, "too_large",
                                  f"{subject} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(config: FederationConfig, store: Store, transport: NetworkTransport,
              board: TaskBoard,
              lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]
              ) -> FastAPI:
    """Build the coordinator's ASGI app around its store and transport."""
    app = FastAPI(title="PriFed coordinator", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    gate = Gatekeeper(config, store)
    limits = config.limits
    upload_locks: dict[str, asyncio.Lock] = {}

    async def authenticate(request: Request, body: bytes | None = None) -> \
            tuple[str, auth.SignedRequest]:
        """Check the signature headers before any body is read."""
        signed = auth.parse_signed_headers(request.headers)
        request.state.site = signed.site
        site = await run_in_threadpool(gate.verify, request.method,
                                       request_target(request), signed)
        if body is not None:
            check_digest(body, signed)
        return site, signed

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, error: RequestRejected) -> JSONResponse:
        site = getattr(request.state, "site", None)
        logger.warning("%s %s: site %r: HTTP %d %s: %s", request.method,
                       request.url.path, site, error.status, error.code,
                       redact(error.detail))
        content = dict(error.fields, error=error.code, detail=error.detail)
        return JSONResponse(content, status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(part) for part in first.get("loc", ()))
        detail = f"{where}: {first.get('msg')}"
        logger.warning("%s %s: HTTP 400 invalid_request: %s", request.method,
                       request.url.path, redact(detail))
        return JSONResponse({"error": "invalid_request", "detail": detail},
                            status_code=400)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "federation": config.federation.name}

    @app.post("/v1/join")
    async def join(request: Request) -> dict[str, Any]:
        body = await read_body(request, limits.max_json_bytes, "join request")
        signed = auth.parse_signed_headers(request.headers)
        request.state.site = signed.site
        check_digest(body, signed)
        request_body = wire.parse_body(wire.JoinBody, body, "join request")
        if request_body.site != signed.site:
            raise RequestRejected(400, "invalid_body",
                                  "join request names site "
                                  f"{request_body.site!r} but is signed for "
                                  f"{signed.site!r}")
        public_key = decode_public_key(request_body.public_key)
        await run_in_threadpool(gate.verify, request.method, request_target(request),
                                signed, public_key)
        await run_in_threadpool(store.redeem_token, signed.site,
                                token_digest(request_body.token), public_key)
        logger.info("join: site %s joined with key %s...", signed.site,
                    public_key.hex()[:16])
        info = store.site(signed.site)
        return {"site": signed.site, "federation": config.federation.name,
                "position": info.position if info else None}

    @app.post("/v1/hello")
    async def hello(request: Request) -> dict[str, Any]:
        site, signed = await authenticate(request)
        body = await read_body(request, limits.max_json_bytes, "hello")
        check_digest(body, signed)
        logger.info("hello: site %s is online", site)
        return {"site": site, "federation": config.federation.name,
                "finished": transport.finished}

    @app.get("/v1/tasks/next")
    async def next_task(request: Request, wait: float = 0.0) -> Response:
        site, _ = await authenticate(request, b"")
        timeout = max(0.0, min(wait, config.coordinator.long_poll_seconds))
        task = await board.wait(site, timeout)
        if task is None:
            return Response(status_code=204)
        return Response(wire.dumps(task), media_type="application/json")

    @app.get("/v1/models/{version}")
    async def model(request: Request, version: int) -> Response:
        await authenticate(request, b"")
        payload = await run_in_threadpool(transport.models.payload, version)
        return Response(payload, media_type=ZSTD_MEDIA_TYPE)

    @app.get("/v1/rounds/{number}/extra")
    async def extra(request: Request, number: int) -> Response:
        site, _ = await authenticate(request, b"")
        return Response(transport.extra_payload(site, number),
                        media_type=ZSTD_MEDIA_TYPE)

    @app.post("/v1/rounds/{number}/uploads")
    async def start_upload(request: Request, number: int) -> dict[str, Any]:
        site, signed = await authenticate(request)
        body = await read_body(request, limits.max_json_bytes, "upload request")
        check_digest(body, signed)
        upload = wire.parse_body(wire.UploadBody, body, "upload request")
        return await run_in_threadpool(transport.start_upload, site, number, upload)

    @app.get("/v1/uploads/{upload_id}")
    async def upload_status(request: Request, upload_id: str) -> dict[str, Any]:
        site, _ = await authenticate(request, b"")
        row = await run_in_threadpool(transport.upload_for_chunk, site, upload_id)
        part = transport.part_path(upload_id)
        offset = part.stat().st_size if part.exists() else 0
        return {"upload": upload_id, "offset": offset, "size": row.size}

    @app.put("/v1/uploads/{upload_id}")
    async def put_chunk(request: Request, upload_id: str) -> dict[str, Any]:
        site, signed = await authenticate(request)
        offset = parse_offset(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and \
                int(declared) > limits.max_chunk_bytes:
            raise RequestRejected(413, "too_large",
                                  f"chunk of {declared} bytes is over the limit of "
                                  f"{limits.max_chunk_bytes} bytes")
        row = await run_in_threadpool(transport.upload_for_chunk, site, upload_id)
        lock = upload_locks.setdefault(upload_id, asyncio.Lock())
        async with lock:
            written = await append_chunk(request, transport.part_path(upload_id),
                                         offset, row.size, signed.digest,
                                         limits.max_chunk_bytes)
        if offset + written >= row.size:
            upload_locks.pop(upload_id, None)
        return {"upload": upload_id, "offset": offset + written, "size": row.size}

    @app.post("/v1/uploads/{upload_id}/commit")
    async def commit(request: Request, upload_id: str) -> dict[str, Any]:
        site, signed = await authenticate(request)
        body = await read_body(request, limits.max_json_bytes, "commit")
        check_digest(body, signed)
        return await run_in_threadpool(transport.commit_upload, site, upload_id)

    @app.post("/v1/rounds/{number}/failure")
    async def failure(request: Request, number: int) -> dict[str, Any]:
        site, signed = await authenticate(request)
        body = await read_body(request, limits.max_json_bytes, "failure report")
        check_digest(body, signed)
        report = wire.parse_body(wire.FailureBody, body, "failure report")
        await run_in_threadpool(transport.report_failure, site, number,
                                redact(report.reason))
        logger.warning("fit round %d: site %s reported a failure: %s", number, site,
                       redact(report.reason))
        return {"status": "recorded"}

    @app.post("/v1/rounds/{number}/evaluation")
    async def evaluation(request: Request, number: int) -> dict[str, Any]:
        site, signed = await authenticate(request)
        body = await read_body(request, limits.max_json_bytes, "evaluation")
        check_digest(body, signed)
        metrics = wire.parse_body(wire.EvaluationBody, body, "evaluation")
        await run_in_threadpool(transport.submit_evaluation, site, number, metrics)
        return {"status": "recorded"}

    @app.get("/v1/exchanges/{exchange_id}")
    async def exchange_request(request: Request, exchange_id: str) -> Response:
        site, _ = await authenticate(request, b"")
        return Response(transport.exchange_request(site, exchange_id),
                        media_type=ZSTD_MEDIA_TYPE)

    @app.post("/v1/exchanges/{exchange_id}/reply")
    async def exchange_reply(request: Request, exchange_id: str) -> dict[str, Any]:
        site, signed = await authenticate(request)
        body = await read_body(request, limits.max_exchange_bytes, "exchange reply")
        check_digest(body, signed)
        await run_in_threadpool(transport.submit_exchange_reply, site, exchange_id,
                                body)
        return {"status": "recorded"}

    return app


def check_digest(body: bytes, signed: auth.SignedRequest) -> None:
    """Reject a body whose SHA-256 differs from the signed one (400)."""
    if hashlib.sha256(body).hexdigest() != signed.digest:
        raise RequestRejected(400, "digest_mismatch",
                              f"body of {len(body)} bytes does not match its signed "
                              "SHA-256; it was altered or truncated in transit")


def decode_public_key(text: str) -> bytes:
    """Decode a base64 Ed25519 public key (32 bytes) from a join request."""
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRejected(400, "invalid_body",
                              "public_key must be base64") from None
    if len(key) != 32:
        raise RequestRejected(400, "invalid_body",
                              f"public_key must be 32 bytes (Ed25519); got {len(key)}")
    return key


def parse_offset(request: Request) -> int:
    """Read the ``Upload-Offset`` header (400 when missing or negative)."""
    value = request.headers.get(OFFSET_HEADER, "")
    if not value.isdigit():
        raise RequestRejected(400, "invalid_request",
                              f"header {OFFSET_HEADER} must be a non-negative "
                              f"integer; got {value!r}")
    return int(value)


async def append_chunk(request: Request, part: Path, offset: int, size: int,
                       digest: str, max_chunk: int) -> int:
    """Append a chunk at ``offset`` of an upload's file; return the bytes written.

    The chunk goes straight to the file and is cut off again if it turns out
    too long, truncated or different from its signed SHA-256.
    """
    current = part.stat().st_size if part.exists() else 0
    if offset != current:
        raise RequestRejected(409, "offset_mismatch",
                              f"chunk starts at byte {offset}, but the upload has "
                              f"{current} bytes; continue from {current}",
                              {"offset": current})
    hasher = hashlib.sha256()
    written = 0
    with open(part, "ab") as handle:
        try:
            async for piece in request.stream():
                written += len(piece)
                if written > max_chunk:
                    raise RequestRejected(413, "too_large",
                                          f"chunk is over the limit of {max_chunk} "
                                          "bytes")
                if offset + written > size:
                    raise RequestRejected(413, "too_large",
                                          f"chunk runs past the declared upload size "
                                          f"of {size} bytes")
                hasher.update(piece)
                handle.write(piece)
            if hasher.hexdigest() != digest:
                raise RequestRejected(400, "digest_mismatch",
                                      f"chunk of {written} bytes does not match its "
                                      "signed SHA-256; it was altered or truncated "
                                      "in transit")
        except (RequestRejected, ClientDisconnect):
            handle.truncate(offset)
            raise
    # No fsync per chunk: a chunk lost to a power cut only shortens the upload,
    # which the site then resumes, and the commit checks the whole SHA-256.
    return written
