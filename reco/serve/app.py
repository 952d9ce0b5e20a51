"""The ASGI app of `reco serve` (Starlette): search, item images, metrics, health, the page.

Every client error is a 4xx with a JSON body {"error": "..."}; a 5xx means a bug of the server.
With a token, every request but GET /healthz, GET / and GET /static/* (no data there) must carry
`Authorization: Bearer <token>` (compared in constant time), else 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import math
import mimetypes
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..memory import Memory
from .batching import Batcher, Call, QueryError, SearchRequest

STATIC = Path(__file__).parent / "static"
MAX_BODY = 8 << 20  # bytes of a request body (JSON or an uploaded image)
MAX_K = 1000
MAX_EXCLUDE = 10_000
MAX_WHERE = 4096  # characters of a where clause
OPEN_PATHS = ("/healthz", "/", "/favicon.ico")  # and /static/*: no token needed
SEARCH_KEYS = {"embedding", "text", "modality", "k", "where", "exclude"}
# The page's policy (its meta tag's, which cannot say frame-ancestors) sent as a header on the
# page and its static files; every response carries nosniff.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ClientError(HTTPException):
    """A 4xx with a JSON {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)


@dataclass
class EncoderOptions:
    """How text and image queries are encoded: the memory's encoders (manifest) unless given."""

    model: str | None = None
    pretrained: str | None = None
    model_configs: list[str] = field(default_factory=list)
    device: str | None = None
    allow_random_weights: bool = False


class QueryEncoders:
    """The memory's encoder of each query modality, loaded at the first query that needs it (a
    failure is remembered and reported to each such query as a 400)."""

    def __init__(self, memory: Memory, options: EncoderOptions) -> None:
        self.memory = memory
        self.options = options
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _encoder(self, modality: str):
        from ..eval.encoders import add_model_configs, one_line, open_clip_encoder

        if modality in self._loaded:
            enc = self._loaded[modality]
        else:
            o = self.options
            info = self.memory.manifest.modalities[modality].encoder
            try:
                add_model_configs(o.model_configs)
                pretrained = o.pretrained or info.checkpoint
                enc = open_clip_encoder(
                    o.model or info.name.removeprefix("open_clip:"),
                    pretrained,
                    "--pretrained",
                    device=o.device,
                    allow_random_weights=o.allow_random_weights,
                )
                if enc.sha256 and info.sha256 and enc.sha256 != info.sha256:
                    raise ValueError(
                        f"the checkpoint {pretrained} is not the one the memory's {modality} "
                        "embeddings were built with (sha256 differs)"
                    )
            except Exception as e:
                enc = ClientError(
                    400,
                    f"this server cannot encode {modality} queries: the memory's {modality} "
                    f"encoder {info.name!r} did not load ({one_line(e)}); send an embedding",
                )
            self._loaded[modality] = enc
        if isinstance(enc, ClientError):
            raise enc
        return enc

    def encode(self, modality: str, item: str | bytes) -> torch.Tensor:
        """[d] float32: a text, or an image's file bytes, encoded."""
        with self._lock:  # one encode at a time (the encoder's modules are shared)
            enc = self._encoder(modality)
            if modality == "text":
                z = enc.encode_texts([item])
            else:
                z = enc.encode_images([_decode_image(item)])
        return z[0].detach().to("cpu", torch.float32)


def _decode_image(data: bytes):
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Warning) as e:
        raise ClientError(400, f"the uploaded image cannot be decoded ({e})") from None


# -- image roots -----------------------------------------------------------------------------
def image_roots(memory: Memory) -> list[Path]:
    """The folders the memory's images were read from (its sources: image folders' paths,
    caption tables' image roots), resolved; images are served from inside these only."""
    m = memory.manifest
    roots = []
    for source in [*m.history, m.source]:
        if not isinstance(source, dict):
            continue
        kind = source.get("kind")
        path = source.get("path") if kind == "image_folder" else None
        path = source.get("image_root") if kind == "captions" else path
        if isinstance(path, str) and path:
            roots.append(Path(os.path.realpath(path)))
    return list(dict.fromkeys(roots))


def _inside(root: Path, path: str) -> bool:
    return os.path.commonpath([str(root), path]) == str(root)


def image_file(roots: list[Path], source: object) -> str | None:
    """The regular file, inside one of roots after resolving every symlink, that a metadata
    source names; None when there is none. A relative source (a build run elsewhere) is looked
    up as root / its last parts."""
    if not isinstance(source, str) or not source or "\x00" in source or "://" in source:
        return None
    given = Path(source)
    if given.is_absolute():
        candidates = [given]
    else:
        parts = given.parts
        candidates = [r / Path(*parts[i:]) for r in roots for i in range(len(parts))]
    for c in candidates:
        real = os.path.realpath(c)
        if not any(_inside(r, real) for r in roots):
            continue
        try:
            if stat.S_ISREG(os.stat(real).st_mode):
                return real
        except OSError:
            continue
    return None


# -- metrics and the gate --------------------------------------------------------------------
class Metrics:
    """The app's own prometheus registry (several apps in one process do not collide)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "reco_serve_requests",
            "HTTP requests, by route and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "reco_serve_errors", "responses >= 400, by status code", ["status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "reco_serve_request_seconds",
            "request latency in seconds, by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch = Histogram(
            "reco_serve_batch_size",
            "queries per Index.search call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.queries = Counter(
            "reco_serve_queries", "queries searched (the sum of batch sizes)",
            registry=self.registry,
        )  # fmt: skip

    def on_batch(self, size: int) -> None:
        self.batch.observe(size)
        self.queries.inc(size)


_ROUTES = (
    ("/search", "/search"),
    ("/explain", "/explain"),
    ("/healthz", "/healthz"),
    ("/metrics", "/metrics"),
    ("/static/", "/static"),
)


def _route(path: str) -> str:
    """A bounded label for a path (ids and file names left out)."""
    if path == "/":
        return "/"
    if path.startswith("/items/"):
        return "/items/{id}/image"
    for prefix, label in _ROUTES:
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return label
    return "other"


class Gate:
    """ASGI middleware: the bearer token, the declared body size, and each request's metrics."""

    def __init__(self, app: Callable, metrics: Metrics, token: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.token = None if token is None else token.encode()

    def _authorized(self, scope: dict) -> bool:
        path = scope.get("path", "")
        if self.token is None or path in OPEN_PATHS or path.startswith("/static/"):
            return True
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        return hmac.compare_digest(given, b"Bearer " + self.token)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route, status, start = _route(path), 500, time.perf_counter()
        page = path == "/" or path.startswith("/static/")

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != b"x-content-type-options"]  # fmt: skip
                headers.append((b"x-content-type-options", b"nosniff"))
                if page:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if not self._authorized(scope):
                await _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})(
                    scope, receive, send_status
                )
            elif _declared_length(scope) > MAX_BODY:
                await _error(413, f"the request body exceeds {MAX_BODY} bytes")(
                    scope, receive, send_status
                )
            else:
                await self.app(scope, receive, send_status)
        finally:
            m = self.metrics
            m.requests.labels(route, scope.get("method", ""), str(status)).inc()
            m.latency.labels(route).observe(time.perf_counter() - start)
            if status >= 400:
                m.errors.labels(str(status)).inc()


def _declared_length(scope: dict) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return MAX_BODY + 1
    return 0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The body, read at most limit bytes far (a 413 beyond)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"the request body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -- parsing a query -------------------------------------------------------------------------
def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClientError(400, f"{what} must be an integer, got {json.dumps(value)[:40]}")
    return value


def _jsonable(value: Any) -> Any:
    """Metadata values as JSON has them (dates, bytes, numpy scalars as text or numbers)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class Service:
    """What the app serves: a memory, its batcher, its encoders, an optional explainer."""

    def __init__(
        self,
        memory: Memory,
        *,
        backend: str = "fused",
        device: str | None = None,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        refresh_s: float | None = 5.0,
        encoders: EncoderOptions | None = None,
        explainer: Any = None,
        metrics: Metrics | None = None,
    ) -> None:
        if explainer is not None:
            explainer.check(memory)  # before the indices are built: a start-up error
        self.memory = memory
        self.metrics = metrics or Metrics()
        options: dict[str, Any] = {"backend": backend}
        if device is not None:
            options["device"] = device
        self.batcher = Batcher(
            memory,
            options,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            refresh_s=refresh_s,
            on_batch=self.metrics.on_batch,
        )
        self.encoders = QueryEncoders(memory, encoders or EncoderOptions())
        self.explainer = explainer
        self.roots = image_roots(memory)

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs: Any) -> Service:
        return cls(Memory.open(path), **kwargs)

    def close(self) -> None:
        self.batcher.close()

    async def call(self, fn: Callable[[Memory], Any]) -> Any:
        return await asyncio.wrap_future(self.batcher.submit(Call(fn)))

    def parse_search(self, body: dict[str, Any], image: bytes | None) -> tuple[SearchRequest, Any]:
        """The request (embedding still None for a text or image) and what is to be encoded."""
        unknown = sorted(set(body) - SEARCH_KEYS)
        if unknown:
            raise ClientError(400, f"unknown fields {unknown} (known: {sorted(SEARCH_KEYS)})")
        given = [k for k in ("embedding", "text") if body.get(k) is not None]
        given += ["image"] if image is not None else []
        if len(given) != 1:
            raise ClientError(400, "give exactly one query: embedding, text or an image file")
        kind = given[0]
        query_modality = "text" if kind == "text" else "image"
        modality = body.get("modality", None)
        modality = query_modality if modality is None else modality
        dims = self.batcher.dims
        if not isinstance(modality, str) or modality not in dims:
            raise ClientError(
                400, f"modality must be one of {sorted(dims)}, got {json.dumps(modality)[:40]}"
            )
        rows = self.memory.rows
        k = _int(body.get("k", min(10, rows)), "k")
        if not 1 <= k <= min(rows, MAX_K):
            raise ClientError(400, f"k={k} must be in [1, {min(rows, MAX_K)}]")
        where = body.get("where")
        if where is not None and (not isinstance(where, str) or not where.strip()):
            raise ClientError(400, "where must be a non-empty string (a SQL condition) or null")
        if where is not None and len(where) > MAX_WHERE:
            raise ClientError(400, f"where must be at most {MAX_WHERE} characters")
        exclude = body.get("exclude") or []
        if not isinstance(exclude, list) or len(exclude) > MAX_EXCLUDE:
            raise ClientError(400, f"exclude must be a list of at most {MAX_EXCLUDE} ids")
        exclude = [_int(i, "each exclude id") for i in exclude]
        if any(not 0 <= i < 1 << 63 for i in exclude):
            raise ClientError(400, "exclude ids must be in [0, 2**63)")
        item: Any = None
        embedding = None
        if kind == "embedding":
            embedding = self._embedding(body["embedding"], dims[modality])
        elif kind == "text":
            item = body["text"]
            if not isinstance(item, str) or not item.strip():
                raise ClientError(400, "text must be a non-empty string")
        else:
            item = image
        if kind != "embedding" and query_modality not in dims:
            raise ClientError(400, f"the memory has no {query_modality} encoder")
        req = SearchRequest(embedding, modality, k, where, exclude)
        return req, (query_modality, item) if item is not None else None

    @staticmethod
    def _embedding(value: object, dim: int) -> torch.Tensor:
        if not isinstance(value, list) or len(value) != dim:
            n = len(value) if isinstance(value, list) else type(value).__name__
            raise ClientError(400, f"embedding must be a list of {dim} numbers, got {n}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ClientError(400, "embedding must hold numbers only")
        try:
            t = torch.tensor(value, dtype=torch.float64)
        except (OverflowError, RuntimeError, TypeError) as e:
            raise ClientError(400, f"embedding is not a vector of numbers ({e})") from None
        t = t.to(torch.float32)  # beyond float32's range: inf, refused below
        if not bool(torch.isfinite(t).all()):
            raise ClientError(400, "embedding values must be finite (float32)")
        return t

    async def search(self, req: SearchRequest, encode: Any) -> list[dict[str, Any]]:
        if encode is not None:
            modality, item = encode
            z = await run_in_threadpool(self.encoders.encode, modality, item)
            if z.shape[0] != self.batcher.dims[req.modality]:
                raise ClientError(
                    400,
                    f"the {modality} encoder gives {z.shape[0]}-d queries; the memory's "
                    f"{req.modality} embeddings are {self.batcher.dims[req.modality]}-d",
                )
            req.embedding = z
        try:
            hits = await asyncio.wrap_future(self.batcher.submit(req))
        except QueryError as e:
            raise ClientError(400, str(e)) from None
        except RuntimeError as e:
            if "shutting down" in str(e):
                raise ClientError(503, str(e)) from None
            raise
        return [
            {"row": h.row, "id": h.id, "score": h.score, "metadata": _jsonable(h.metadata)}
            for h in hits
        ]


# -- handlers --------------------------------------------------------------------------------
async def _search_body(request: Request) -> tuple[dict[str, Any], bytes | None]:
    """The JSON object of a JSON request, or the fields and image file of a multipart form."""
    body = await read_body(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _form(request, body)
    if ctype not in ("application/json", ""):
        raise ClientError(415, "send application/json or multipart/form-data")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ClientError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ClientError(400, "the body must be a JSON object")
    return data, None


async def _form(request: Request, body: bytes) -> tuple[dict[str, Any], bytes | None]:
    from starlette.datastructures import UploadFile

    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except Exception as e:
        raise ClientError(400, f"the multipart form cannot be parsed ({e})") from None
    data: dict[str, Any] = {}
    image = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "image":
                raise ClientError(400, f"the form's file field must be named 'image', got {key!r}")
            image = await value.read()
        elif key in ("k",):
            try:
                data[key] = int(value)
            except ValueError:
                raise ClientError(400, f"k must be an integer, got {value[:40]!r}") from None
        elif key == "exclude":
            try:
                data[key] = json.loads(value) if value.strip() else []
            except ValueError:
                raise ClientError(400, "exclude must be a JSON list of ids") from None
        else:
            data[key] = value
    await form.close()
    if image is not None and not image:
        raise ClientError(400, "the uploaded image is empty")
    return data, image


def create_app(
    service: Service,
    *,
    token: str | None = None,
    static_dir: str | os.PathLike | None = None,
) -> Starlette:
    """The app over a Service; the service's batcher is closed at shutdown (after every request
    in flight has its answer)."""
    static = Path(static_dir) if static_dir is not None else STATIC

    async def search(request: Request) -> Response:
        body, image = await _search_body(request)
        req, encode = service.parse_search(body, image)
        return JSONResponse({"results": await service.search(req, encode)})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "rows": service.memory.rows})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def item_image(request: Request) -> Response:
        text = request.path_params["id"]
        if not re.fullmatch(r"[0-9]{1,18}", text):
            raise ClientError(404, "no such item")
        item = int(text)

        def find(memory: Memory) -> str | None:
            try:
                row = int(memory.rows_of([item])[0])
            except ValueError:
                return None
            if not bool(memory.live[row]):
                return None
            return image_file(service.roots, memory.metadata([row])[0].get("source"))

        path = await service.call(find) if service.roots else None
        if path is None:
            raise ClientError(404, f"no image for item {item}")
        ctype = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=ctype)  # nosniff: the Gate's, on every response

    async def explain(request: Request) -> Response:
        if service.explainer is None:
            raise ClientError(404, "no fusion checkpoint loaded (start with --checkpoint)")
        body, image = await _search_body(request)
        return JSONResponse(await service.explainer.explain(service, body, image))

    async def index_page(request: Request) -> Response:
        page = static / "index.html"
        if not page.is_file():
            raise ClientError(404, "no web page installed")
        return FileResponse(page, media_type="text/html")

    async def client_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error(500, "internal server error")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        try:
            yield
        finally:
            await run_in_threadpool(service.close)  # queued queries first get their answers

    routes = [
        Route("/search", search, methods=["POST"]),
        Route("/explain", explain, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/items/{id}/image", item_image, methods=["GET"]),
        Route("/", index_page, methods=["GET"]),
    ]
    if static.is_dir():  # StaticFiles fails each request (a 500) over a missing folder
        routes.append(Mount("/static", StaticFiles(directory=static), name="static"))
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: client_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.add_middleware(Gate, metrics=service.metrics, token=token)
    return app
