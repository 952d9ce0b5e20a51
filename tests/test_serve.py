"""`reco serve`: every endpoint and every kind of bad input through the app, results against
Index.search, batching that batches, the token, /items path traversal, and a real uvicorn
(start-up, the host refusal, SIGTERM with a request in flight, a load test)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, tiny_longtail_config

from reco.index import Index
from reco.memory import EncoderInfo, Memory, MemoryWriter, ModalityInfo

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
pytest.importorskip("duckdb")

from starlette.testclient import TestClient  # noqa: E402

from reco.serve import EncoderOptions, Service, create_app  # noqa: E402

MODS = {
    "image": ModalityInfo(16, "float16", EncoderInfo("enc-a")),
    "text": ModalityInfo(8, "float32", EncoderInfo("enc-b")),
}
TAGS = ["cat", "dog", "car"]


def _write(path: Path, shards: int = 3, rows: int = 40, source: dict | None = None) -> Memory:
    """A memory of random embeddings with captions and tags, some of its rows deleted."""
    rng = np.random.default_rng(1)
    with MemoryWriter(path, MODS, shard_rows=rows, source=source) as w:
        for s in range(shards):
            w.add(
                {
                    "image": rng.standard_normal((rows, 16)).astype(np.float32),
                    "text": rng.standard_normal((rows, 8)).astype(np.float32),
                },
                metadata={
                    "caption": [f"item {s}-{i}" for i in range(rows)],
                    "tag": [TAGS[j] for j in rng.integers(0, 3, rows)],
                },
            )
    with MemoryWriter.open(path) as w:
        w.delete([3, 50, 51, 100])
    return Memory.open(path)


@pytest.fixture
def mem_path(tmp_path) -> Path:
    _write(tmp_path / "mem")
    return tmp_path / "mem"


@pytest.fixture
def client(mem_path):
    service = Service.open(mem_path, max_wait_ms=1)
    with TestClient(create_app(service)) as c:
        yield c


def _expected(mem_path: Path, modality: str, q: list[float], k: int, where=None, exclude=()):
    """(rows, ids, scores) of Index.search for one query."""
    mem = Memory.open(mem_path)
    index = Index.from_memory(mem, modality, modality)
    ex = None
    if exclude:
        ex = mem.rows_of(list(exclude)).reshape(1, -1)
    r = index.search(torch.tensor([q], dtype=torch.float32), k, exclude=ex, where=where)
    return r.indices[0].tolist(), r.ids[0].tolist(), r.scores[0].tolist()


def _got(results: list[dict]) -> tuple[list, list, list]:
    return [h["row"] for h in results], [h["id"] for h in results], [h["score"] for h in results]


def _query(rng: np.random.Generator, d: int) -> list[float]:
    return rng.standard_normal(d).astype(np.float32).tolist()


CASES = [  # modality, k, where, exclude ids
    ("image", 1, None, ()),
    ("image", 10, None, ()),
    ("image", 7, "tag = 'cat'", ()),
    ("image", 5, None, (0, 1, 2, 60, 61)),
    ("text", 12, "tag <> 'dog' AND id > 20", (25, 26)),
    ("text", 116, None, ()),  # every live row
]


def _case_bodies(seed: int, n: int) -> list[dict]:
    """n /search bodies cycling through CASES, each with a random embedding."""
    rng = np.random.default_rng(seed)
    bodies = []
    for i in range(n):
        modality, k, where, exclude = CASES[i % len(CASES)]
        q = _query(rng, MODS[modality].dim)
        bodies.append(
            {"embedding": q, "modality": modality, "k": k, "where": where, "exclude": list(exclude)}
        )
    return bodies


@pytest.mark.parametrize("modality, k, where, exclude", CASES)
def test_search_is_index_search(client, mem_path, modality, k, where, exclude):
    rng = np.random.default_rng(k)
    q = _query(rng, MODS[modality].dim)
    body = {"embedding": q, "modality": modality, "k": k, "where": where, "exclude": list(exclude)}
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert _got(results) == _expected(mem_path, modality, q, k, where, exclude)
    mem = Memory.open(mem_path)
    for h in results:
        assert h["metadata"] == mem.metadata([h["row"]])[0]
        assert h["id"] not in exclude and h["id"] not in (3, 50, 51, 100)
        if where == "tag = 'cat'":
            assert h["metadata"]["tag"] == "cat"


def test_the_default_modality_is_the_querys_and_k_is_10(client, mem_path):
    q = _query(np.random.default_rng(5), 16)
    r = client.post("/search", json={"embedding": q})
    assert r.status_code == 200
    assert _got(r.json()["results"]) == _expected(mem_path, "image", q, 10)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_queries_share_a_batch_and_keep_their_answers(mem_path):
    """Mixed k, where and exclude, sent at once: fewer search calls than queries, each query's
    answer still that of Index.search alone."""
    service = Service.open(mem_path, max_batch=64, max_wait_ms=300)
    app = create_app(service)
    bodies = _case_bodies(7, 24)

    async def run() -> list:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*(c.post("/search", json=b) for b in bodies))
            return [r.status_code for r in rs], [r.json() for r in rs], (await c.get("/metrics"))

    try:
        codes, answers, metrics = asyncio.run(run())
    finally:
        service.close()
    assert codes == [200] * len(bodies)
    for b, a in zip(bodies, answers):
        want = _expected(mem_path, b["modality"], b["embedding"], b["k"], b["where"], b["exclude"])
        assert _got(a["results"]) == want
    calls = _metric(metrics.text, "reco_serve_batch_size_count")
    queries = _metric(metrics.text, "reco_serve_queries_total")
    assert queries == len(bodies) and calls < len(bodies) / 2, (calls, queries)


def test_max_batch_1_turns_batching_off(mem_path):
    service = Service.open(mem_path, max_batch=1, max_wait_ms=50)
    app = create_app(service)
    q = _query(np.random.default_rng(2), 16)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            rs = await asyncio.gather(*(c.post("/search", json={"embedding": q}) for _ in range(6)))
            return [r.status_code for r in rs], (await c.get("/metrics")).text

    try:
        codes, text = asyncio.run(run())
    finally:
        service.close()
    assert codes == [200] * 6
    assert _metric(text, "reco_serve_batch_size_count") == 6


EMB = [0.5] * 16
BAD = [  # body (dict, or raw bytes as JSON), status, a piece of the error
    (b"{", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[" * 100_000, 400, "not valid JSON"),
    ({}, 400, "exactly one query"),
    ({"embedding": EMB, "text": "a"}, 400, "exactly one query"),
    ({"embedding": EMB, "kk": 3}, 400, "unknown fields"),
    ({"embedding": EMB[:5]}, 400, "list of 16 numbers"),
    ({"embedding": [0.5] * 8, "modality": "image"}, 400, "list of 16 numbers"),
    ({"embedding": "abc"}, 400, "list of 16 numbers"),
    ({"embedding": [*EMB[:15], "x"]}, 400, "numbers only"),
    ({"embedding": [*EMB[:15], True]}, 400, "numbers only"),
    ({"embedding": [*EMB[:15], None]}, 400, "numbers only"),
    (b'{"embedding": [' + b"1e39, " * 15 + b"1]}", 400, "finite"),
    (b'{"embedding": [' + b"NaN, " * 15 + b"1]}", 400, "finite"),
    (b'{"embedding": [' + b"Infinity, " * 15 + b"1]}", 400, "finite"),
    ({"embedding": [*EMB[:15], 10**400]}, 400, "embedding"),
    ({"embedding": EMB, "k": 0}, 400, "k=0"),
    ({"embedding": EMB, "k": -3}, 400, "k=-3"),
    ({"embedding": EMB, "k": 121}, 400, "k=121"),
    ({"embedding": EMB, "k": 2.5}, 400, "k must be an integer"),
    ({"embedding": EMB, "k": "3"}, 400, "k must be an integer"),
    ({"embedding": EMB, "k": True}, 400, "k must be an integer"),
    ({"embedding": EMB, "k": 117}, 400, "exceeds the 116 rows"),  # 4 of 120 deleted
    ({"embedding": EMB, "k": 5, "where": "id < 5"}, 400, "exceeds the 4 rows"),
    ({"embedding": EMB, "k": 3, "where": "id < 5", "exclude": [0, 1]}, 400, "exceeds the 2"),
    ({"embedding": EMB, "modality": "audio"}, 400, "modality must be one of"),
    ({"embedding": EMB, "modality": 3}, 400, "modality must be one of"),
    ({"embedding": EMB, "where": "nope("}, 400, "where clause"),
    ({"embedding": EMB, "where": "no_such_column = 1"}, 400, "where clause"),
    ({"embedding": EMB, "where": "1 = 1; DROP TABLE t"}, 400, "where"),
    ({"embedding": EMB, "where": "id < 0"}, 400, "selects no rows"),
    ({"embedding": EMB, "where": ""}, 400, "non-empty string"),
    ({"embedding": EMB, "where": 5}, 400, "non-empty string"),
    ({"embedding": EMB, "where": "id > 0 OR " * 1000 + "1=1"}, 400, "at most 4096"),
    ({"embedding": EMB, "exclude": [999999]}, 400, "ids not in version"),
    ({"embedding": EMB, "exclude": [-1]}, 400, "exclude ids"),
    ({"embedding": EMB, "exclude": ["1"]}, 400, "exclude id must be an integer"),
    ({"embedding": EMB, "exclude": 4}, 400, "exclude must be a list"),
    ({"embedding": EMB, "exclude": [0] * 10_001}, 400, "exclude must be a list"),
    ({"text": ""}, 400, "text must be a non-empty string"),
    ({"text": 5}, 400, "text must be a non-empty string"),
    ({"text": "a bee"}, 400, "cannot encode text queries"),  # enc-b is no open_clip model
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_queries_are_4xx_with_a_json_error(client, body, status, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()


def test_bad_requests_of_other_kinds(client, mem_path):
    q = {"embedding": EMB}
    r = client.post("/search", content=json.dumps(q), headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    big = b'{"embedding": [' + b" " * (9 << 20) + b"]}"
    r = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]

    def chunks():  # no content-length: the limit holds while reading
        yield b'{"embedding": ['
        for _ in range(9):
            yield b" " * (1 << 20)

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["error"]
    assert client.get("/search").status_code == 405
    r = client.get("/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/explain", json=q)
    assert r.status_code == 404 and "--checkpoint" in r.json()["error"]
    # A multipart form without an image, and one with a broken image.
    r = client.post("/search", data={"k": "3"}, files={"other": ("a.png", b"x")})
    assert r.status_code == 400 and "'image'" in r.json()["error"]
    r = client.post("/search", data={"k": "x"}, files={"image": ("a.png", b"not a png")})
    assert r.status_code == 400 and "k must be an integer" in r.json()["error"]
    r = client.post("/search", data={"k": "3"}, files={"image": ("a.png", b"not a png")})
    assert r.status_code == 400, r.text  # cannot encode (enc-a is no open_clip model)
    # Every error was counted by its status, and the server stayed up.
    text = client.get("/metrics").text
    assert _metric(text, 'reco_serve_errors_total{status="413"}') == 2
    assert client.get("/healthz").status_code == 200


def test_healthz_and_metrics(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "rows": 120}
    client.post("/search", json={"embedding": EMB, "k": 2})
    client.post("/search", json={"embedding": EMB, "k": 0})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    ok = 'reco_serve_requests_total{method="POST",route="/search",status="200"}'
    bad = 'reco_serve_requests_total{method="POST",route="/search",status="400"}'
    assert _metric(text, ok) == 1 and _metric(text, bad) == 1
    assert _metric(text, 'reco_serve_request_seconds_count{route="/search"}') == 2
    assert _metric(text, 'reco_serve_errors_total{status="400"}') == 1
    assert _metric(text, "reco_serve_batch_size_count") == 1


def test_token(mem_path):
    service = Service.open(mem_path)
    with TestClient(create_app(service, token="s3cret-token")) as c:
        body = {"embedding": EMB, "k": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            r = c.post("/search", json=body, headers=headers)
            assert r.status_code == 401 and "token" in r.json()["error"], headers
        assert c.get("/metrics").status_code == 401
        assert c.get("/items/0/image").status_code == 401
        r = c.post("/search", json=body, headers={"Authorization": "Bearer s3cret-token"})
        assert r.status_code == 200 and len(r.json()["results"]) == 2
        assert c.get("/healthz").status_code == 200  # open: no data in it
        auth = {"Authorization": "Bearer s3cret-token"}
        assert c.get("/metrics", headers=auth).status_code == 200


def test_the_page_and_static_files(mem_path, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html>reco</html>")
    (static / "app.js").write_text("let x = 1;")
    service = Service.open(mem_path)
    with TestClient(create_app(service, static_dir=static)) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.text == "<html>reco</html>"
        assert r.headers["content-type"].startswith("text/html")
        assert c.get("/static/app.js").text == "let x = 1;"
        assert c.get("/static/../../mem/manifest.json").status_code == 404
        assert c.get("/static/nothing.js").status_code == 404
    service = Service.open(mem_path)
    with TestClient(create_app(service, static_dir=tmp_path / "none")) as c:
        r = c.get("/")
        assert r.status_code == 404 and "error" in r.json()
        assert c.get("/static/app.js").status_code == 404


def _png(path: Path, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path.read_bytes()


def test_item_images_only_from_inside_the_image_root(tmp_path):
    pytest.importorskip("PIL")
    root = tmp_path / "images"
    inside = _png(root / "ant" / "0.png", 0)
    _png(tmp_path / "secret.png", 1)
    os.symlink(tmp_path / "secret.png", root / "ant" / "link.png")
    _png(root / "bee" / "1.png", 2)
    os.symlink(root / "bee" / "1.png", root / "ant" / "inner.png")  # inside: fine
    (root / "ant" / "folder.png").mkdir()
    sources = [
        str(root / "ant" / "0.png"),  # id 0: served
        str(root / "ant" / ".." / ".." / "secret.png"),  # 1: leaves the root
        str(root / "ant" / "link.png"),  # 2: a symlink out of the root
        str(tmp_path / "secret.png"),  # 3: outside
        "images/ant/0.png",  # 4: relative (a build run elsewhere): root / ant/0.png
        "../secret.png",  # 5
        str(root / "ant" / "inner.png"),  # 6: a symlink inside the root
        str(root / "ant" / "folder.png"),  # 7: not a regular file
        "http://example.com/a.png",  # 8
        str(root / "ant" / "0.png"),  # 9: deleted below
    ]
    src = {"kind": "image_folder", "path": str(root), "template": "{}", "fingerprint": "x"}
    with MemoryWriter(tmp_path / "mem", MODS, source=src) as w:
        n = len(sources)
        w.add(
            {"image": np.ones((n, 16), np.float32), "text": np.ones((n, 8), np.float32)},
            metadata={"source": sources, "caption": ["c"] * n},
        )
    with MemoryWriter.open(tmp_path / "mem") as w:
        w.delete([9])
    service = Service.open(tmp_path / "mem")
    with TestClient(create_app(service)) as c:
        r = c.get("/items/0/image")
        assert r.status_code == 200 and r.content == inside
        assert r.headers["content-type"] == "image/png"
        assert c.get("/items/4/image").content == inside
        assert c.get("/items/6/image").content == (root / "bee" / "1.png").read_bytes()
        for item in (1, 2, 3, 5, 7, 8, 9, 10, 123456789):
            r = c.get(f"/items/{item}/image")
            assert r.status_code == 404 and "error" in r.json(), item
        for path in (
            "/items/-1/image",
            "/items/abc/image",
            "/items/0x1/image",
            "/items/1e3/image",
            "/items/99999999999999999999999/image",
            "/items/..%2f..%2fsecret.png/image",
            "/items/%2e%2e/image",
            "/items/0/..%2f..%2fsecret.png",
            "/items/../../secret.png",
            "/items/0%00/image",
        ):
            r = c.get(path)
            assert r.status_code == 404, path
            assert b"secret" not in r.content
    # No image root recorded: nothing is served, even a file that exists.
    with MemoryWriter(tmp_path / "bare", MODS) as w:
        w.add(
            {"image": np.ones((1, 16), np.float32), "text": np.ones((1, 8), np.float32)},
            metadata={"source": [str(root / "ant" / "0.png")]},
        )
    service = Service.open(tmp_path / "bare")
    with TestClient(create_app(service)) as c:
        assert c.get("/items/0/image").status_code == 404


def test_text_and_image_queries_with_the_memorys_encoder(tiny_memory, image_tree, tiny_clip):
    """A memory built by `reco build-memory`: text and uploaded-image queries encoded with its
    encoder, answers of Index.search, and the item images of its image folder."""
    from reco.eval.encoders import add_model_configs, open_clip_encoder

    options = EncoderOptions(model_configs=[str(DATA / "reco-tiny-clip.json")])
    service = Service.open(tiny_memory, encoders=options)
    mem = Memory.open(tiny_memory)
    add_model_configs([str(DATA / "reco-tiny-clip.json")])
    enc = open_clip_encoder(tiny_clip[0], str(tiny_clip[1]), "--pretrained")
    with TestClient(create_app(service)) as c:
        r = c.post("/search", json={"text": "a photo of a bee.", "k": 4})
        assert r.status_code == 200, r.text
        q = enc.encode_texts(["a photo of a bee."])[0].float().tolist()
        assert _got(r.json()["results"]) == _expected(tiny_memory, "text", q, 4)
        query = image_tree / "ant" / "2.png"
        files = {"image": ("2.png", query.read_bytes(), "image/png")}
        r = c.post("/search", data={"k": "3", "exclude": "[]"}, files=files)
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        assert top["metadata"]["source"].endswith("ant/2.png") and top["score"] > 0.999
        from PIL import Image

        q = enc.encode_images([Image.open(query).convert("RGB")])[0].float().tolist()
        assert _got(r.json()["results"]) == _expected(tiny_memory, "image", q, 3)
        # The same image searched against the captions.
        r = c.post("/search", data={"k": "2", "modality": "text"}, files=files)
        assert _got(r.json()["results"]) == _expected(tiny_memory, "text", q, 2)
        img = c.get(f"/items/{top['id']}/image")
        assert img.status_code == 200 and img.content == query.read_bytes()
        r = c.post("/search", files={"image": ("x.png", b"\x89PNG broken", "image/png")})
        assert r.status_code == 400 and "cannot be decoded" in r.json()["error"]
    assert mem.rows == 12


# -- POST /explain --------------------------------------------------------------------------
def _trained(tmp_path: Path, memory: Path) -> Path:
    """The cheapest checkpoint: a long-tail attention classifier (2 heads, k = 4), 5 steps."""
    from reco.train.config import load_experiment
    from reco.train.run import train

    cfg = tiny_longtail_config(tmp_path, memory)
    train(load_experiment(cfg))
    return cfg


def test_explain_is_the_models_explanation(tmp_path, tiny_memory, image_tree):
    """/explain (an uploaded image, its embedding, a smaller k) against explain_query called
    directly with the model's own retriever over the same memory."""
    from PIL import Image

    from reco.eval.encoders import add_model_configs, open_clip_encoder
    from reco.eval.explain import explain_query
    from reco.eval.trained import load_trained
    from reco.serve.explain import Explainer

    cfg_path = _trained(tmp_path, tiny_memory)
    cfg, built, _ = load_trained(cfg_path)
    info = built.memory.manifest.modalities["image"].encoder
    add_model_configs([str(DATA / "reco-tiny-clip.json")])
    enc = open_clip_encoder(info.name.removeprefix("open_clip:"), info.checkpoint, "--pretrained")
    query = image_tree / "bee" / "3.png"
    z = enc.encode_images([Image.open(query).convert("RGB")]).float()
    want = explain_query(cfg, built, z, "image")
    names = built.train_memory.manifest.label_names
    options = EncoderOptions(model_configs=[str(DATA / "reco-tiny-clip.json")])
    service = Service.open(tiny_memory, encoders=options, explainer=Explainer.load(cfg_path, None))
    mem = Memory.open(tiny_memory)
    with TestClient(create_app(service)) as c:
        files = {"image": ("3.png", query.read_bytes(), "image/png")}
        by_image = c.post("/explain", files=files)
        by_embedding = c.post("/explain", json={"embedding": z[0].tolist()})
        for r in (by_image, by_embedding):
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["k"] == 4 and got["heads"] == 2 and got["modality"] == "image"
            hits = got["results"]
            assert [h["row"] for h in hits] == want.indices[0].tolist()
            assert [h["id"] for h in hits] == mem.ids[want.indices[0]].tolist()
            assert [h["metadata"] for h in hits] == mem.metadata(want.indices[0].tolist())
            assert np.allclose([h["score"] for h in hits], want.scores[0], atol=1e-5)
            per_head = torch.tensor([h["weights"] for h in hits]).T  # [H, k]
            assert torch.allclose(per_head, want.weights[0], atol=1e-5)
            assert torch.allclose(per_head.sum(1), torch.ones(2), atol=1e-5)
            assert np.allclose([h["weight"] for h in hits], want.weights[0].mean(0), atol=1e-5)
            p = torch.softmax(want.logits[0], 0)
            c_want = int(p.argmax())
            assert got["prediction"]["class"] == c_want
            assert got["prediction"]["label"] == names[c_want]
            assert abs(got["prediction"]["probability"] - float(p[c_want])) < 1e-5
        two = c.post("/explain", json={"embedding": z[0].tolist(), "k": 2}).json()["results"]
        assert [h["row"] for h in two] == want.indices[0, :2].tolist()
        for body, message in (
            ({"text": "a bee"}, "explains image queries"),
            ({"embedding": z[0].tolist(), "where": "x"}, "unknown fields"),
            ({"embedding": z[0].tolist()[:3]}, "embedding must be a list of"),
            ({"embedding": z[0].tolist(), "k": 0}, "k=0"),
            ({}, "exactly one query"),
        ):
            r = c.post("/explain", json=body)
            assert r.status_code == 400 and message in r.json()["error"], (body, r.text)
    # The served memory's version now: a deleted neighbour is not explained, the next one is.
    from reco.memory import MemoryWriter as Writer

    top = int(mem.ids[want.indices[0, 0]])
    with Writer.open(tiny_memory) as w:
        w.delete([top])
    service = Service.open(tiny_memory, explainer=Explainer.load(cfg_path, None))
    own = built.task.retriever
    fewer = explain_query(cfg, built, z, "image", own(z, want.indices[:, :1]))
    with TestClient(create_app(service)) as c:
        hits = c.post("/explain", json={"embedding": z[0].tolist()}).json()["results"]
        assert top not in [h["id"] for h in hits]
        assert [h["row"] for h in hits] == fewer.indices[0].tolist()
        per_head = torch.tensor([h["weights"] for h in hits]).T
        assert torch.allclose(per_head, fewer.weights[0], atol=1e-5)
    # A served memory of other dims than the checkpoint's: refused before serving.
    with pytest.raises(ValueError, match="trained with a memory of"):
        Service(_write(tmp_path / "other"), explainer=Explainer.load(cfg_path, None))


def test_explain_without_a_checkpoint_is_404(client):
    r = client.post("/explain", json={"embedding": EMB})
    assert r.status_code == 404 and "--checkpoint" in r.json()["error"]


def test_security_headers(mem_path):
    from reco.serve.app import PAGE_CSP, STATIC

    meta = re.search(
        r'Content-Security-Policy"\s+content="([^"]+)"', (STATIC / "index.html").read_text()
    )
    assert meta and PAGE_CSP == meta.group(1) + "; frame-ancestors 'none'"
    service = Service.open(mem_path)
    with TestClient(create_app(service, token="t")) as c:
        for path in ("/", "/static/app.js", "/static/style.css"):
            r = c.get(path)
            assert r.status_code == 200, path
            assert r.headers["content-security-policy"] == PAGE_CSP, path
            assert r.headers["x-content-type-options"] == "nosniff", path
        auth = {"Authorization": "Bearer t"}
        for r in (
            c.get("/healthz"),
            c.get("/metrics", headers=auth),
            c.get("/metrics"),  # a 401
            c.post("/search", json={"embedding": EMB, "k": 2}, headers=auth),
            c.post("/search", json={"k": 2}, headers=auth),  # a 400
            c.get("/nothing", headers=auth),  # a 404
            c.get("/items/0/image", headers=auth),
        ):
            assert r.headers.get_list("x-content-type-options") == ["nosniff"], r.url
            assert "content-security-policy" not in r.headers, r.url


# -- a real uvicorn --------------------------------------------------------------------------
def _start(mem: Path, cwd: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`reco serve MEM --port 0` in a subprocess (cwd outside the checkout); (process, url)."""
    cmd = [sys.executable, "-m", "reco.cli", "serve", str(mem), "--port", "0", *extra]
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if "listening on" not in line:
        p.kill()
        raise AssertionError(f"no start: {line!r} {p.stderr.read()}")
    url = line.split("listening on ")[1].strip()
    for _ in range(200):
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return p, url
        except httpx.TransportError:
            time.sleep(0.05)
    p.kill()
    raise AssertionError("never healthy")


def test_a_non_loopback_host_needs_a_token(mem_path, tmp_path):
    cmd = [sys.executable, "-m", "reco.cli", "serve", str(mem_path), "--host", "0.0.0.0"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a loopback address" in r.stderr and "--token" in r.stderr
    assert "listening" not in r.stdout


def test_uvicorn_serves_and_sigterm_finishes_the_request_in_flight(mem_path, tmp_path):
    # A long batching wait keeps the request in flight when SIGTERM arrives.
    p, url = _start(mem_path, tmp_path, "--max-wait-ms", "1500")
    try:
        q = _query(np.random.default_rng(3), 16)
        r = httpx.post(url + "/search", json={"embedding": q, "k": 5}, timeout=30)
        assert r.status_code == 200
        assert _got(r.json()["results"]) == _expected(mem_path, "image", q, 5)
        answer: dict = {}

        def ask() -> None:
            answer["r"] = httpx.post(url + "/search", json={"embedding": q, "k": 5}, timeout=30)

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(0.5)  # the request is in, waiting for its batch
        p.send_signal(signal.SIGTERM)
        t.join(30)
        assert answer["r"].status_code == 200
        assert _got(answer["r"].json()["results"]) == _expected(mem_path, "image", q, 5)
        assert p.wait(timeout=30) == 0, p.stderr.read()
        assert "Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


@pytest.mark.slow
def test_load_many_concurrent_clients(mem_path, tmp_path):
    """48 clients for ~15 s against a real uvicorn: no 5xx, every answer Index.search's."""
    p, url = _start(mem_path, tmp_path)
    bodies = _case_bodies(11, 256)
    want = [
        _expected(mem_path, b["modality"], b["embedding"], b["k"], b["where"], b["exclude"])
        for b in bodies
    ]
    stop = time.monotonic() + 15
    codes: list[int] = []
    wrong: list[int] = []

    async def client(c: httpx.AsyncClient, seed: int) -> None:
        j = seed
        while time.monotonic() < stop:
            j = (j * 7 + 3) % len(bodies)
            r = await c.post(url + "/search", json=bodies[j])
            codes.append(r.status_code)
            if r.status_code == 200 and _got(r.json()["results"]) != want[j]:
                wrong.append(j)

    async def run() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=60, limits=limits) as c:
            await asyncio.gather(*(client(c, s) for s in range(48)))

    try:
        asyncio.run(run())
        text = httpx.get(url + "/metrics").text
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    assert len(codes) > 100 and set(codes) == {200}, sorted(set(codes))
    assert not wrong
    assert _metric(text, "reco_serve_batch_size_count") < len(codes)


def test_uvicorn_serves_explain_with_config(tmp_path, tiny_memory):
    from reco.eval.explain import explain_query
    from reco.eval.trained import load_trained

    cfg_path = _trained(tmp_path, tiny_memory)
    cmd = [sys.executable, "-m", "reco.cli", "serve", str(tiny_memory), "--checkpoint", "x.pt"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--checkpoint needs --config" in r.stderr
    p, url = _start(tiny_memory, tmp_path, "--config", str(cfg_path))
    try:
        cfg, built, _ = load_trained(cfg_path)
        z = Memory.open(tiny_memory).keys("image")[[5]].float()
        want = explain_query(cfg, built, z, "image")
        r = httpx.post(url + "/explain", json={"embedding": z[0].tolist()}, timeout=30)
        assert r.status_code == 200, r.text
        assert [h["row"] for h in r.json()["results"]] == want.indices[0].tolist()
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0


def test_accepted_connections_have_tcp_nodelay():
    """bind()'s socket says TCP, so asyncio sets TCP_NODELAY on each connection (else Nagle
    holds every response body ~40 ms for the client's delayed ACK)."""
    import socket

    from reco.serve.server import bind

    sock = bind("127.0.0.1", 0)
    got: list[int] = []

    async def main() -> None:
        def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            s = writer.get_extra_info("socket")
            got.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handler, sock=sock)
        async with server:
            reader, writer = await asyncio.open_connection(*sock.getsockname())
            await reader.read()
            writer.close()

    asyncio.run(main())
    assert got and got[0] != 0
