"""`reco serve`: a memory searched over HTTP (Starlette on uvicorn), with dynamic batching.

Modules: batching (the worker that owns the indices and batches queries), app (the ASGI app:
endpoints, errors, token, metrics), explain (a fusion checkpoint's neighbours and weights).
"""

from __future__ import annotations

from .app import EncoderOptions, Metrics, Service, create_app
from .batching import Batcher, SearchRequest

__all__ = ["Batcher", "EncoderOptions", "Metrics", "SearchRequest", "Service", "create_app"]
