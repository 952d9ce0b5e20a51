"""Dynamic batching: one worker thread owns the memory and its indices; concurrent searches are
gathered into one Index.search call (at most max_batch queries, waiting at most max_wait_ms for
more once the first arrives, as Triton's max_queue_delay) and the results scattered back.

Queries share a call only where that changes no answer: the same modality and where clause (one
allow mask), searched with the largest k among them, each query's exclude padded to one [B, E]
with -1 and its results trimmed to its own k. The top-k of one query does not depend on the
others in its batch (the op's selection order is total: score desc, ties to the lower row), and
the first k of a top-k' (k <= k') are the top-k. A query that has fewer selectable rows than the
batch's k is searched in a later call of its own k.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..index import Index
from ..memory import Memory


class QueryError(ValueError):
    """A query the memory cannot answer (k above its selectable rows, unknown ids, a bad where
    clause): the client's error, a 400."""


@dataclass
class SearchRequest:
    """One query: embedding [d] float32, the modality of the memory embeddings searched, k, a
    where clause (or None) and the stable ids to exclude."""

    embedding: Tensor
    modality: str
    k: int
    where: str | None = None
    exclude_ids: list[int] = field(default_factory=list)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class Hit:
    row: int
    id: int
    score: float
    metadata: dict[str, Any]


@dataclass
class Call:
    """A function of the memory run by the worker (so that it sees the version the indices do)."""

    fn: Callable[[Memory], Any]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


_STOP = object()


class Batcher:
    """The worker thread and its queue. submit() is thread-safe and returns a Future of
    list[Hit]; close() stops taking queries, answers every query already queued, and joins.

    on_batch(size) is called (in the worker) with the size of every Index.search call made.
    refresh_s: how often the worker looks for a newer committed version of the memory (between
    batches; the indices, ids and metadata then move to it together). None: never.
    """

    def __init__(
        self,
        memory: Memory,
        index_options: dict[str, Any],
        *,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        refresh_s: float | None = 5.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.memory = memory
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.refresh_s = refresh_s
        self.on_batch = on_batch
        # Every modality's index, built now (start-up errors surface here, not at a query).
        self.indices = {
            m: Index.from_memory(memory, m, m, **index_options) for m in memory.modalities
        }
        self.dims = {m: ix.dim for m, ix in self.indices.items()}
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # submit vs close: nothing queued after the stop marker
        self._last_refresh = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="reco-serve-batcher", daemon=True)
        self._thread.start()

    @property
    def rows(self) -> int:
        return self.memory.rows

    def submit(self, request: SearchRequest | Call) -> concurrent.futures.Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._queue.put(request)
        return request.future

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True  # answer this batch, then stop (nothing follows the marker)
                    break
                batch.append(item)
            self._maybe_refresh()
            self._answer(batch)

    def _maybe_refresh(self) -> None:
        if self.refresh_s is None or time.monotonic() - self._last_refresh < self.refresh_s:
            return
        self._last_refresh = time.monotonic()
        try:
            if self.memory.refresh():
                options = next(iter(self.indices.values()))._options
                self.indices = {
                    m: Index.from_memory(self.memory, m, m, **options)
                    for m in self.memory.modalities
                }
        except Exception:
            import logging

            logging.getLogger(__name__).exception("refreshing the memory failed")

    def _answer(self, batch: list[SearchRequest | Call]) -> None:
        groups: dict[tuple[str, str | None], list[SearchRequest]] = {}
        for r in batch:
            if isinstance(r, Call):
                try:
                    r.future.set_result(r.fn(self.memory))
                except Exception as e:
                    r.future.set_exception(e)
                continue
            groups.setdefault((r.modality, r.where), []).append(r)
        for (modality, where), group in groups.items():
            try:
                self._answer_group(modality, where, group)
            except Exception as e:
                for r in group:
                    if not r.future.done():
                        r.future.set_exception(e)

    def _answer_group(self, modality: str, where: str | None, group: list[SearchRequest]) -> None:
        index = self.indices[modality]
        try:
            allow = index.allowed(where=where)  # live rows and the clause
        except ValueError as e:
            raise QueryError(str(e)) from None
        pending: list[tuple[SearchRequest, Tensor, int]] = []  # (query, excluded rows, selectable)
        for r in group:
            try:
                rows = self.memory.rows_of(r.exclude_ids) if r.exclude_ids else None
            except (ValueError, TypeError) as e:
                r.future.set_exception(QueryError(str(e)))
                continue
            rows = torch.zeros(0, dtype=torch.int64) if rows is None else rows.unique()
            have = index.rows if allow is None else int(allow.sum())
            if rows.numel():
                have -= int(rows.numel() if allow is None else allow[rows].sum())
            if r.k > have:
                r.future.set_exception(
                    QueryError(
                        f"k={r.k} exceeds the {have} rows this query may return (live rows "
                        "satisfying its where clause, less its excluded ids)"
                    )
                )
                continue
            pending.append((r, rows, have))
        while pending:
            k = max(r.k for r, _, _ in pending)
            now = [p for p in pending if p[2] >= k]  # the query of largest k is always here
            pending = [p for p in pending if p[2] < k]
            self._search(index, allow, k, now)

    def _search(
        self,
        index: Index,
        allow: Tensor | None,
        k: int,
        items: list[tuple[SearchRequest, Tensor, int]],
    ) -> None:
        query = torch.stack([r.embedding for r, _, _ in items])
        width = max(rows.numel() for _, rows, _ in items)
        exclude = None
        if width:
            exclude = torch.full((len(items), width), -1, dtype=torch.int64)
            for b, (_, rows, _) in enumerate(items):
                exclude[b, : rows.numel()] = rows
        if self.on_batch is not None:
            self.on_batch(len(items))
        res = index.search(query, k, exclude=exclude, allow=allow)
        rows = res.indices.cpu()
        ids, scores = res.ids.cpu(), res.scores.cpu()
        for b, (r, _, _) in enumerate(items):
            keep = rows[b, : r.k].tolist()
            meta = self.memory.metadata(keep)
            r.future.set_result(
                [
                    Hit(row, int(i), float(s), m)
                    for row, i, s, m in zip(
                        keep, ids[b, : r.k].tolist(), scores[b, : r.k].tolist(), meta
                    )
                ]
            )
