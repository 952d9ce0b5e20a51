"""POST /explain: a trained fusion checkpoint's neighbours of a query in the served memory, its
attention weights on them and, for a classifier, its prediction (reco.eval.explain computes
them; this module parses the request and searches the served memory on the batch worker)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..eval.explain import (
    check_explainable,
    explain_query,
    query_modalities,
    retriever_of,
    search_modalities,
)
from ..memory import Memory
from ..models import Retriever
from .batching import QueryError

EXPLAIN_KEYS = {"embedding", "text", "modality", "k"}


class Explainer:
    """An experiment's trained model (load_trained) explaining queries against the served memory:
    the served memory's rows are searched (its live rows, the version the indices hold) and
    the model attends over their values as it does over the memory it was trained with."""

    def __init__(self, cfg: Any, built: Any, checkpoint: str | os.PathLike) -> None:
        check_explainable(cfg)
        self.cfg, self.built, self.checkpoint = cfg, built, str(checkpoint)
        self.modalities = query_modalities(cfg)
        self.label_names = built.train_memory.manifest.label_names
        self._retrievers: dict[tuple[str, int], Retriever] = {}

    @classmethod
    def load(cls, config: str | os.PathLike, checkpoint: str | os.PathLike | None) -> Explainer:
        from ..eval.trained import load_trained

        cfg, built, ckpt = load_trained(config, checkpoint)
        return cls(cfg, built, ckpt)

    def query_dim(self, modality: str) -> int:
        return self.built.train_memory.keys(modality).dim

    def check(self, memory: Memory) -> None:
        """A ValueError (at start-up) unless the served memory has the modalities the model
        searches and fuses, with the dims of the memory it was trained with."""
        trained = self.built.memory
        for q in self.modalities:
            searched, fused = search_modalities(self.cfg, q)
            for m, kind in ((searched, "keys"), (fused, "values")):
                if m not in memory.modalities:
                    raise ValueError(
                        f"the served memory has no {m} embeddings; the checkpoint's {q} queries "
                        f"search/fuse them (modalities served: {sorted(memory.modalities)})"
                    )
                want = getattr(trained, kind)(m).dim
                have = getattr(memory, kind)(m).dim
                if have != want:
                    raise ValueError(
                        f"the served memory's {m} embeddings are {have}-d; the checkpoint was "
                        f"trained with a memory of {want}-d {m} embeddings: serve a memory built "
                        "with the same encoders"
                    )
            if self.query_dim(q) != memory.keys(searched).dim:
                raise ValueError(
                    f"the checkpoint's {q} queries are {self.query_dim(q)}-d; the served "
                    f"memory's {searched} keys are {memory.keys(searched).dim}-d"
                )

    def parse(self, body: dict[str, Any], image: bytes | None, rows: int, max_k: int):
        """(query modality, embedding [d] or None, (modality, item) to encode or None, k)."""
        from .app import ClientError, Service, _int

        unknown = sorted(set(body) - EXPLAIN_KEYS)
        if unknown:
            raise ClientError(400, f"unknown fields {unknown} (known: {sorted(EXPLAIN_KEYS)})")
        given = [k for k in ("embedding", "text") if body.get(k) is not None]
        given += ["image"] if image is not None else []
        if len(given) != 1:
            raise ClientError(400, "give exactly one query: embedding, text or an image file")
        kind = given[0]
        modality = body.get("modality")
        if modality is None:
            modality = "text" if kind == "text" else ("image" if kind == "image" else None)
            modality = modality or self.modalities[0]
        if modality not in self.modalities or (kind != "embedding" and kind != modality):
            raise ClientError(
                400,
                f"this checkpoint explains {'/'.join(self.modalities)} queries, got a "
                f"{json.dumps(modality)[:40] if kind == 'embedding' else kind} query",
            )
        default = retriever_of(self.cfg, self.built, modality).k
        k = _int(body.get("k", min(default, rows)), "k")
        if not 1 <= k <= min(rows, max_k):
            raise ClientError(400, f"k={k} must be in [1, {min(rows, max_k)}]")
        if kind == "embedding":
            z = Service._embedding(body["embedding"], self.query_dim(modality))
            return modality, z, None, k
        item = body["text"] if kind == "text" else image
        if kind == "text" and (not isinstance(item, str) or not item.strip()):
            raise ClientError(400, "text must be a non-empty string")
        return modality, None, (modality, item), k

    def _retriever(self, memory: Memory, modality: str, k: int) -> Retriever:
        """A retriever over the served memory's version now (its keys and values as the model's
        own retriever reads them; its near_duplicate)."""
        searched, fused = search_modalities(self.cfg, modality)
        key = (modality, memory.manifest.commit)
        if key not in self._retrievers:
            own = retriever_of(self.cfg, self.built, modality)
            commit = memory.manifest.commit  # the retrievers of older versions are dropped
            self._retrievers = {k: r for k, r in self._retrievers.items() if k[1] == commit}
            self._retrievers[key] = Retriever(
                memory.keys(searched),
                memory.values(fused),
                own.k if own.k <= memory.rows else 1,
                near_duplicate=own.near_duplicate,
            )
        r = self._retrievers[key]
        r.k = k
        return r

    def run(self, memory: Memory, index: Any, modality: str, z: torch.Tensor, k: int) -> dict:
        """On the batch worker: the search of the served index, then the model (JSON-ready)."""
        from .app import _jsonable

        allow = index.allowed()
        have = index.rows if allow is None else int(allow.sum())
        if k > have:
            raise QueryError(f"k={k} exceeds the memory's {have} live rows")
        hit = index.search(z[None], k, allow=allow)
        retrieved = self._retriever(memory, modality, k).lookup(hit.indices, hit.scores)
        ex = explain_query(self.cfg, self.built, z[None], modality, retrieved)
        rows = hit.indices[0].tolist()
        weights = ex.weights[0]  # [H, k]
        heads = weights.shape[0]
        results = []
        for j, (row, i, s, m) in enumerate(
            zip(rows, hit.ids[0].tolist(), hit.scores[0].tolist(), memory.metadata(rows))
        ):
            hitj: dict[str, Any] = {"row": row, "id": int(i), "score": float(s)}
            hitj["metadata"] = _jsonable(m)
            hitj["weight"] = float(weights[:, j].mean())
            if heads > 1:
                hitj["weights"] = weights[:, j].tolist()
            results.append(hitj)
        out: dict[str, Any] = {
            "modality": modality,
            "k": k,
            "heads": heads,
            "results": results,
            "prediction": None,
        }
        if ex.logits is not None:
            p = torch.softmax(ex.logits[0].float(), 0)
            c = int(p.argmax())
            names = self.label_names
            label = names[c] if names and c < len(names) else None
            out["prediction"] = {"class": c, "label": label, "probability": float(p[c])}
        return out

    async def explain(self, service: Any, body: dict[str, Any], image: bytes | None) -> dict:
        from .app import MAX_K, ClientError

        modality, z, encode, k = self.parse(body, image, service.memory.rows, MAX_K)
        if encode is not None:
            from starlette.concurrency import run_in_threadpool

            z = await run_in_threadpool(service.encoders.encode, *encode)
            if z.shape[0] != self.query_dim(modality):
                raise ClientError(
                    400,
                    f"the {modality} encoder gives {z.shape[0]}-d queries; the checkpoint's are "
                    f"{self.query_dim(modality)}-d",
                )
        searched, _ = search_modalities(self.cfg, modality)
        batcher = service.batcher

        def fn(memory: Memory) -> dict:
            return self.run(memory, batcher.indices[searched], modality, z, k)

        try:
            return await service.call(fn)
        except QueryError as e:
            raise ClientError(400, str(e)) from None
