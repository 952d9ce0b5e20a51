"""The memory folder: round trips, commits, resume, locking, corruption and write failures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from reco.memory import (
    EncoderInfo,
    Memory,
    MemoryFormatError,
    MemoryLockedError,
    MemoryWriter,
    ModalityInfo,
)

MODS = {
    "image": ModalityInfo(12, "float16", EncoderInfo("enc-a", "/w/a.pt", "ab" * 32)),
    "text": ModalityInfo(5, "float32", EncoderInfo("enc-b")),
}


def _batch(rng, n, start):
    img = rng.standard_normal((n, 12)).astype(np.float32)
    txt = rng.standard_normal((n, 5)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    meta = {
        "caption": [f"item {start + i}" for i in range(n)],
        "source": [f"s{start + i}" for i in range(n)],
    }
    return img, txt, labels, meta


def _write(path, batches, shard_rows=10, **kw):
    rng = np.random.default_rng(0)
    data = []
    with MemoryWriter(
        path, MODS, has_labels=True, label_names=["a", "b", "c"], shard_rows=shard_rows, **kw
    ) as w:
        start = 0
        for n in batches:
            img, txt, lab, meta = _batch(rng, n, start)
            w.add(
                {"image": img, "text": txt},
                labels=lab,
                metadata=meta,
                progress={"consumed": start + n},
            )
            data.append((img, txt, lab, meta))
            start += n
    return data


def test_round_trip(tmp_path):
    data = _write(tmp_path / "m", [4, 7, 3, 9, 1])
    mem = Memory.open(tmp_path / "m", verify="full")
    assert mem.rows == 24
    assert len(mem.manifest.shards) == 3  # commits at 11, 23 pending rows, then 1 on close
    img = np.concatenate([d[0] for d in data])
    txt = np.concatenate([d[1] for d in data])
    np.testing.assert_array_equal(mem.keys("image").materialize().numpy(), img.astype(np.float16))
    np.testing.assert_array_equal(mem.values("text").materialize().numpy(), txt)
    np.testing.assert_array_equal(mem.labels.numpy(), np.concatenate([d[2] for d in data]))
    assert mem.metadata([0, 11, 23])[1]["caption"] == "item 11"
    assert mem.manifest.progress == {"consumed": 24}
    assert mem.manifest.modalities == MODS
    # Gathering rows across shards equals indexing the concatenation.
    rows = torch.tensor([[23, 0, 12], [5, 11, 10]])
    torch.testing.assert_close(
        mem.keys("image")[rows], torch.from_numpy(img.astype(np.float16))[rows]
    )


def test_files_are_memory_mapped(tmp_path):
    _write(tmp_path / "m", [30], shard_rows=100)
    t = Memory.open(tmp_path / "m").keys("image").shards[0]
    # The tensor's memory lies in a mapping of the shard file itself (no copy into RAM).
    addr, mapped_from = t.data_ptr(), None
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi:
            mapped_from = parts[-1]
    assert mapped_from is not None and mapped_from.endswith("shards/00000/image_emb.npy")


def test_uncommitted_rows_vanish_and_debris_is_removed(tmp_path):
    rng = np.random.default_rng(1)
    w = MemoryWriter(tmp_path / "m", MODS, has_labels=True, shard_rows=8)
    img, txt, lab, meta = _batch(rng, 8, 0)
    w.add({"image": img, "text": txt}, labels=lab, metadata=meta, progress={"consumed": 8})
    img, txt, lab, meta = _batch(rng, 3, 8)
    w.add({"image": img, "text": txt}, labels=lab, metadata=meta, progress={"consumed": 11})
    # A crash: the second batch was never committed; a half-written shard lies around.
    (tmp_path / "m" / "shards" / "00001.tmp-999").mkdir()
    (tmp_path / "m" / "shards" / "00001.tmp-999" / "image_emb.npy").write_bytes(b"garbage")
    w._release()
    mem = Memory.open(tmp_path / "m")
    assert mem.rows == 8 and mem.manifest.progress == {"consumed": 8}
    with MemoryWriter(tmp_path / "m", MODS, has_labels=True) as w2:
        assert w2.rows == 8 and w2.progress == {"consumed": 8}
        assert not (tmp_path / "m" / "shards" / "00001.tmp-999").exists()


def test_second_writer_is_refused(tmp_path):
    with MemoryWriter(tmp_path / "m", MODS):
        with pytest.raises(MemoryLockedError, match="being written by another process"):
            MemoryWriter(tmp_path / "m", MODS)
    MemoryWriter(tmp_path / "m", MODS).close()  # the lock is free again


def test_resume_with_other_encoders_is_refused(tmp_path):
    _write(tmp_path / "m", [5])
    other = dict(MODS, image=ModalityInfo(16, "float16", EncoderInfo("enc-c")))
    with pytest.raises(MemoryFormatError, match="built differently"):
        MemoryWriter(tmp_path / "m", other, has_labels=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image": np.zeros((2, 11), np.float32)}, r"embeddings\['image'\] must be \[n, 12\]"),
        ({"text": np.full((2, 5), np.nan, np.float32)}, r"contains NaN or inf"),
        ({"text": np.ones((3, 5), np.float32)}, r"different row counts"),
    ],
)
def test_bad_rows_are_refused(tmp_path, kwargs, match):
    emb = {"image": np.ones((2, 12), np.float32), "text": np.ones((2, 5), np.float32)}
    emb.update(kwargs)
    with MemoryWriter(tmp_path / "m", MODS) as w, pytest.raises(ValueError, match=match):
        w.add(emb)


def test_truncated_and_corrupt_shards_are_detected(tmp_path):
    _write(tmp_path / "m", [10, 10], shard_rows=10)
    f = tmp_path / "m" / "shards" / "00001" / "image_emb.npy"
    good = f.read_bytes()
    f.write_bytes(good[:-7])
    with pytest.raises(MemoryFormatError, match=r"00001/image_emb.npy is \d+ bytes, the manifest"):
        Memory.open(tmp_path / "m")
    f.write_bytes(good[:-2] + bytes([good[-2] ^ 0xFF]) + good[-1:])  # same size, one bit flipped
    Memory.open(tmp_path / "m")  # sizes agree
    with pytest.raises(MemoryFormatError, match="fails its sha256 check"):
        Memory.open(tmp_path / "m", verify="full")
    (tmp_path / "m" / "shards" / "00001" / "text_emb.npy").unlink()
    with pytest.raises(MemoryFormatError, match=r"text_emb\.npy is missing"):
        Memory.open(tmp_path / "m")


def test_bad_manifests(tmp_path):
    with pytest.raises(MemoryFormatError, match=r"no manifest\.json"):
        Memory.open(tmp_path)
    _write(tmp_path / "m", [4])
    man = tmp_path / "m" / "manifest.json"
    d = json.loads(man.read_text())
    man.write_text(json.dumps(dict(d, rows=99)))
    with pytest.raises(MemoryFormatError, match="says rows=99 but its shards hold 4"):
        Memory.open(tmp_path / "m")
    man.write_text(json.dumps(dict(d, version=7)))
    with pytest.raises(MemoryFormatError, match="format version 7"):
        Memory.open(tmp_path / "m")
    man.write_text("{not json")
    with pytest.raises(MemoryFormatError, match="not valid JSON"):
        Memory.open(tmp_path / "m")


def test_disk_full_keeps_the_last_commit(tmp_path):
    """A real write failure: the child process may not grow files past 60 kB (RLIMIT_FSIZE makes
    the kernel fail the write with EFBIG, as a full disk fails it with ENOSPC)."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        from reco.memory import MemoryWriter, ModalityInfo, EncoderInfo, MemoryWriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        mods = {{"image": ModalityInfo(64, "float32", EncoderInfo("e")),
                 "text": ModalityInfo(64, "float32", EncoderInfo("e"))}}
        rng = np.random.default_rng(0)
        w = MemoryWriter({str(tmp_path / "m")!r}, mods, shard_rows=50)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
        rows = 50
        try:
            for i in range(100):
                emb = rng.standard_normal((rows, 64)).astype(np.float32)
                w.add({{"image": emb, "text": emb}}, progress={{"consumed": (i + 1) * rows}})
                rows += 50  # every shard is larger than the last, until one does not fit
        except MemoryWriteError as e:
            print("ERROR", e)
            sys.exit(0)
        sys.exit(1)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "the disk is full" in out.stdout and "stays at its last commit" in out.stdout
    mem = Memory.open(tmp_path / "m", verify="full")
    assert mem.rows > 0
    assert mem.rows == sum(50 * (i + 1) for i in range(len(mem.manifest.shards)))
    assert not list((tmp_path / "m" / "shards").glob("*.tmp*"))
