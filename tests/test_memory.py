"""The memory folder: round trips, commits, resume, locking, corruption and write failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import reco.memory.store as store
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


def _raise_at(point, nth=1, exc=KeyboardInterrupt):
    """A fault hook that raises exc at the nth time the commit sequence reaches point."""
    seen = []

    def hook(p):
        seen.append(p)
        if seen.count(point) == nth and p == point:
            raise exc()

    return hook


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


def test_uncommitted_rows_vanish_and_only_journaled_debris_is_removed(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    w = MemoryWriter(tmp_path / "m", MODS, has_labels=True, shard_rows=8)
    img, txt, lab, meta = _batch(rng, 8, 0)
    w.add({"image": img, "text": txt}, labels=lab, metadata=meta, progress={"consumed": 8})
    img, txt, lab, meta = _batch(rng, 3, 8)
    w.add({"image": img, "text": txt}, labels=lab, metadata=meta, progress={"consumed": 11})
    # A crash in the middle of writing the second shard: its files lie in a journaled folder.
    monkeypatch.setattr(store, "_fault_hook", _raise_at("shard:file", 2, SystemExit))
    with pytest.raises(SystemExit):
        w.commit()
    monkeypatch.setattr(store, "_fault_hook", None)
    (debris,) = [p for p in (tmp_path / "m" / "shards").iterdir() if ".tmp-" in p.name]
    # A folder the writer did not create (no journal lists it) is never treated as debris.
    (tmp_path / "m" / "shards" / "00001.tmp-999").mkdir()
    (tmp_path / "m" / "shards" / "00001.tmp-999" / "notes.txt").write_text("the user's")
    w._release()
    mem = Memory.open(tmp_path / "m")
    assert mem.rows == 8 and mem.manifest.progress == {"consumed": 8}
    with MemoryWriter(tmp_path / "m", MODS, has_labels=True) as w2:
        assert w2.rows == 8 and w2.progress == {"consumed": 8}
        assert not debris.exists()
        notes = tmp_path / "m" / "shards" / "00001.tmp-999" / "notes.txt"
        assert notes.read_text() == "the user's"
        img, txt, lab, meta = _batch(rng, 3, 8)
        w2.add({"image": img, "text": txt}, labels=lab, metadata=meta, progress={"consumed": 11})
    assert Memory.open(tmp_path / "m", verify="full").rows == 11


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
    with pytest.raises(MemoryFormatError, match=r"00001/image_emb.npy: \d+ bytes, the manifest"):
        Memory.open(tmp_path / "m")
    f.write_bytes(good[:-2] + bytes([good[-2] ^ 0xFF]) + good[-1:])  # same size, one bit flipped
    Memory.open(tmp_path / "m")  # sizes agree
    with pytest.raises(MemoryFormatError, match="fails its sha256 check"):
        Memory.open(tmp_path / "m", verify="full")
    (tmp_path / "m" / "shards" / "00001" / "text_emb.npy").unlink()
    with pytest.raises(MemoryFormatError, match=r"text_emb\.npy: no such file"):
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
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "the disk is full" in out.stdout and "stays at its last commit" in out.stdout
    mem = Memory.open(tmp_path / "m", verify="full")
    assert mem.rows > 0
    assert mem.rows == sum(50 * (i + 1) for i in range(len(mem.manifest.shards)))
    assert not list((tmp_path / "m" / "shards").glob("*.tmp*"))


# ---- crash safety: an interrupt or a write failure at every step of the commit sequence --------

SRC = {"kind": "test", "path": "/data/rows"}
ROWS, BATCH = 8, 2


def _rows():
    rng = np.random.default_rng(7)
    return _batch(rng, ROWS, 0)


def _build(path, shard_rows=3, source=SRC, append=False):
    """A deterministic resumable build: batches of BATCH rows, progress = rows consumed."""
    img, txt, lab, meta = _rows()
    with MemoryWriter(
        path,
        MODS,
        has_labels=True,
        label_names=["a", "b", "c"],
        shard_rows=shard_rows,
        source=source,
        append=append,
    ) as w:
        for s in range(int(w.progress.get("consumed", 0)), ROWS, BATCH):
            sl = slice(s, s + BATCH)
            w.add(
                {"image": img[sl], "text": txt[sl]},
                labels=lab[sl],
                metadata={c: v[sl] for c, v in meta.items()},
                progress={"consumed": s + BATCH},
            )


def _contents(path):
    mem = Memory.open(path, verify="full")
    return (
        mem.keys("image").materialize().numpy(),
        mem.values("text").materialize().numpy(),
        None if mem.labels is None else mem.labels.numpy(),
        mem.metadata(range(mem.rows)),
        mem.manifest.progress,
    )


def _assert_same(a, b):
    for x, y in zip(a[:3], b[:3]):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)
    assert a[3:] == b[3:]


def _fault_points(tmp_path, monkeypatch):
    points = []
    monkeypatch.setattr(store, "_fault_hook", points.append)
    _build(tmp_path / "reference")
    monkeypatch.setattr(store, "_fault_hook", None)
    return points


def _nth_point_raises(nths, exc):
    count = [0]

    def hook(p):
        count[0] += 1
        if count[0] in nths:
            raise exc()

    return hook


def _check_interrupted(path):
    """After an interrupt: the committed manifest loads, every file it names is intact, and
    everything else under shards/ is listed in the journal (so the next writer may remove it)."""
    if not (path / "manifest.json").exists():
        return
    man = store.read_manifest(path)
    if man.rows:
        Memory.open(path, verify="full")
    journal = path / ".journal.json"
    listed = set(json.loads(journal.read_text())["created"]) if journal.exists() else set()
    for p in (path / "shards").iterdir() if (path / "shards").exists() else ():
        assert p.name in {s.name for s in man.shards} or p.name in listed, p


@pytest.mark.parametrize("second", [None, 2], ids=["once", "again-while-exiting"])
def test_interrupt_at_every_step_leaves_a_loadable_memory_that_resumes(
    tmp_path, monkeypatch, second
):
    """Ctrl-C at each step of every commit (and a second Ctrl-C while the writer's exit commits
    what was buffered): the last commit loads, and resuming gives the uninterrupted memory."""
    points = _fault_points(tmp_path, monkeypatch)
    want = _contents(tmp_path / "reference")
    assert len(points) > 30
    for i in range(1, len(points) + 1):
        path = tmp_path / f"run{i}"
        nths = {i} if second is None else {i, i + second}
        monkeypatch.setattr(store, "_fault_hook", _nth_point_raises(nths, KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            _build(path)
        monkeypatch.setattr(store, "_fault_hook", None)
        _check_interrupted(path)
        _build(path)
        _assert_same(_contents(path), want)
        left = sorted(p.name for p in (path / "shards").iterdir())
        assert left == sorted(s.name for s in store.read_manifest(path).shards), (i, left)


def test_write_failure_at_every_step_keeps_the_last_commit(tmp_path, monkeypatch):
    points = _fault_points(tmp_path, monkeypatch)
    want = _contents(tmp_path / "reference")

    class DiskFull(OSError):
        def __init__(self):
            super().__init__(28, "No space left on device")

    for i in range(1, len(points) + 1):
        path = tmp_path / f"run{i}"
        monkeypatch.setattr(store, "_fault_hook", _nth_point_raises({i}, DiskFull))
        with pytest.raises(OSError):
            _build(path)
        monkeypatch.setattr(store, "_fault_hook", None)
        _check_interrupted(path)
        _build(path)
        _assert_same(_contents(path), want)


def test_commit_after_the_commit_point_is_idempotent(tmp_path, monkeypatch):
    """The interrupt seen in the field: just after the manifest is replaced. The writer's exit
    commits again; the shard just committed must stay, once."""
    w = MemoryWriter(tmp_path / "m", MODS, shard_rows=100)
    emb = {"image": np.ones((3, 12), np.float32), "text": np.ones((3, 5), np.float32)}
    w.add(emb, progress={"consumed": 3})
    monkeypatch.setattr(store, "_fault_hook", _raise_at("manifest:replaced", 1))
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    monkeypatch.setattr(store, "_fault_hook", None)
    w.commit()
    w.commit()
    w.close()
    mem = Memory.open(tmp_path / "m", verify="full")
    assert mem.rows == 3 and len(mem.manifest.shards) == 1
    assert mem.manifest.progress == {"consumed": 3}


def test_a_folder_that_is_not_a_memory_is_refused_and_left_alone(tmp_path):
    user = tmp_path / "photos"
    (user / "shards").mkdir(parents=True)
    (user / "shards" / "2024.jpg").write_bytes(b"the user's photo")
    (user / "notes.txt").write_text("keep me")
    before = sorted(str(p.relative_to(user)) for p in user.rglob("*"))
    with pytest.raises(ValueError, match=r"photos is not empty and is not a reco memory"):
        MemoryWriter(user, MODS)
    assert sorted(str(p.relative_to(user)) for p in user.rglob("*")) == before
    assert (user / "shards" / "2024.jpg").read_bytes() == b"the user's photo"
    with pytest.raises(ValueError, match="is a file, not a memory folder"):
        MemoryWriter(user / "notes.txt", MODS)
    # An empty folder, or one that only holds a crashed writer's own lock, is a new memory.
    (tmp_path / "empty").mkdir()
    MemoryWriter(tmp_path / "empty", MODS).close()
    (tmp_path / "lockonly").mkdir()
    (tmp_path / "lockonly" / ".lock").touch()
    MemoryWriter(tmp_path / "lockonly", MODS).close()


def _clip_retrieval_folder(root, parts=2, rows=4, dim=8, seed=0):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    for i in range(parts):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", rng.standard_normal((rows, dim), "f4"))
        np.save(root / "text_emb" / f"text_emb_{i}.npy", rng.standard_normal((rows, dim), "f4"))
        caps = [f"part {i} row {r}" for r in range(rows)]
        pq.write_table(pa.table({"caption": caps}), root / "metadata" / f"metadata_{i}.parquet")
    return root


def test_build_memory_cli_refuses_a_users_folder(tmp_path, capsys):
    from reco.cli import main

    src = _clip_retrieval_folder(tmp_path / "laion")
    user = tmp_path / "out"
    (user / "shards" / "a").mkdir(parents=True)
    (user / "shards" / "a" / "thesis.tex").write_text("years of work")
    (user / "shards" / "b.txt").write_text("more")
    code = main(["build-memory", str(user), "--clip-retrieval", str(src), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "out is not empty and is not a reco memory" in err and "Traceback" not in err
    assert (user / "shards" / "a" / "thesis.tex").read_text() == "years of work"
    assert (user / "shards" / "b.txt").read_text() == "more"
    assert not (user / "manifest.json").exists()


def test_resume_only_continues_the_same_source(tmp_path):
    _build(tmp_path / "m", source=SRC)
    first = _contents(tmp_path / "m")
    other = {"kind": "test", "path": "/data/other"}
    with pytest.raises(store.MemorySourceError, match="built from another source") as e:
        _build(tmp_path / "m", source=other)
    assert "append" in str(e.value) and "another folder" in str(e.value)
    _assert_same(_contents(tmp_path / "m"), first)  # untouched
    _build(tmp_path / "m", source=other, append=True)  # all rows of the other source, after
    mem = Memory.open(tmp_path / "m", verify="full")
    assert mem.rows == 2 * ROWS
    np.testing.assert_array_equal(
        mem.keys("image").materialize().numpy(), np.concatenate([first[0], first[0]])
    )
    assert mem.manifest.source == other and mem.manifest.history == [SRC]
    _build(tmp_path / "m", source=other)  # the same source again: nothing left to add
    assert Memory.open(tmp_path / "m").rows == 2 * ROWS


def test_a_second_commit_of_an_interrupted_append_resumes_it(tmp_path, monkeypatch):
    _build(tmp_path / "m")
    other = {"kind": "test", "path": "/data/other"}
    monkeypatch.setattr(store, "_fault_hook", _raise_at("shard:file", 4))
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "m", source=other, append=True)
    monkeypatch.setattr(store, "_fault_hook", None)
    _build(tmp_path / "m", source=other, append=True)
    assert Memory.open(tmp_path / "m", verify="full").rows == 2 * ROWS


# ---- names and files read from a memory are untrusted ------------------------------------------


def _edit_manifest(path, edit):
    man = path / "manifest.json"
    d = json.loads(man.read_text())
    edit(d)
    man.write_text(json.dumps(d))


def _shard0(d):
    return d["shards"][0]


def _rename_file(d, old, new):
    files = _shard0(d)["files"]
    files[new] = files.pop(old)


CORRUPT = {
    "shard-parent": (
        lambda d: _shard0(d).update(name="../../x"),
        r"shard 0 name '\.\./\.\./x' is not a plain file name",
    ),
    "shard-absolute": (
        lambda d: _shard0(d).update(name="/etc"),
        r"shard 0 name '/etc' is not a plain file name",
    ),
    "file-key-traversal": (
        lambda d: _rename_file(d, "labels.npy", "../../../../../../etc/passwd"),
        r"file '\.\./\.\./.*passwd' is not a plain file name",
    ),
    "duplicate-shard": (
        lambda d: d.update(shards=d["shards"] + d["shards"][:1], rows=d["rows"] + 4),
        r"shard '00000' is listed twice",
    ),
    "modalities-list": (lambda d: d.update(modalities=["image"]), r"modalities is \['image'\]"),
    "modalities-empty": (lambda d: d.update(modalities={}), "lists no modalities"),
    "labels-without-file": (
        lambda d: _shard0(d)["files"].pop("labels.npy"),
        r"shard '00000' lists no labels\.npy",
    ),
    "rows-string": (lambda d: _shard0(d).update(rows="4"), r"rows is '4', expected an integer"),
    "dim-float": (
        lambda d: d["modalities"]["image"].update(dim=12.0),
        r"modality 'image' dim is 12\.0, expected an integer",
    ),
    "sha-not-hex": (
        lambda d: _shard0(d)["files"]["labels.npy"].update(sha256="zz"),
        "sha256 is 'zz', expected 64 hex digits",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_manifests_give_one_line_errors(tmp_path, capsys, case):
    from reco.cli import main

    edit, match = CORRUPT[case]
    _write(tmp_path / "m", [4])
    _edit_manifest(tmp_path / "m", edit)
    with pytest.raises(MemoryFormatError, match=match):
        Memory.open(tmp_path / "m")
    assert main(["memory", "info", str(tmp_path / "m"), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("reco memory: error:") and "manifest.json" in err


def test_binary_manifest(tmp_path, capsys):
    from reco.cli import main

    _write(tmp_path / "m", [4])
    (tmp_path / "m" / "manifest.json").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(MemoryFormatError, match="is not UTF-8 JSON text"):
        Memory.open(tmp_path / "m")
    assert main(["memory", "info", str(tmp_path / "m")]) == 2
    assert "not UTF-8 JSON text" in capsys.readouterr().err


def test_symlinks_out_of_the_memory_are_refused(tmp_path, deadline):
    with deadline(20):
        _write(tmp_path / "m", [4])
        shard = tmp_path / "m" / "shards" / "00000"
        secret = tmp_path / "secret.npy"
        (shard / "labels.npy").rename(secret)
        (shard / "labels.npy").symlink_to(secret)
        with pytest.raises(
            MemoryFormatError, match=r"labels\.npy' resolves to .*secret\.npy, outside"
        ):
            Memory.open(tmp_path / "m")
        (shard / "labels.npy").unlink()
        (shard / "labels.npy").symlink_to("/dev/zero")
        with pytest.raises(MemoryFormatError, match="outside the memory folder"):
            Memory.open(tmp_path / "m", verify="full")
        (shard / "labels.npy").unlink()
        secret.rename(shard / "labels.npy")
        man = tmp_path / "m" / "manifest.json"
        man.rename(tmp_path / "elsewhere.json")
        man.symlink_to("/dev/zero")
        with pytest.raises(MemoryFormatError, match=r"manifest\.json resolves to /dev/zero"):
            Memory.open(tmp_path / "m")
        with pytest.raises(MemoryFormatError, match="outside the memory folder"):
            MemoryWriter(tmp_path / "m", MODS, has_labels=True)


def test_non_regular_files_are_refused_without_blocking(tmp_path, deadline, capsys):
    from reco.cli import main

    with deadline(20):
        _write(tmp_path / "m", [4])
        f = tmp_path / "m" / "shards" / "00000" / "metadata.parquet"
        f.unlink()
        os.mkfifo(f)  # a reader that opened it would wait forever for a writer
        fifo = r"metadata\.parquet: not a regular file \(a FIFO\)"
        with pytest.raises(MemoryFormatError, match=fifo):
            Memory.open(tmp_path / "m")
        assert main(["memory", "info", str(tmp_path / "m"), "--verify"]) == 2
        assert ": not a regular file" in capsys.readouterr().err


def test_metadata_reads_are_checked(tmp_path):
    _write(tmp_path / "m", [4])
    mem = Memory.open(tmp_path / "m")
    with pytest.raises(TypeError, match="rows must be integers, got str"):
        mem.metadata("12")  # would be rows 1 and 2
    with pytest.raises(TypeError, match="rows must be integers, got dtype float64"):
        mem.metadata([1.7])
    with pytest.raises(IndexError, match=r"rows must be in \[0, 4\)"):
        mem.keys("image")[torch.tensor([-1])]  # would be the last row
    assert mem.metadata(np.array([3]))[0]["caption"] == "item 3"
    f = tmp_path / "m" / "shards" / "00000" / "metadata.parquet"
    size = f.stat().st_size
    f.write_bytes(b"PAR1" + b"\x07" * (size - 8) + b"PAR1")  # garbled, same size
    with pytest.raises(MemoryFormatError, match=r"metadata\.parquet is not readable Parquet"):
        Memory.open(tmp_path / "m").metadata([0])


def test_path_arguments(tmp_path):
    _write(tmp_path / "m", [4])
    assert Memory.open(os.fsencode(tmp_path / "m")).rows == 4  # bytes, as os functions take
    with pytest.raises(TypeError, match=r"path must be a path \(str, bytes or os.PathLike\)"):
        Memory.open(12)
    with pytest.raises(TypeError, match="path must be a path"):
        MemoryWriter(None, MODS)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"modalities": ["image", "text"]}, "modalities must be a non-empty dict"),
        ({"modalities": {}}, "modalities must be a non-empty dict"),
        ({"modalities": {"../x": MODS["image"]}}, "modality name '../x'"),
        ({"shard_rows": 0}, "shard_rows must be an integer >= 1, got 0"),
        ({"shard_rows": 2.5}, "shard_rows must be an integer >= 1, got 2.5"),
        ({"label_names": "abc"}, "label_names must be a list of strings"),
    ],
)
def test_bad_writer_arguments(tmp_path, kwargs, match):
    kw = {"modalities": MODS, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        MemoryWriter(tmp_path / "m", **kw)
    assert not (tmp_path / "m").exists()  # refused before anything was created


def test_a_refused_writer_prints_nothing_at_exit(tmp_path):
    script = (
        "from reco.memory import MemoryWriter\n"
        "try:\n    MemoryWriter('/nonexistent/m', {}, shard_rows=0)\n"
        "except ValueError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0 and "refused: shard_rows" in out.stdout
    assert out.stderr == "", out.stderr  # no "Exception ignored in __del__" traceback


@pytest.mark.parametrize(
    ("emb", "match"),
    [
        ({"image": [["a"] * 12] * 2}, r"embeddings\['image'\] must hold real numbers"),
        ({"image": "abcdefghijkl"}, r"embeddings\['image'\] must be an array, got str"),
        ({"image": np.full((2, 12), 1e30, np.float32)}, r"beyond float16's range"),
    ],
)
def test_bad_rows_are_refused_before_anything_is_stored(tmp_path, emb, match):
    full = {"image": np.ones((2, 12), np.float32), "text": np.ones((2, 5), np.float32), **emb}
    with MemoryWriter(tmp_path / "m", MODS) as w:
        with pytest.raises((ValueError, TypeError), match=match):
            w.add(full)
        w.add({"image": np.ones((2, 12)), "text": np.ones((2, 5))}, metadata={"c": ["x", "y"]})
        with pytest.raises(TypeError, match=r"metadata\['c'\] must be a list of 2 values"):
            w.add({"image": np.ones((2, 12)), "text": np.ones((2, 5))}, metadata={"c": "xy"})
    assert Memory.open(tmp_path / "m").rows == 2


@pytest.mark.slow
def test_random_sigints_during_a_build_never_lose_a_commit(tmp_path):
    """Real Ctrl-C: SIGINT at a random time into `reco build-memory --shard-rows 1` (one commit a
    part), 50 times. Each time the memory loads, and resuming gives the uninterrupted memory."""
    import random
    import signal
    import time

    from reco.cli import main

    src = _clip_retrieval_folder(tmp_path / "laion", parts=12, rows=2)
    ROWS_ALL = 24

    def argv(out):
        return ["build-memory", str(out), "--clip-retrieval", str(src), "--shard-rows", "1"]

    assert main([*argv(tmp_path / "ref"), "--no-progress"]) == 0
    ref = tmp_path / "ref"
    want = _contents(ref)
    # Ctrl-C as a terminal delivers it, also where the tests run as a background job (which
    # starts with SIGINT ignored, and Python then keeps it ignored).
    child = (
        "import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import sys\nimport reco.ingest\nfrom reco.cli import main\n"
        "print('ready', flush=True)\n"
        "sys.exit(main(sys.argv[1:] + ['--no-progress']))\n"
    )

    def start(out):
        p = subprocess.Popen(
            [sys.executable, "-c", child, *argv(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,  # not the checkout, whose reco/ has no compiled core
        )
        assert p.stdout.readline().strip() == "ready"
        return p

    def _committed_rows(out):
        try:
            return json.loads((out / "manifest.json").read_text())["rows"]
        except (OSError, ValueError, KeyError):
            return -1

    # How long the commits take: from "ready" until the last commit is on disk.
    p = start(tmp_path / "timing")
    began = time.monotonic()
    while p.poll() is None and _committed_rows(tmp_path / "timing") < ROWS_ALL:
        time.sleep(0.005)
    build_s = time.monotonic() - began
    assert p.wait(timeout=120) == 0
    rng = random.Random(0)
    outcomes = {"mid-build": 0, "before the first commit": 0, "after the last": 0}
    for t in range(50):
        out = tmp_path / f"try{t}"
        p = start(out)
        # Wait for a random commit that leaves at least two to come (whatever the machine's
        # load), then a random part of one commit's time.
        target = rng.randrange(0, ROWS_ALL - 4, 2)
        while p.poll() is None and _committed_rows(out) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, build_s * 2 / ROWS_ALL))
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        # Only the interrupt itself may show (SIGINT after main returned kills silently).
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert (
            last in ("", "KeyboardInterrupt")
            or last.startswith("KeyboardInterrupt:")
            or (last.startswith("reco build-memory: interrupted"))
        ), err
        _check_interrupted(out)
        rows = store.read_manifest(out).rows if (out / "manifest.json").exists() else 0
        if rows:
            Memory.open(out, verify="full")
        done = "mid-build" if 0 < rows < ROWS_ALL else "after the last"
        outcomes[done if rows else "before the first commit"] += 1
        assert main([*argv(out), "--no-progress"]) == 0, t
        _assert_same(_contents(out), want)
    print(outcomes, f"build {build_s:.1f} s")
    assert outcomes["mid-build"] >= 25, outcomes


def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    from reco.memory.files import atomic_write

    target = tmp_path / "sub" / "f.bin"
    atomic_write(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first"

    def fails(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_bytes() == b"first"  # the old file, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]  # no temporary left


def test_importing_memory_loads_no_encoder_and_no_op(tmp_path):
    """memory/ is storage only. Run where the checkout's reco/ is not on the path."""
    plain = "import reco.memory, sys; assert 'reco.encoders' not in sys.modules"
    subprocess.run([sys.executable, "-c", plain], cwd=tmp_path, check=True)
    # reco/__init__.py exports the ops, so it is bypassed (an empty package on the same path) to
    # see what memory itself imports: nothing of reco outside reco.memory.
    bypass = textwrap.dedent(
        """
        import importlib.util, sys, types
        pkg = types.ModuleType("reco")
        pkg.__path__ = list(importlib.util.find_spec("reco").submodule_search_locations)
        sys.modules["reco"] = pkg
        import reco.memory
        other = sorted(m for m in sys.modules if m.startswith("reco.")
                       and not m.startswith("reco.memory"))
        assert not other, other
        """
    )
    subprocess.run([sys.executable, "-c", bypass], cwd=tmp_path, check=True)


def test_the_old_builders_path_still_works_and_warns(monkeypatch):
    import importlib

    import reco.ingest

    monkeypatch.delitem(sys.modules, "reco.memory.builders", raising=False)
    with pytest.warns(DeprecationWarning, match="import the builders from reco.ingest"):
        old = importlib.import_module("reco.memory.builders")
    assert old.__all__ == reco.ingest.__all__
    for name in reco.ingest.__all__:
        assert getattr(old, name) is getattr(reco.ingest, name)
