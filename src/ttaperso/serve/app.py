"""The HTTP API (FastAPI): ``create_app(backend, model, token)``; OpenAPI docs at ``/docs``.

Every endpoint but ``GET /health`` needs ``Authorization: Bearer <token>`` (the server
token, or for one subject's endpoints that subject's token, see :mod:`.auth`). Request
bodies are limited in bytes before they are read; frames in number and pixels before they
are decoded (:mod:`.decode`). Errors answer ``{"error": <class>, "detail": <message>}``
with the message the Python API gives, and change nothing:

==========================================================  ======
InputError, ConfigError, ModelInterfaceError (bad request)   400
missing or wrong token                                       401
UnknownSubjectError, NotEnabledError                         404
StaleStateError (after retries), StateFileError              409
PayloadTooLargeError (body, frames, pixels)                  413
a missing or malformed form field                            422
StoreUnavailableError, a replica that died mid-request       503
==========================================================  ======

The backend is a :class:`~ttaperso.serve.service.SubjectService` (one process) or a
:class:`~ttaperso.serve.ray_backend.RayBackend` (Ray Serve replicas): both take the same
calls and answer the same JSON-safe dicts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

from .._version import __version__
from ..errors import (
    ConfigError,
    InputError,
    ModelInterfaceError,
    StaleStateError,
    StateFileError,
    TTAPersoError,
)
from ..model import FERModel
from ..validation import validate_frames, validate_subject
from .auth import Authorizer
from .decode import Limits, PayloadTooLargeError, frames_from_array, frames_from_images
from .metrics import ServeMetrics
from .service import NotEnabledError, UnknownSubjectError

__all__ = ["Backend", "BackendUnavailableError", "create_app", "status_of"]

log = logging.getLogger("ttaperso.serve")


_FRAMES_DOC = "one or more PNG/JPEG face crops"
_NEUTRAL_DOC = "neutral (resting-face) PNG/JPEG crops"
_ARRAY_DOC = (
    "instead of frames: one .npy array (N, H, W) or (N, H, W, 1|3), uint8 0-255 or float in "
    "[0, 1] (never unpickled)"
)


class BackendUnavailableError(TTAPersoError, ConnectionError):
    """The replica serving the request died or could not be reached (HTTP 503)."""


class Backend(Protocol):
    """What the HTTP API calls (SubjectService in one process, RayBackend on Ray Serve)."""

    def predict(self, subject: str, frames: Tensor) -> dict[str, Any]: ...
    def predict_many(self, frames: dict[str, Tensor]) -> dict[str, dict[str, Any]]: ...
    def calibrate(
        self, subject: str, frames: Tensor, *, neutral_label: str | None, margin: float | None
    ) -> dict[str, Any]: ...
    def reset(self, subject: str) -> dict[str, Any]: ...
    def versions(self, subject: str) -> dict[str, Any]: ...
    def rollback(self, subject: str, version: int) -> dict[str, Any]: ...
    def export(self, subject: str) -> tuple[bytes, int, str]: ...
    def delete(self, subject: str) -> dict[str, Any]: ...
    def audit_trail(self, subject: str) -> dict[str, Any]: ...
    def subjects(self) -> list[str]: ...
    def health(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def status_of(exc: BaseException) -> int:
    """The HTTP status of a ttaperso error (most specific class first)."""
    from ..stores.redis import StoreUnavailableError

    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, (UnknownSubjectError, NotEnabledError)):
        return 404
    if isinstance(exc, (StoreUnavailableError, BackendUnavailableError)):
        return 503
    if isinstance(exc, (StaleStateError, StateFileError)):
        return 409
    if isinstance(exc, (InputError, ConfigError, ModelInterfaceError)):
        return 400
    return 400


class _BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes (Content-Length, then counted)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                await _too_large(self.limit)(scope, receive, send)
                return
        # Read the whole body first (it is at most `limit` bytes), so an oversized one is
        # answered 413 here, before any parsing, instead of failing inside the form parser.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body = message.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                await _too_large(self.limit)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [
            {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]

        async def replayed() -> Message:
            if replay:
                return replay.pop()
            return await receive()

        await self.app(scope, replayed, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(
        {
            "error": "PayloadTooLargeError",
            "detail": f"Request body is larger than this server's limit of {limit} bytes",
        },
        status_code=413,
    )


def create_app(
    backend: Backend,
    model: FERModel,
    token: str,
    *,
    limits: Limits | None = None,
    description: dict[str, Any] | None = None,
    metrics: ServeMetrics | None = None,
    close_backend: bool = True,
) -> FastAPI:
    """The FastAPI application serving ``backend``.

    Args:
        backend: a :class:`SubjectService` or a :class:`RayBackend`.
        model: the served model (its ``prepare`` turns images into input; labels, shape).
        token: the server token (>= 16 characters).
        limits: request limits (defaults: :class:`Limits`).
        description: what ``GET /v1/info`` adds (strategy, store kind, ...).
        metrics: a :class:`ServeMetrics` (default: a new one).
        close_backend: close the backend (save pending states) when the server shuts down.
    """
    limits = limits or Limits()
    auth = Authorizer(token)
    metrics = metrics or ServeMetrics()
    info = {
        "ttaperso": __version__,
        "model": model.model_name,
        "labels": list(model.labels),
        "input_shape": list(model.input_shape),
        "limits": {k: getattr(limits, k) for k in limits.__dataclass_fields__},
        **(description or {}),
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # Graceful shutdown (SIGTERM/SIGINT): save what is pending before the process
        # exits (uvicorn re-raises the signal afterwards, so no code after it would run).
        if close_backend:
            await run_in_threadpool(backend.close)

    app = FastAPI(
        lifespan=lifespan,
        title="ttaperso",
        version=__version__,
        description="Per-subject test-time personalization of a frozen facial-expression "
        "model. Every endpoint but /health needs `Authorization: Bearer <token>`.",
    )
    app.state.backend = backend
    app.state.metrics = metrics
    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes)

    # ----------------------------------------------------------- errors
    def _error(status: int, exc: BaseException) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status)

    @app.exception_handler(TTAPersoError)
    async def _ttaperso_error(request: Request, exc: TTAPersoError) -> JSONResponse:
        from ..stores.redis import StoreUnavailableError

        status = status_of(exc)
        if isinstance(exc, StoreUnavailableError):
            metrics.store_errors.labels("unavailable").inc()
        elif isinstance(exc, StateFileError) and not isinstance(exc, StaleStateError):
            metrics.store_errors.labels("state_file").inc()
        elif isinstance(exc, StaleStateError):
            metrics.store_errors.labels("stale").inc()
        return _error(status, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
            for e in exc.errors()
        ]
        return JSONResponse(
            {"error": "RequestValidationError", "detail": "; ".join(parts)}, status_code=422
        )

    # ---------------------------------------------------- auth + metrics
    @app.middleware("http")
    async def _observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        route = request.scope.get("route")
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.in_flight.dec()
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
        return response

    def _unauthorized() -> JSONResponse:
        return JSONResponse(
            {
                "error": "Unauthorized",
                "detail": "Missing or invalid bearer token (Authorization: Bearer <token>)",
            },
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    class _Denied(Exception):
        pass

    @app.exception_handler(_Denied)
    async def _denied(request: Request, exc: _Denied) -> JSONResponse:
        return _unauthorized()

    def server_token(request: Request) -> None:
        if not auth.is_server(auth.bearer(request.headers.get("authorization"))):
            raise _Denied()

    def subject_scope(request: Request, subject: str) -> str:
        """Authorise the path's subject; validate the id (never used raw as a key)."""
        if not auth.allows(auth.bearer(request.headers.get("authorization")), [subject]):
            raise _Denied()
        return validate_subject(subject)

    # ------------------------------------------------------- decoding
    async def _frames(frames: list[UploadFile] | None, array: UploadFile | None) -> Tensor:
        if frames and array is not None:
            raise InputError("Send either image `frames` or one `array`, not both")
        if array is not None:
            data = await array.read()
            x = await run_in_threadpool(frames_from_array, data, model, limits, "array")
        else:
            files = [
                (f.filename or f"frame{i}", await f.read()) for i, f in enumerate(frames or [])
            ]
            x = await run_in_threadpool(frames_from_images, files, model, limits)
        return validate_frames(x, model, dtype=x.dtype, device=x.device)

    def _observed(answer: dict[str, Any]) -> dict[str, Any]:
        metrics.observe_step(answer)
        return answer

    # ----------------------------------------------------------- routes
    @app.get("/health", tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness (no token)."""
        return {"status": "ok"}

    @app.get("/v1/info", tags=["service"], dependencies=[Depends(server_token)])
    async def get_info() -> dict[str, Any]:
        """The served model, its labels and input, the strategy, the store and the limits."""
        return info

    @app.get("/metrics", tags=["service"], dependencies=[Depends(server_token)])
    async def get_metrics() -> Response:
        """Prometheus metrics."""
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/subjects", tags=["service"], dependencies=[Depends(server_token)])
    async def list_subjects() -> dict[str, Any]:
        """Ids of the subjects with a stored state (server token only)."""
        return {"subjects": await run_in_threadpool(backend.subjects)}

    @app.post("/v1/subjects/{subject:path}/predict", tags=["subjects"])
    async def predict(
        request: Request,
        subject: str,
        frames: Annotated[list[UploadFile] | None, File(description=_FRAMES_DOC)] = None,
        array: Annotated[UploadFile | None, File(description=_ARRAY_DOC)] = None,
    ) -> dict[str, Any]:
        """Predict the frames of one subject and adapt its state.

        Answers per frame `labels` (class indices), `names`, `probs`, `logits` and
        `updated` (the frame adapted the state), plus `class_names`, `version` (the
        stored version this request wrote) and `based_on` (the version it computed from).
        """
        subject = subject_scope(request, subject)
        x = await _frames(frames, array)
        return _observed(await run_in_threadpool(backend.predict, subject, x))

    @app.post(
        "/v1/predict_many",
        tags=["subjects"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "description": "One part per frame, named `frames:<subject>` "
                            "(PNG/JPEG, repeatable) or `array:<subject>` (one .npy).",
                            "additionalProperties": {"type": "string", "format": "binary"},
                        }
                    }
                },
            }
        },
    )
    async def predict_many(request: Request) -> dict[str, Any]:
        """Several subjects in one request (all-or-nothing on input).

        Multipart parts named `frames:<subject>` (repeatable) or `array:<subject>`.
        """
        token = auth.bearer(request.headers.get("authorization"))
        if token is None or not (auth.is_server(token) or token.startswith("s.")):
            raise _Denied()
        form = await request.form(
            max_files=limits.max_frames + limits.max_subjects, max_fields=limits.max_subjects
        )
        images: dict[str, list[tuple[str, bytes]]] = {}
        arrays: dict[str, bytes] = {}
        for key, value in form.multi_items():
            kind, sep, subject = key.partition(":")
            if not sep or kind not in ("frames", "array") or not isinstance(value, StarletteUpload):
                raise InputError(
                    f"Unexpected part {key[:80]!r}; expected files named 'frames:<subject>' or "
                    "'array:<subject>'"
                )
            validate_subject(subject)
            if kind == "array":
                if subject in arrays:
                    raise InputError(f"Subject {subject!r} has more than one `array` part")
                arrays[subject] = await value.read()
            else:
                images.setdefault(subject, []).append(
                    (value.filename or "frame", await value.read())
                )
        subjects = list(dict.fromkeys([*images, *arrays]))
        if not auth.allows(token, subjects):
            raise _Denied()
        if not subjects:
            raise InputError(
                "Expected at least one part named 'frames:<subject>' or 'array:<subject>'"
            )
        if len(subjects) > limits.max_subjects:
            raise PayloadTooLargeError(
                f"Expected at most {limits.max_subjects} subjects per request but got {len(subjects)}"
            )
        both = sorted(set(images) & set(arrays))
        if both:
            raise InputError(f"Subject(s) {both[:5]} sent both `frames` and `array` parts")
        total = sum(len(v) for v in images.values())
        batches: dict[str, Tensor] = {}
        for subject in subjects:
            try:
                if subject in arrays:
                    x = await run_in_threadpool(
                        frames_from_array, arrays[subject], model, limits, f"array:{subject}"
                    )
                else:
                    x = await run_in_threadpool(frames_from_images, images[subject], model, limits)
                batches[subject] = validate_frames(x, model, dtype=x.dtype, device=x.device)
            except InputError as exc:
                raise type(exc)(f"subject {subject!r}: {exc}") from exc
            total += x.shape[0] if subject in arrays else 0
        if total > limits.max_frames:
            raise PayloadTooLargeError(
                f"Expected at most {limits.max_frames} frames per request but got {total}"
            )
        answers = await run_in_threadpool(backend.predict_many, batches)
        for answer in answers.values():
            _observed(answer)
        return {"results": answers}

    @app.post("/v1/subjects/{subject:path}/calibrate", tags=["subjects"])
    async def calibrate(
        request: Request,
        subject: str,
        frames: Annotated[list[UploadFile] | None, File(description=_NEUTRAL_DOC)] = None,
        array: Annotated[UploadFile | None, File(description=_ARRAY_DOC)] = None,
        neutral_label: Annotated[str | None, Form()] = "neutral",
        margin: Annotated[float | None, Form()] = None,
    ) -> dict[str, Any]:
        """Neutral-baseline calibration from a short resting-face recording."""
        subject = subject_scope(request, subject)
        x = await _frames(frames, array)
        return await run_in_threadpool(
            lambda: backend.calibrate(
                subject, x, neutral_label=neutral_label or None, margin=margin
            )
        )

    @app.post("/v1/subjects/{subject:path}/reset", tags=["subjects"])
    async def reset(request: Request, subject: str) -> dict[str, Any]:
        """Forget the subject's adaptation (stored as a new, fresh version)."""
        subject = subject_scope(request, subject)
        return await run_in_threadpool(backend.reset, subject)

    @app.get("/v1/subjects/{subject:path}/versions", tags=["subjects"])
    async def versions(request: Request, subject: str) -> dict[str, Any]:
        """Kept versions (oldest first) and the current version."""
        subject = subject_scope(request, subject)
        return await run_in_threadpool(backend.versions, subject)

    @app.post("/v1/subjects/{subject:path}/rollback", tags=["subjects"])
    async def rollback(
        request: Request, subject: str, version: Annotated[int, Query(ge=1)]
    ) -> dict[str, Any]:
        """Make a kept version current again (written as a new version)."""
        subject = subject_scope(request, subject)
        return await run_in_threadpool(backend.rollback, subject, version)

    @app.get(
        "/v1/subjects/{subject:path}/export",
        tags=["subjects"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}},
    )
    async def export(request: Request, subject: str) -> Response:
        """The subject's current state file (safetensors bytes, as the store keeps them)."""
        subject = subject_scope(request, subject)
        data, version, digest = await run_in_threadpool(backend.export, subject)
        return Response(
            data,
            media_type="application/octet-stream",
            headers={
                "X-Ttaperso-Version": str(version),
                "X-Ttaperso-Digest": digest,
                "Content-Disposition": 'attachment; filename="state.safetensors"',
            },
        )

    @app.delete("/v1/subjects/{subject:path}", tags=["subjects"])
    async def delete(request: Request, subject: str) -> dict[str, Any]:
        """Erase the subject: current state and every kept version (right to erasure)."""
        subject = subject_scope(request, subject)
        return await run_in_threadpool(backend.delete, subject)

    @app.get("/v1/subjects/{subject:path}/audit", tags=["subjects"])
    async def audit(request: Request, subject: str) -> dict[str, Any]:
        """The subject's hash-chained audit records and whether the chain verifies."""
        subject = subject_scope(request, subject)
        return await run_in_threadpool(backend.audit_trail, subject)

    @app.exception_handler(json.JSONDecodeError)
    async def _json_error(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return _error(400, exc)

    return app
