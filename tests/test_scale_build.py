"""Building at scale: parallel decoding (workers), partitioned builds, merge, and the torchrun
distributed build (reco.ingest.build, merge, distributed; `reco build-memory --workers /
--distributed`, `reco memory merge`)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import free_port, tiny_clip_args

from reco.memory import Memory, MemoryFormatError, MemoryWriter

pytest.importorskip("open_clip")
PIL = pytest.importorskip("PIL.Image")
from reco import ingest  # noqa: E402
from reco.encoders import Encoder, FunctionEncoder, OpenCLIPEncoder  # noqa: E402

CLASSES = ["cat", "dog", "tram"]
N_IMAGES = 45


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    name, path = tiny_clip
    return OpenCLIPEncoder(name, path, device="cpu", batch_size=16)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A caption table of 45 random images (of varied sizes) with labels, an unreadable file, an
    empty caption and two byte-identical duplicates, one of them in another chunk of 4."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_IMAGES):
        p = root / "img" / f"{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        side = int(rng.integers(20, 48))
        PIL.fromarray(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)).save(p)
        rows.append({"path": f"img/{i:03d}.png", "caption": f"a {CLASSES[i % 3]} {i}"})
        rows[-1]["label"] = CLASSES[i % 3]
    (root / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    rows.insert(5, {"path": "img/broken.png", "caption": "broken", "label": "cat"})
    rows.insert(9, {"path": "img/001.png", "caption": "the same image again", "label": "dog"})
    rows.insert(12, {"path": "img/002.png", "caption": "  ", "label": "tram"})
    rows.insert(30, {"path": "img/003.png", "caption": "once more", "label": "tram"})
    table = root / "captions.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    return table, rows


def _contents(path) -> dict:
    """Everything a reader sees of a memory: ids, labels, every metadata column, embeddings."""
    with Memory.open(path, verify="full") as mem:
        return {
            "ids": mem.ids.tolist(),
            "live": mem.live.tolist(),
            "labels": None if mem.labels is None else mem.labels.tolist(),
            "meta": mem.metadata(range(mem.rows)),
            "emb": {m: mem.keys(m).materialize() for m in mem.modalities},
            "encoders": {m: i.encoder for m, i in mem.manifest.modalities.items()},
            "progress": mem.manifest.progress,
        }


def _assert_same(a: dict, b: dict, *, exact: bool = True) -> None:
    assert a["ids"] == b["ids"] and a["live"] == b["live"] and a["labels"] == b["labels"]
    assert a["meta"] == b["meta"] and a["encoders"] == b["encoders"]
    for m in a["emb"]:
        if exact:
            assert torch.equal(a["emb"][m], b["emb"][m]), m
        else:  # other encoder batches: the same embeddings up to float16 rounding
            torch.testing.assert_close(a["emb"][m], b["emb"][m], atol=2e-3, rtol=0)


def _expected_items(rows) -> list[int]:
    """The source positions a build keeps, worked out from the table alone: readable images
    with a caption, each image's first occurrence."""
    seen, keep = set(), []
    for i, r in enumerate(rows):
        if r["path"].endswith("broken.png") or not r["caption"].strip() or r["path"] in seen:
            continue
        seen.add(r["path"])
        keep.append(i)
    return keep


def _build(out, table, enc, **kw):
    items = ingest.iter_caption_table(table)
    kw = {"label_names": CLASSES, "batch_size": 4, "shard_rows": 10, "progress_bar": False, **kw}
    return ingest.build_from_items(out, items, image_encoder=enc, **kw)


def _pil_encoder() -> FunctionEncoder:
    """An encoder without image_transform (PIL images reach image_fn): channel means and sizes."""

    def image_fn(images):
        rows = []
        for im in images:
            a = np.asarray(im, np.float32) / 255.0
            rows.append([*a.mean((0, 1)), *a.std((0, 1)), im.size[0] / 50.0, im.size[1] / 50.0])
        return torch.tensor(rows)

    def text_fn(texts):
        return torch.tensor([[len(t), t.count("a"), t.count(" "), 1, 2, 3, 4, 5.0] for t in texts])

    return FunctionEncoder("stats", 8, image_fn=image_fn, text_fn=text_fn, batch_size=3)


@pytest.mark.parametrize("kind", ["image_transform", "pil"])
def test_workers_do_not_change_the_memory(tmp_path, source, encoder, kind):
    table, rows = source
    enc = encoder if kind == "image_transform" else _pil_encoder()
    r0 = _build(tmp_path / "w0", table, enc, workers=0)
    r2 = _build(tmp_path / "w2", table, enc, workers=2)
    assert (r0.rows, r0.unreadable, r0.empty_caption, r0.duplicates) == (N_IMAGES, 1, 1, 2)
    assert (r2.rows, r2.unreadable, r2.empty_caption, r2.duplicates) == (N_IMAGES, 1, 1, 2)
    a, b = _contents(tmp_path / "w0"), _contents(tmp_path / "w2")
    _assert_same(a, b)
    assert [m["item"] for m in a["meta"]] == _expected_items(rows)
    assert a["progress"]["done"] and a["progress"]["consumed"] == len(rows)
    # The stored embeddings are the encoder's own, on the images themselves.
    ims = [PIL.open(table.parent / rows[i]["path"]).convert("RGB") for i in _expected_items(rows)]
    want = enc.encode_images(ims).half()
    torch.testing.assert_close(a["emb"]["image"], want, atol=2e-3, rtol=0)


def test_workers_need_a_reiterable_source_and_a_count(tmp_path, source, encoder):
    table, _ = source
    once = iter(ingest.iter_caption_table(table))
    with pytest.raises(ValueError, match="re-iterable"):
        ingest.build_from_items(tmp_path / "m", once, image_encoder=encoder, workers=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be an integer >= 0"):
            _build(tmp_path / "m", table, encoder, workers=bad)
    assert not (tmp_path / "m").exists()


class _Interrupting(Encoder):
    """The tiny CLIP, raising KeyboardInterrupt on its n-th image batch (a Ctrl-C mid-build)."""

    def __init__(self, inner: OpenCLIPEncoder, n: int) -> None:
        self.inner, self.calls, self.n = inner, 0, n
        self.name, self.dim, self.image_transform = inner.name, inner.dim, inner.image_transform
        self.checkpoint, self.sha256, self.device = inner.checkpoint, inner.sha256, inner.device

    def encode_images(self, images):
        raise AssertionError("a build with an image_transform encodes batches")

    def encode_image_batch(self, batch):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner.encode_image_batch(batch)

    def encode_texts(self, texts):
        return self.inner.encode_texts(texts)


def test_a_build_interrupted_with_workers_resumes_with_none(tmp_path, source, encoder):
    table, _ = source
    _build(tmp_path / "straight", table, encoder, workers=0)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "m", table, _Interrupting(encoder, 6), workers=2)
    partial = Memory.open(tmp_path / "m")
    assert 0 < partial.rows < N_IMAGES  # the rows of the first batches were committed
    partial.close()
    report = _build(tmp_path / "m", table, encoder, workers=0)
    assert report.resumed_from > 0
    a, b = _contents(tmp_path / "straight"), _contents(tmp_path / "m")
    _assert_same(a, b)


def test_parts_of_a_partition_merge_into_the_whole_build(tmp_path, source, encoder):
    table, _ = source
    _build(tmp_path / "whole", table, encoder)
    parts = []
    for p in (2, 0, 1):  # any order: each part is built on its own
        folder = tmp_path / f"part{p}"
        report = _build(folder, table, encoder, partition=ingest.Partition(p, 3, 4), workers=p % 2)
        parts.append(folder)
        items = [m["item"] for m in _contents(folder)["meta"]]
        assert items and all((i // 4) % 3 == p for i in items)
        assert report.rows == len(items)
    merged = ingest.merge_memories(tmp_path / "merged", parts, dedup=True, shard_rows=7)
    assert merged.interleaved and merged.rows == N_IMAGES
    assert merged.duplicates == 2  # both duplicates lie in another part than their first copy
    a, b = _contents(tmp_path / "whole"), _contents(tmp_path / "merged")
    # A duplicate dropped inside a chunk changes that chunk's encoder batch: equal to rounding.
    _assert_same(a, b, exact=False)
    for key in ("consumed", "skipped", "done"):
        assert a["progress"][key] == b["progress"][key], key
    # The merged memory resumes as the whole build: nothing is left to add.
    again = _build(tmp_path / "merged", table, encoder)
    assert (again.added, again.rows) == (0, N_IMAGES)
    # The same merge again has nothing to do; a part missing, or one unfinished, is refused.
    assert ingest.merge_memories(tmp_path / "merged", parts, dedup=True).added == 0
    with pytest.raises(ValueError, match=r"missing part\(s\) \[1\]"):
        ingest.merge_memories(tmp_path / "m2", [parts[0], parts[1]])
    with pytest.raises(ValueError, match="given twice"):
        ingest.merge_memories(tmp_path / "m2", [parts[0], parts[1], parts[0]])
    with pytest.raises(ValueError, match="must equal batch_size"):
        _build(tmp_path / "m2", table, encoder, partition=ingest.Partition(0, 3, 8))
    with pytest.raises(ValueError, match="part must lie in"):
        ingest.Partition(3, 3, 4)


def _write_memory(path, rng, rows, encoder_name="enc-a", meta=True, dim=8):
    from reco.memory import EncoderInfo, ModalityInfo

    mods = {
        m: ModalityInfo(dim, "float16", EncoderInfo(name=encoder_name)) for m in ("image", "text")
    }
    x = {m: rng.standard_normal((rows, dim)).astype(np.float32) for m in mods}
    digests = [f"{int(v):064x}" for v in rng.integers(0, 6, rows)]
    with MemoryWriter(path, mods, shard_rows=5) as w:
        for lo in range(0, rows, 4):
            hi = min(lo + 4, rows)
            md = {"image_sha256": digests[lo:hi], "n": list(range(lo, hi))} if meta else None
            w.add({m: v[lo:hi] for m, v in x.items()}, metadata=md)
    return x, digests


def test_merge_concatenates_with_dedup_and_skips_deleted_rows(tmp_path):
    rng = np.random.default_rng(1)
    xa, da = _write_memory(tmp_path / "a", rng, 13)
    xb, db = _write_memory(tmp_path / "b", rng, 9)
    with MemoryWriter.open(tmp_path / "a") as w:
        w.delete([2, 7])
    report = ingest.merge_memories(tmp_path / "out", [tmp_path / "a", tmp_path / "b"], dedup=True)
    # Independently: the live rows of a then b, each digest's first occurrence kept.
    order = [("a", i) for i in range(13) if i not in (2, 7)] + [("b", i) for i in range(9)]
    seen, keep = set(), []
    for part, i in order:
        d = (da if part == "a" else db)[i]
        if d not in seen:
            seen.add(d)
            keep.append((part, i))
    assert not report.interleaved and report.deleted == 2
    assert report.rows == len(keep) and report.duplicates == len(order) - len(keep)
    got = _contents(tmp_path / "out")
    assert got["ids"] == list(range(len(keep)))
    assert [(m["image_sha256"], m["n"]) for m in got["meta"]] == [
        ((da if p == "a" else db)[i], i) for p, i in keep
    ]
    want = np.stack([(xa if p == "a" else xb)["image"][i] for p, i in keep]).astype(np.float16)
    assert np.array_equal(got["emb"]["image"].numpy(), want)


def test_merge_resumes_after_an_interruption(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    parts = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for p in parts:
        _write_memory(p, rng, 11)
    ingest.merge_memories(tmp_path / "straight", parts, shard_rows=4, block_rows=3)
    calls = {"n": 0}
    real_add = MemoryWriter.add

    def add(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_add(self, *a, **kw)

    monkeypatch.setattr(MemoryWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        ingest.merge_memories(tmp_path / "out", parts, shard_rows=4, block_rows=3)
    monkeypatch.setattr(MemoryWriter, "add", real_add)
    with Memory.open(tmp_path / "out") as mem:
        assert 0 < mem.rows < 33
    report = ingest.merge_memories(tmp_path / "out", parts, shard_rows=4, block_rows=3)
    assert 0 < report.added < 33 and report.rows == 33
    _assert_same(_contents(tmp_path / "straight"), _contents(tmp_path / "out"))
    # A part changed since: the interrupted merge is not continued with other rows.
    _write_memory(tmp_path / "d", rng, 3)
    with pytest.raises(MemoryFormatError):
        ingest.merge_memories(tmp_path / "out", [*parts[:2], tmp_path / "d"])


def test_merge_refuses_other_encoders_dims_and_its_own_parts(tmp_path):
    rng = np.random.default_rng(3)
    _write_memory(tmp_path / "a", rng, 6)
    _write_memory(tmp_path / "b", rng, 6, encoder_name="enc-b")
    _write_memory(tmp_path / "c", rng, 6, dim=4)
    differ = r"image encoder: the first part's is enc-a .*this part's is enc-b"
    with pytest.raises(MemoryFormatError, match=differ):
        ingest.merge_memories(tmp_path / "out", [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(MemoryFormatError, match="image: 8-d float16 != 4-d float16"):
        ingest.merge_memories(tmp_path / "out", [tmp_path / "a", tmp_path / "c"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="must lie outside every part"):
        ingest.merge_memories(tmp_path / "a", [tmp_path / "a", tmp_path / "c"])
    with pytest.raises(ValueError, match="dedup needs the image_sha256 column"):
        _write_memory(tmp_path / "d", rng, 6, meta=False)
        ingest.merge_memories(tmp_path / "out", [tmp_path / "a", tmp_path / "d"], dedup=True)
    # The command line says the same, with exit status 2 and no traceback.
    cmd = [sys.executable, "-m", "reco", "memory", "merge", str(tmp_path / "out")]
    # cwd: not the checkout, whose reco/ has no compiled core
    res = subprocess.run(
        [*cmd, str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, cwd=tmp_path
    )
    assert res.returncode == 2 and b"enc-b" in res.stderr and b"Traceback" not in res.stderr
    res = subprocess.run(
        [*cmd, str(tmp_path / "a"), str(tmp_path / "a2")], capture_output=True, cwd=tmp_path
    )
    assert res.returncode == 2 and b"Traceback" not in res.stderr


# A torchrun entry point: `reco build-memory` on every rank; on the first attempt, the rank
# named by RECO_TEST_DIE_RANK dies (os._exit) right after its second commit.
_ENTRY = textwrap.dedent(
    """
    import os, sys
    from reco.memory import store
    die = os.environ.get("RECO_TEST_DIE_RANK")
    if die is not None and os.environ["RANK"] == die and os.environ.get(
        "TORCHELASTIC_RESTART_COUNT", "0"
    ) == "0":
        seen = []
        def hook(point):
            if point == "adopted":
                seen.append(point)
                if len(seen) == 2:
                    os._exit(17)
        store._fault_hook = hook
    from reco.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def _cli_build(args, out, table, extra=(), env=None, nproc=None):
    base = ["build-memory", str(out), "--captions", str(table), "--batch-size", "4"]
    base += ["--shard-rows", "10", "--no-progress", *args, *extra]
    if nproc is None:
        cmd = [sys.executable, "-m", "reco", *base]
    else:
        entry = out.parent / "entry.py"
        entry.write_text(_ENTRY)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
        # A free port, not torchrun's default 29500, which another job on the machine may hold.
        cmd += ["--master-port", str(free_port())]
        cmd += ["--max-restarts", "1", "--monitor-interval", "0.5", str(entry), *base]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env=full_env, cwd=out.parent
    )


def test_a_three_rank_distributed_build_equals_one_process(tmp_path, source, tiny_clip):
    table, _ = source
    args = tiny_clip_args(tiny_clip)
    one = _cli_build(args, tmp_path / "one", table, ["--workers", "0"])
    assert one.returncode == 0, one.stderr
    # Rank 1 dies after its second commit; torchrun restarts the group, every rank resumes.
    dist = _cli_build(
        args,
        tmp_path / "dist",
        table,
        ["--workers", "1", "--distributed", "--dist-timeout", "300"],
        env={"RECO_TEST_DIE_RANK": "1"},
        nproc=3,
    )
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert "exitcode: 17" in dist.stderr or "exitcode : 17" in dist.stderr, dist.stderr[-3000:]
    _assert_same(_contents(tmp_path / "one"), _contents(tmp_path / "dist"), exact=False)
    assert not (tmp_path / "dist.parts").exists()  # the parts are removed after the merge
    info = subprocess.run(
        [sys.executable, "-m", "reco", "memory", "info", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert json.loads(info.stdout)["rows"] == N_IMAGES


def test_distributed_needs_torchrun(tmp_path, source, tiny_clip):
    table, _ = source
    res = _cli_build(tiny_clip_args(tiny_clip), tmp_path / "m", table, ["--distributed"])
    assert res.returncode == 2 and "torchrun" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_webdataset_shards_build_the_same_with_workers(tmp_path, source, encoder, mode):
    """Uncompressed shards are read by offset in each worker, compressed ones in full: either
    way the memory is the one built in process."""
    import io
    import tarfile

    table, rows = source
    shards = []
    for n in range(2):
        path = tmp_path / f"shard{n}.tar" if mode == "w" else tmp_path / f"shard{n}.tar.gz"
        with tarfile.open(path, mode) as tar:
            for i, r in enumerate(rows[n * 25 : (n + 1) * 25]):
                for ext, data in (
                    ("png", (table.parent / r["path"]).read_bytes()),
                    ("txt", r["caption"].encode()),
                ):
                    info = tarfile.TarInfo(f"{n:02d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    kw = {"image_encoder": encoder, "batch_size": 4, "shard_rows": 10, "progress_bar": False}
    a = ingest.build_from_items(tmp_path / "w0", ingest.iter_webdataset(shards), workers=0, **kw)
    b = ingest.build_from_items(tmp_path / "w2", ingest.iter_webdataset(shards), workers=2, **kw)
    assert a.rows == b.rows == N_IMAGES and a.unreadable == b.unreadable == 1
    got, want = _contents(tmp_path / "w2"), _contents(tmp_path / "w0")
    _assert_same(got, want)
    captions = [rows[i]["caption"] for i in _expected_items(rows)]
    assert [m["caption"] for m in got["meta"]] == captions


def test_ctrl_c_of_a_build_with_workers_loses_no_commit(tmp_path, source, tiny_clip):
    """SIGINT to the whole process group (as a terminal sends it: the build and its decoding
    workers) at a random point: the memory loads, and resuming gives the uninterrupted memory."""
    import random
    import signal
    import time

    table, _ = source
    args = [*tiny_clip_args(tiny_clip), "--shard-rows", "4", "--workers", "2"]
    assert _cli_build(args, tmp_path / "ref", table).returncode == 0
    want = _contents(tmp_path / "ref")
    child = (
        "import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from reco.cli import main\nprint('ready', flush=True)\nsys.exit(main(sys.argv[1:]))\n"
    )
    rng = random.Random(0)
    interrupted = 0
    for t in range(1):  # each try is two builds of ~10 s in CI; test_memory.py does 50 SIGINTs
        out = tmp_path / f"try{t}"
        cmd = [sys.executable, "-c", child, "build-memory", str(out), "--captions", str(table)]
        cmd += ["--batch-size", "4", "--no-progress", *args]
        p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
        assert p.stdout.readline().strip() == "ready"
        target = rng.randrange(4, N_IMAGES // 2)  # half the commits still to come
        while p.poll() is None:
            try:
                if json.loads((out / "manifest.json").read_text())["rows"] >= target:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.01))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
            interrupted += 1
        _, err = p.communicate(timeout=120)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert last == "" or "interrupted" in last or last.startswith("KeyboardInterrupt"), err
        with Memory.open(out, verify="full") as mem:
            assert mem.rows <= N_IMAGES
        assert _cli_build(args, out, table).returncode == 0
        _assert_same(_contents(out), want)
    assert interrupted >= 1


def test_an_image_transform_of_varying_shapes_is_a_clear_error(tmp_path, source):
    table, _ = source

    def image_fn(x):
        return x.float().flatten(1)[:, :8]

    enc = FunctionEncoder(
        "sizes", 8, image_fn=image_fn, text_fn=_pil_encoder()._text_fn,
        image_transform=lambda im: torch.zeros(3, im.size[1], im.size[0]),
    )  # fmt: skip
    with pytest.raises(ValueError, match="image_transform must return tensors of one shape"):
        _build(tmp_path / "m", table, enc)
    with pytest.raises(ValueError, match="image_transform needs image_fn"):
        FunctionEncoder("t", 8, text_fn=image_fn, image_transform=lambda im: im)
    with pytest.raises(TypeError, match="has no image_transform"):
        _pil_encoder().encode_image_batch(torch.zeros(2, 3, 4, 4))
