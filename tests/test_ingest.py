"""reco.ingest: building memories from images, class folders, WebDataset shards and clip-retrieval
embeddings."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
import torch
from conftest import DATA

from reco.memory import Memory

pytest.importorskip("open_clip")
PIL = pytest.importorskip("PIL.Image")
from reco import ingest  # noqa: E402
from reco.encoders import OpenCLIPEncoder  # noqa: E402

CLASSES = ["cat", "dog", "tram"]


def _image(rng, size=32) -> PIL.Image:
    return PIL.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    name, path = tiny_clip
    return OpenCLIPEncoder(name, path, device="cpu", batch_size=16)


@pytest.fixture
def caption_set(tmp_path):
    """40 images with captions and labels, plus an unreadable file, an empty caption and a
    byte-identical duplicate."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        p = tmp_path / "img" / f"{i:03d}.png"
        p.parent.mkdir(exist_ok=True)
        _image(rng).save(p)
        rows.append(
            {
                "path": f"img/{i:03d}.png",
                "caption": f"a {CLASSES[i % 3]} number {i}",
                "label": CLASSES[i % 3],
            }
        )
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    rows.insert(5, {"path": "img/broken.png", "caption": "broken", "label": "cat"})
    rows.insert(9, {"path": "img/001.png", "caption": "the same image again", "label": "dog"})
    rows.insert(12, {"path": "img/002.png", "caption": "  ", "label": "tram"})
    table = tmp_path / "captions.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    return table


def test_build_from_captions(tmp_path, caption_set, encoder):
    items = list(ingest.iter_caption_table(caption_set))
    kw = {"image_encoder": encoder, "label_names": CLASSES, "batch_size": 8, "shard_rows": 16}
    report = ingest.build_from_items(tmp_path / "mem", items, progress_bar=False, **kw)
    assert (report.unreadable, report.empty_caption, report.duplicates) == (1, 1, 1)
    assert report.rows == report.added == 40
    mem = Memory.open(tmp_path / "mem", verify="full")
    assert mem.rows == 40 and len(mem.manifest.shards) == 3
    meta = mem.metadata(range(40))
    assert [m["caption"] for m in meta[:3]] == [
        "a cat number 0",
        "a dog number 1",
        "a tram number 2",
    ]
    assert mem.labels.tolist() == [i % 3 for i in range(40)]
    # The stored embeddings are the encoder's, rounded to float16.
    ims = [PIL.open(tmp_path / f"img/{i:03d}.png").convert("RGB") for i in range(40)]
    want = encoder.encode_images(ims).half()
    torch.testing.assert_close(mem.keys("image").materialize(), want, atol=2e-3, rtol=0)
    txt = encoder.encode_texts([m["caption"] for m in meta]).half()
    torch.testing.assert_close(mem.values("text").materialize(), txt, atol=2e-3, rtol=0)
    enc = mem.manifest.modalities["image"].encoder
    assert enc.name == "open_clip:reco-tiny-clip" and enc.sha256 == encoder.sha256
    # Running the same build again resumes at the end and adds nothing.
    again = ingest.build_from_items(tmp_path / "mem", items, progress_bar=False, **kw)
    assert again.added == 0 and again.rows == 40 and again.resumed_from == len(items)


def test_build_from_image_folder(tmp_path, encoder):
    rng = np.random.default_rng(1)
    for c in CLASSES:
        for i in range(4):
            (tmp_path / "tree" / c).mkdir(parents=True, exist_ok=True)
            _image(rng).save(tmp_path / "tree" / c / f"{i}.jpg")
    items = ingest.iter_image_folder(tmp_path / "tree", "a photo of a {}.")
    report = ingest.build_from_items(
        tmp_path / "mem", items, image_encoder=encoder, label_names=CLASSES, progress_bar=False
    )
    mem = Memory.open(tmp_path / "mem")
    assert report.rows == 12
    assert mem.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert mem.metadata([4])[0]["caption"] == "a photo of a dog."


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_build_from_webdataset(tmp_path, encoder):
    rng = np.random.default_rng(2)
    shards = []
    for s in range(2):
        samples = [
            (
                f"{s:02d}{i:04d}",
                {"jpg": _png_bytes(_image(rng)), "txt": f"caption {s}-{i}".encode(), "cls": b"1"},
            )
            for i in range(5)
        ]
        samples.append((f"{s:02d}9999", {"txt": b"no image here"}))
        shards.append(tmp_path / f"shard-{s}.tar")
        _write_tar(shards[-1], samples)
    report = ingest.build_from_items(
        tmp_path / "mem",
        ingest.iter_webdataset(shards),
        image_encoder=encoder,
        progress_bar=False,
    )
    assert report.rows == 10 and report.unreadable == 2
    mem = Memory.open(tmp_path / "mem")
    assert [m["caption"] for m in mem.metadata([0, 5])] == ["caption 0-0", "caption 1-0"]
    assert mem.metadata([9])[0]["source"].endswith("shard-1.tar#010004")


def _clip_retrieval_folder(root, sizes, dim=16, seed=3):
    rng = np.random.default_rng(seed)
    import pyarrow as pa
    import pyarrow.parquet as pq

    all_img, all_txt, captions = [], [], []
    for n, size in enumerate(sizes):
        img = rng.standard_normal((size, dim)).astype(np.float16)
        txt = rng.standard_normal((size, dim)).astype(np.float16)
        if n == 1:
            img[3] = all_img[0][2]  # an exact duplicate of an earlier row
        for sub, arr in (("img_emb", img), ("text_emb", txt)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            np.save(root / sub / f"{sub}_{n}.npy", arr)
        caps = [f"laion {n}-{i}" for i in range(size)]
        (root / "metadata").mkdir(exist_ok=True)
        pq.write_table(
            pa.table({"caption": caps, "url": [f"http://x/{n}/{i}" for i in range(size)]}),
            root / "metadata" / f"metadata_{n}.parquet",
        )
        all_img.append(img)
        all_txt.append(txt)
        captions += caps
    return np.concatenate(all_img), np.concatenate(all_txt), captions


def test_import_clip_retrieval(tmp_path):
    img, _txt, caps = _clip_retrieval_folder(tmp_path / "laion", [7, 12, 5])
    report = ingest.import_clip_retrieval(
        tmp_path / "mem",
        tmp_path / "laion",
        image_encoder="open_clip:ViT-B-32/laion2b",
        chunk_rows=4,
        shard_rows=6,
        progress_bar=False,
    )
    assert report.duplicates == 1 and report.rows == 23
    keep = np.ones(24, bool)
    keep[7 + 3] = False
    mem = Memory.open(tmp_path / "mem", verify="full")
    want = torch.nn.functional.normalize(torch.from_numpy(img[keep].astype(np.float32)), dim=1)
    torch.testing.assert_close(mem.keys("image").materialize().float(), want, atol=1e-3, rtol=0)
    assert [m["caption"] for m in mem.metadata(range(23))] == [c for c, k in zip(caps, keep) if k]
    assert mem.manifest.modalities["image"].encoder.name == "open_clip:ViT-B-32/laion2b"


def test_near_duplicates_of_the_eval_set_are_dropped(tmp_path, caption_set, encoder):
    ims = [PIL.open(caption_set.parent / f"img/{i:03d}.png").convert("RGB") for i in (3, 17)]
    filt = ingest.NearDuplicateFilter(encoder.encode_images(ims), threshold=0.999)
    report = ingest.build_from_items(
        tmp_path / "mem",
        ingest.iter_caption_table(caption_set),
        image_encoder=encoder,
        near_duplicates=filt,
        progress_bar=False,
    )
    assert report.near_duplicates == 2 and report.rows == 38
    sources = {m["source"] for m in Memory.open(tmp_path / "mem").metadata(range(38))}
    assert not any(s.endswith(("003.png", "017.png")) for s in sources)


def test_kill_9_then_resume_equals_an_uninterrupted_build(tmp_path, tiny_clip):
    name, weights = tiny_clip
    rng = np.random.default_rng(4)
    rows = []
    for i in range(600):
        p = tmp_path / "img" / f"{i:04d}.png"
        p.parent.mkdir(exist_ok=True)
        _image(rng, 24).save(p)
        rows.append(json.dumps({"path": str(p), "caption": f"photo {i}"}))
    table = tmp_path / "items.jsonl"
    table.write_text("\n".join(rows))
    script = textwrap.dedent(
        f"""
        import open_clip, sys
        from reco.encoders import OpenCLIPEncoder
        from reco import ingest
        open_clip.add_model_config({os.fspath(DATA / "reco-tiny-clip.json")!r})
        enc = OpenCLIPEncoder({name!r}, {str(weights)!r}, device="cpu")
        ingest.build_from_items(sys.argv[1], ingest.iter_caption_table({str(table)!r}),
                                image_encoder=enc, batch_size=10, shard_rows=20,
                                progress_bar=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "killed")], cwd=tmp_path)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    rows_at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists():
            rows_at_kill = json.loads(manifest.read_text())["rows"]
            if rows_at_kill >= 40:
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < rows_at_kill < 600, "the build was not caught mid-way"
    enc = OpenCLIPEncoder(name, weights, device="cpu")
    kw = {"image_encoder": enc, "batch_size": 10, "shard_rows": 20, "progress_bar": False}
    resumed = ingest.build_from_items(tmp_path / "killed", ingest.iter_caption_table(table), **kw)
    assert resumed.resumed_from > 0
    ingest.build_from_items(tmp_path / "clean", ingest.iter_caption_table(table), **kw)
    a, b = Memory.open(tmp_path / "killed", verify="full"), Memory.open(tmp_path / "clean")
    assert a.rows == b.rows == 600
    for m in ("image", "text"):
        assert torch.equal(a.keys(m).materialize(), b.keys(m).materialize())
    assert a.metadata(range(600)) == b.metadata(range(600))


def test_random_weights_are_refused_without_the_flag(tiny_clip):
    with pytest.raises(ValueError, match="weights would be random"):
        OpenCLIPEncoder(tiny_clip[0])
    with pytest.warns(UserWarning, match="random weights"):
        OpenCLIPEncoder(tiny_clip[0], allow_random_weights=True, device="cpu")


# ---- regression tests: every bad input is a clear error, never a silent wrong memory -----------


def _part(root, n, img=None, txt=None, meta=None, dim=8, rows=4, seed=0, name=None):
    """Writes one clip-retrieval part (img_emb, text_emb, metadata); None entries are random;
    name overrides the part's number as written in the file names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed + 100 * n)
    tag = str(n) if name is None else name
    if img is None:
        img = rng.standard_normal((rows, dim)).astype(np.float32)
    rows = len(img) if img is not False else rows
    if txt is None:
        txt = rng.standard_normal((rows, dim)).astype(np.float32)
    if meta is None:
        meta = pa.table({"caption": [f"part {n} row {i}" for i in range(rows)]})
    for sub, arr in (("img_emb", img), ("text_emb", txt)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        if arr is not False:
            np.save(root / sub / f"{sub}_{tag}.npy", arr)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    if meta is not False:
        pq.write_table(meta, root / "metadata" / f"metadata_{tag}.parquet")
    return img


def _import(tmp_path, folder, out="mem", **kw):
    return ingest.import_clip_retrieval(tmp_path / out, folder, progress_bar=False, **kw)


def test_clip_retrieval_parts_are_paired_by_number(tmp_path):
    # img_emb 0, 2 against text_emb/metadata 0, 1: refused, not paired by position.
    folder = tmp_path / "gap"
    _part(folder, 0)
    _part(folder, 1, img=False)
    _part(folder, 2, txt=False, meta=False)
    with pytest.raises(ValueError, match=r"part 1: no img_emb.*part 2: no text_emb, no metadata"):
        _import(tmp_path, folder)
    # img_emb_1 and img_emb_01 are the same part twice.
    folder = tmp_path / "dup"
    _part(folder, 0)
    _part(folder, 1)
    _part(folder, 1, name="01", txt=False, meta=False)
    with pytest.raises(ValueError, match=r"img_emb_01\.npy and img_emb_1\.npy are both part 1"):
        _import(tmp_path, folder)
    # Parts 0 and 2 complete, part 1 nowhere: a gap in the numbers (an incomplete download).
    folder = tmp_path / "hole"
    _part(folder, 0)
    _part(folder, 2)
    with pytest.raises(ValueError, match=r"a gap in the numbers: no list has part 1\b"):
        _import(tmp_path, folder)
    assert not (tmp_path / "mem").exists()
    # Numbers, not names, pair parts: zero-padded image files, plain text and metadata files, and
    # part 10 after part 9.
    folder = tmp_path / "padded"
    imgs = [_part(folder, n, txt=False, meta=False, name=f"{n:03d}") for n in range(11)]
    for n in range(11):
        _part(folder, n, img=False)
    report = _import(tmp_path, folder, dedup=False)
    assert report.rows == 44
    mem = Memory.open(tmp_path / "mem")
    assert mem.metadata([40])[0]["caption"] == "part 10 row 0"
    want = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(imgs)), dim=1)
    torch.testing.assert_close(mem.keys("image").materialize().float(), want, atol=1e-3, rtol=0)


def test_clip_retrieval_huge_and_tiny_rows_are_normalised(tmp_path):
    rng = np.random.default_rng(5)
    img = rng.standard_normal((6, 8)).astype(np.float32)
    img[1] *= 1e30  # its squared norm overflows float32
    img[2] *= 1e-30  # its squared norm underflows float32
    img[3] = np.finfo(np.float32).max
    _part(tmp_path / "laion", 0, img=img)
    _import(tmp_path, tmp_path / "laion", dtype="float32")
    got = Memory.open(tmp_path / "mem").keys("image").materialize()
    want = img.astype(np.float64) / np.linalg.norm(img.astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "sub, bad, what", [("img_emb", np.nan, "NaN or inf"), ("text_emb", np.inf, "NaN or inf"),
                       ("img_emb", 0.0, "all zeros")]
)  # fmt: skip
def test_clip_retrieval_rows_that_cannot_be_normalised_are_refused(tmp_path, sub, bad, what):
    rng = np.random.default_rng(6)
    arrays = {s: rng.standard_normal((5, 8)).astype(np.float32) for s in ("img_emb", "text_emb")}
    arrays[sub][3] = bad if bad == 0.0 else 1.0
    arrays[sub][3, 2] = bad
    _part(tmp_path / "laion", 0, img=arrays["img_emb"], txt=arrays["text_emb"])
    with pytest.raises(ValueError, match=rf"{sub}_0\.npy: row 3 .*{what}"):
        _import(tmp_path, tmp_path / "laion")


def test_clip_retrieval_captions(tmp_path):
    import pyarrow as pa

    # A binary caption column is UTF-8 text.
    caps = ["a caf\u00e9", "plain", "\u732b"]
    meta = pa.table({"caption": pa.array([c.encode() for c in caps], pa.binary())})
    _part(tmp_path / "binary", 0, meta=meta, rows=3)
    _import(tmp_path, tmp_path / "binary")
    assert [m["caption"] for m in Memory.open(tmp_path / "mem").metadata(range(3))] == caps
    # Bytes that are not UTF-8: refused, naming the file and the row.
    meta = pa.table({"caption": pa.array([b"ok", b"ok too", b"\xff\xfe"], pa.binary())})
    _part(tmp_path / "latin", 0, meta=meta, rows=3)
    with pytest.raises(ValueError, match=r"metadata_0\.parquet: row 2: .*not UTF-8"):
        _import(tmp_path, tmp_path / "latin", out="mem2")
    # No caption column: refused, unless captions=False (then there are none).
    _part(tmp_path / "nocap", 0, meta=pa.table({"url": ["u0", "u1", "u2"]}), rows=3)
    with pytest.raises(ValueError, match=r"metadata_0\.parquet has no 'caption' column"):
        _import(tmp_path, tmp_path / "nocap", out="mem3")
    report = _import(tmp_path, tmp_path / "nocap", out="mem3", captions=False)
    assert report.rows == 3
    meta = Memory.open(tmp_path / "mem3").metadata(range(3))
    assert [(m["caption"], m["source"]) for m in meta] == [(None, "u0"), (None, "u1"), (None, "u2")]
    # A caption column of numbers is not text.
    _part(tmp_path / "ints", 0, meta=pa.table({"caption": [1, 2, 3]}), rows=3)
    with pytest.raises(ValueError, match=r"metadata_0\.parquet: the 'caption' column is int64"):
        _import(tmp_path, tmp_path / "ints", out="mem4")


def test_caption_table_rows_must_be_well_formed(tmp_path):
    (tmp_path / "short.csv").write_text("path,caption\na.png,a cat\nb.png\n")
    with pytest.raises(ValueError, match=r"short\.csv:3: 1 fields, the header has 2"):
        ingest.iter_caption_table(tmp_path / "short.csv")
    (tmp_path / "long.csv").write_text("path,caption\na.png,a cat,extra\n")
    with pytest.raises(ValueError, match=r"long\.csv:2: 3 fields, the header has 2"):
        ingest.iter_caption_table(tmp_path / "long.csv")
    (tmp_path / "nohead.csv").write_text("")
    with pytest.raises(ValueError, match=r"nohead\.csv has no header row"):
        ingest.iter_caption_table(tmp_path / "nohead.csv")
    (tmp_path / "t.jsonl").write_text(
        '{"path": "a.png", "caption": "ok"}\n{"path": 5, "caption": "x"}\n'
    )
    with pytest.raises(ValueError, match=r"t\.jsonl:2: 'path' must be a string, got int"):
        ingest.iter_caption_table(tmp_path / "t.jsonl")
    (tmp_path / "u.jsonl").write_text('{"path": "a.png", "caption": ["a", "b"]}\n')
    with pytest.raises(ValueError, match=r"u\.jsonl:1: 'caption' must be a string, got list"):
        ingest.iter_caption_table(tmp_path / "u.jsonl")
    (tmp_path / "v.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"v\.jsonl:1: not a JSON object"):
        ingest.iter_caption_table(tmp_path / "v.jsonl")
    (tmp_path / "w.csv").write_bytes(b"path,caption\na.png,caf\xe9\n")
    with pytest.raises(ValueError, match=r"w\.csv:2: not UTF-8 text"):
        ingest.iter_caption_table(tmp_path / "w.csv")


def test_webdataset_samples_without_a_caption(tmp_path, encoder):
    rng = np.random.default_rng(7)
    png = [_png_bytes(_image(rng)) for _ in range(4)]
    _write_tar(
        tmp_path / "a.tar",
        [
            ("k0", {"jpg": png[0], "txt": b"a cat"}),
            ("k1", {"jpg": png[1]}),  # no .txt
            ("k2", {"png": png[2], "txt": b"a dog"}),
        ],
    )
    report = ingest.build_from_items(
        tmp_path / "mem",
        ingest.iter_webdataset([tmp_path / "a.tar"]),
        image_encoder=encoder,
        progress_bar=False,
    )
    assert (report.rows, report.missing_caption, report.empty_caption) == (2, 1, 0)
    assert "1 without a caption" in report.summary()
    # A shard in which no sample has a caption: refused, naming the shard.
    _write_tar(tmp_path / "b.tar", [("k0", {"jpg": png[3], "cls": b"1"})])
    with pytest.raises(ValueError, match=r"b\.tar has no \.txt captions"):
        list(ingest.iter_webdataset([tmp_path / "b.tar"]))
    # Caption bytes that are not UTF-8: refused, naming the sample.
    _write_tar(tmp_path / "c.tar", [("k0", {"jpg": png[3], "txt": b"caf\xe9"})])
    with pytest.raises(ValueError, match=r"c\.tar#k0: the caption is not UTF-8"):
        list(ingest.iter_webdataset([tmp_path / "c.tar"]))


def test_source_identity(tmp_path, caption_set, image_tree):
    table = ingest.iter_caption_table(caption_set)
    s = table.source
    assert s == {
        "kind": "captions",
        "path": str(caption_set.resolve()),
        "image_root": str(caption_set.parent.resolve()),
        "fingerprint": hashlib.sha256(caption_set.read_bytes()).hexdigest(),
    }
    assert ingest.iter_caption_table(caption_set).source == s
    with open(caption_set, "a") as f:
        f.write("img/000.png,one more,cat\n")
    assert ingest.iter_caption_table(caption_set).source["fingerprint"] != s["fingerprint"]

    tree = ingest.iter_image_folder(image_tree, "a photo of a {}.")
    assert set(tree.source) == {"kind", "path", "template", "fingerprint"}
    assert tree.source["kind"] == "image_folder" and tree.source["path"] == str(
        image_tree.resolve()
    )
    assert ingest.iter_image_folder(image_tree, "a {}.").source["template"] == "a {}."
    (image_tree / "bee" / "6.png").write_bytes((image_tree / "bee" / "0.png").read_bytes())
    assert ingest.iter_image_folder(image_tree).source["fingerprint"] != tree.source["fingerprint"]

    _write_tar(tmp_path / "a.tar", [("k", {"txt": b"x"})])
    _write_tar(tmp_path / "b.tar", [("k", {"txt": b"y"})])
    wds = ingest.iter_webdataset([tmp_path / "a.tar", tmp_path / "b.tar"]).source
    assert wds["kind"] == "webdataset" and set(wds) == {"kind", "paths", "fingerprint"}
    assert wds["paths"] == [str((tmp_path / n).resolve()) for n in ("a.tar", "b.tar")]
    swapped = ingest.iter_webdataset([tmp_path / "b.tar", tmp_path / "a.tar"]).source
    assert swapped["fingerprint"] != wds["fingerprint"]

    _part(tmp_path / "laion", 0)
    cr = ingest.clip_retrieval_source(tmp_path / "laion")
    assert cr["kind"] == "clip_retrieval" and cr["path"] == str((tmp_path / "laion").resolve())
    assert cr["captions"] is True and set(cr) == {"kind", "path", "captions", "fingerprint"}
    assert ingest.clip_retrieval_source(tmp_path / "laion", captions=False)["captions"] is False
    _part(tmp_path / "laion", 1)
    assert ingest.clip_retrieval_source(tmp_path / "laion")["fingerprint"] != cr["fingerprint"]


def test_another_source_is_refused_unless_appended(tmp_path, caption_set, encoder):
    from reco.memory.manifest import MemoryFormatError

    kw = {"image_encoder": encoder, "progress_bar": False, "label_names": CLASSES}
    first = ingest.build_from_items(tmp_path / "mem", ingest.iter_caption_table(caption_set), **kw)
    assert first.rows == 40
    other = tmp_path / "other.csv"
    rows = [f"img/{i:03d}.png,another caption {i},cat" for i in range(30, 40)]
    rows += [f"new/{i}.png,a new image {i},dog" for i in range(3)]
    rng = np.random.default_rng(8)
    (tmp_path / "new").mkdir()
    for i in range(3):
        _image(rng).save(tmp_path / "new" / f"{i}.png")
    other.write_text("path,caption,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(MemoryFormatError, match="another source"):
        ingest.build_from_items(tmp_path / "mem", ingest.iter_caption_table(other), **kw)
    report = ingest.build_from_items(
        tmp_path / "mem", ingest.iter_caption_table(other), append=True, **kw
    )
    # The new source is read from its first item: its 3 new images are added, the 10 images
    # already in the memory are exact duplicates.
    assert (report.resumed_from, report.added, report.duplicates, report.rows) == (0, 3, 10, 43)
    mem = Memory.open(tmp_path / "mem")
    assert mem.manifest.source == ingest.iter_caption_table(other).source
    assert mem.metadata([42])[0]["caption"] == "a new image 2"
    # Resuming the appended source continues it (and adds nothing more).
    again = ingest.build_from_items(tmp_path / "mem", ingest.iter_caption_table(other), **kw)
    assert (again.resumed_from, again.added) == (13, 0)


def test_clip_retrieval_from_another_folder_is_refused_unless_appended(tmp_path):
    from reco.memory.manifest import MemoryFormatError

    _part(tmp_path / "a", 0, seed=1)
    _part(tmp_path / "b", 0, seed=2)
    assert _import(tmp_path, tmp_path / "a").rows == 4
    with pytest.raises(MemoryFormatError, match="another source"):
        _import(tmp_path, tmp_path / "b")
    report = _import(tmp_path, tmp_path / "b", append=True)
    assert (report.resumed_from, report.added, report.rows) == (0, 4, 8)
    assert _import(tmp_path, tmp_path / "b").added == 0


def test_source_files_must_be_regular(tmp_path, deadline):
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with deadline(20):
        for path in (fifo, tmp_path, "/dev/zero"):
            with pytest.raises(ValueError, match=rf"{path}: not a regular file"):
                ingest.iter_caption_table(path)
        os.mkfifo(tmp_path / "fifo.tar")
        with pytest.raises(ValueError, match=r"fifo\.tar: not a regular file"):
            list(ingest.iter_webdataset([tmp_path / "fifo.tar"]))
    with pytest.raises(ValueError, match=r"missing\.csv: no such file"):
        ingest.iter_caption_table(tmp_path / "missing.csv")


def test_image_reads_are_bounded(tmp_path, encoder, deadline):
    rng = np.random.default_rng(9)
    (tmp_path / "img").mkdir()
    _image(rng).save(tmp_path / "img" / "ok.png")
    _image(rng, 64).save(tmp_path / "img" / "big.png")
    os.mkfifo(tmp_path / "img" / "fifo.png")
    limit = (tmp_path / "img" / "ok.png").stat().st_size
    rows = "img/ok.png,fine\nimg/fifo.png,a fifo\n/dev/zero,endless zeros\nimg/big.png,too big\n"
    (tmp_path / "t.csv").write_text("path,caption\n" + rows)
    items = ingest.iter_caption_table(tmp_path / "t.csv", max_image_bytes=limit)
    with deadline(60):
        report = ingest.build_from_items(
            tmp_path / "mem", items, image_encoder=encoder, progress_bar=False
        )
    assert (report.rows, report.unreadable) == (1, 3)
    # A tar member over the limit is unreadable too.
    _write_tar(
        tmp_path / "a.tar",
        [("k0", {"png": _png_bytes(_image(rng, 64)), "txt": b"big"}), ("k1", {"txt": b"x"})],
    )
    items = ingest.iter_webdataset([tmp_path / "a.tar"], max_image_bytes=limit)
    report = ingest.build_from_items(
        tmp_path / "mem2", items, image_encoder=encoder, progress_bar=False
    )
    assert (report.rows, report.unreadable) == (0, 2)


def test_build_arguments_are_checked_before_anything_is_written(tmp_path, caption_set, encoder):
    items = ingest.iter_caption_table(caption_set)
    for kw, what in (
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"shard_rows": -1}, "shard_rows must be an integer >= 1"),
        ({"label_names": ["cat", "dog", "cat"]}, "label_names holds 'cat' twice"),
        ({"label_names": []}, "label_names is empty"),
    ):
        with pytest.raises(ValueError, match=what):
            ingest.build_from_items(tmp_path / "mem", items, image_encoder=encoder, **kw)
    _part(tmp_path / "laion", 0)
    for kw, what in (
        ({"chunk_rows": 0}, "chunk_rows must be an integer >= 1"),
        ({"shard_rows": 0}, "shard_rows must be an integer >= 1"),
        ({"dtype": "int8"}, "dtype must be"),
    ):
        with pytest.raises(ValueError, match=what):
            _import(tmp_path, tmp_path / "laion", **kw)
    assert not (tmp_path / "mem").exists()
    with pytest.raises(ValueError, match="template"):
        ingest.iter_image_folder(tmp_path, "a {} of a {}")


def test_near_duplicate_filter_refuses_rows_it_cannot_compare():
    e = np.ones((3, 4), np.float32)
    e[1, 2] = np.nan
    with pytest.raises(ValueError, match="eval_embeddings row 1 holds NaN or inf"):
        ingest.NearDuplicateFilter(e)
    e[1] = 0
    with pytest.raises(ValueError, match="eval_embeddings row 1 is all zeros"):
        ingest.NearDuplicateFilter(e)
