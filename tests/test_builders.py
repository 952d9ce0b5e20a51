"""Building memories from images, class folders, WebDataset shards and clip-retrieval embeddings."""

from __future__ import annotations

import csv
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
from reco.encoders import OpenCLIPEncoder  # noqa: E402
from reco.memory import builders  # noqa: E402

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
    items = list(builders.iter_caption_table(caption_set))
    kw = {"image_encoder": encoder, "label_names": CLASSES, "batch_size": 8, "shard_rows": 16}
    report = builders.build_from_items(tmp_path / "mem", items, progress_bar=False, **kw)
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
    again = builders.build_from_items(tmp_path / "mem", items, progress_bar=False, **kw)
    assert again.added == 0 and again.rows == 40 and again.resumed_from == len(items)


def test_build_from_image_folder(tmp_path, encoder):
    rng = np.random.default_rng(1)
    for c in CLASSES:
        for i in range(4):
            (tmp_path / "tree" / c).mkdir(parents=True, exist_ok=True)
            _image(rng).save(tmp_path / "tree" / c / f"{i}.jpg")
    items = builders.iter_image_folder(tmp_path / "tree", "a photo of a {}.")
    report = builders.build_from_items(
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
    report = builders.build_from_items(
        tmp_path / "mem",
        builders.iter_webdataset(shards),
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
    report = builders.import_clip_retrieval(
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
    filt = builders.NearDuplicateFilter(encoder.encode_images(ims), threshold=0.999)
    report = builders.build_from_items(
        tmp_path / "mem",
        builders.iter_caption_table(caption_set),
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
        from reco.memory import builders
        open_clip.add_model_config({os.fspath(DATA / "reco-tiny-clip.json")!r})
        enc = OpenCLIPEncoder({name!r}, {str(weights)!r}, device="cpu")
        builders.build_from_items(sys.argv[1], builders.iter_caption_table({str(table)!r}),
                                  image_encoder=enc, batch_size=10, shard_rows=20,
                                  progress_bar=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "killed")])
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
    resumed = builders.build_from_items(
        tmp_path / "killed", builders.iter_caption_table(table), **kw
    )
    assert resumed.resumed_from > 0
    builders.build_from_items(tmp_path / "clean", builders.iter_caption_table(table), **kw)
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
