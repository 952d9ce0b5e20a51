"""A living memory: stable ids, format-1 migration, delete (tombstones), add, compact, gc under
reader leases, crash safety of each step, and readers that hold one committed version."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import reco.memory.store as store
from reco.memory import EncoderInfo, Memory, MemoryFormatError, MemoryWriter, ModalityInfo
from reco.memory.leases import held_versions

DATA = Path(__file__).parent / "data"
DIM = 16
MODS = {
    "image": ModalityInfo(DIM, "float32", EncoderInfo("enc-a", "/w/a.pt", "ab" * 32)),
    "text": ModalityInfo(4, "float16", EncoderInfo("enc-b")),
}


def emb(ids):
    """The image embedding of each id: a fixed unit vector per id (so any reader can check that
    a row's data belongs to its id)."""
    out = np.stack([np.random.default_rng(int(i)).standard_normal(DIM) for i in ids])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def rows_for(ids):
    ids = np.asarray(ids)
    return {
        "embeddings": {"image": emb(ids), "text": np.tile(ids[:, None] % 7, (1, 4)).astype("f4")},
        "labels": ids % 3,
        "metadata": {"caption": [f"item {i}" for i in ids], "n": [int(i) * 10 for i in ids]},
    }


def build(path, n=12, shard_rows=4):
    """A memory whose row i has id i (ids are assigned in order from 0)."""
    with MemoryWriter(path, MODS, has_labels=True, shard_rows=shard_rows) as w:
        for s in range(0, n, 2):
            w.add(**rows_for(np.arange(s, min(s + 2, n))))


def add(path, n, shard_rows=4):
    """Adds n rows whose data belongs to the ids they will get (next_id onwards)."""
    with MemoryWriter.open(path, shard_rows=shard_rows) as w:
        first = w.next_id
        w.add(**rows_for(np.arange(first, first + n)))


def state(path):
    """What a reader sees: per live id its image and text rows, label and metadata, in row
    order; and the tombstoned ids."""
    with Memory.open(path, verify="full") as mem:
        ids = mem.ids.numpy()
        live = mem.live.numpy()
        img = mem.keys("image").materialize().numpy()
        txt = mem.values("text").materialize().numpy()
        meta = mem.metadata(range(mem.rows))
        assert len(ids) == len(live) == mem.rows == len(meta)
        assert (np.diff(ids) > 0).all()
        rows = {
            int(i): (img[r].tobytes(), txt[r].tobytes(), int(mem.labels[r]), meta[r])
            for r, i in enumerate(ids)
            if live[r]
        }
        return list(rows), rows, sorted(int(i) for i in ids[~live])


def live_ids(path):
    return state(path)[0]


def files_of(path):
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(path).rglob("*"))
        if p.is_file() and ".readers" not in p.parts
    }


# ---- ids ---------------------------------------------------------------------------------------


def test_ids_are_stable_and_never_reused(tmp_path):
    m = tmp_path / "m"
    build(m, n=12)
    with Memory.open(m) as mem:
        assert mem.ids.dtype == torch.int64 and mem.ids.tolist() == list(range(12))
        assert mem.live.dtype == torch.bool and bool(mem.live.all())
        v0 = mem.version
        np.testing.assert_array_equal(mem.keys("image").materialize().numpy(), emb(range(12)))
        assert mem.shard_of_rows().tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert mem.shard_of_rows([0, 5, 11]).tolist() == [0, 1, 2]
        assert mem.shard_offsets == [0, 4, 8, 12]
    with MemoryWriter.open(m) as w:
        assert w.delete([3, 5, 9, 10, 11]) == 5
    with Memory.open(m) as mem:
        assert mem.version == v0 + 1 and mem.rows == 12  # tombstoned rows stay until compaction
        assert [i for i, ok in zip(mem.ids.tolist(), mem.live.tolist()) if not ok] == [
            3,
            5,
            9,
            10,
            11,
        ]
    before = state(m)[1]
    with MemoryWriter.open(m) as w:
        rep = w.compact()
    assert rep.removed == 5 and rep.dropped == []  # shard 2 keeps id 8
    add(m, 3)
    with Memory.open(m) as mem:
        assert mem.ids.tolist() == [0, 1, 2, 4, 6, 7, 8, 12, 13, 14]  # 9..11 are never given again
        assert mem.rows_of([12, 0, 8]).tolist() == [7, 0, 6]
        assert mem.rows_of(torch.tensor([[4, 6]])).tolist() == [[3, 4]]
        with pytest.raises(ValueError, match=r"ids not in version \d+ of the memory .*: 3, 9, 99"):
            mem.rows_of([99, 3, 9, 0])
        with pytest.raises(TypeError, match="ids must be integers"):
            mem.rows_of([1.5])
        np.testing.assert_array_equal(mem.keys("image").materialize().numpy(), emb(mem.ids.numpy()))
        assert mem.metadata(mem.rows_of([13]))[0] == {"caption": "item 13", "n": 130}
    after = state(m)[1]
    assert {i: after[i] for i in before} == before  # every survivor: same data, same id


def test_a_format_1_memory_reads_with_row_ids_and_is_never_rewritten(tmp_path):
    """tests/data/memory-v1 was written by reco's format-1 writer (commit 4d5623d)."""
    m = tmp_path / "v1"
    shutil.copytree(DATA / "memory-v1", m)
    original = files_of(m)
    assert json.loads((m / "manifest.json").read_text())["version"] == 1
    with Memory.open(m, verify="full") as mem:
        assert mem.version == 0 and mem.rows == 8
        assert mem.ids.tolist() == list(range(8)) and bool(mem.live.all())
        assert mem.rows_of([7]).tolist() == [7]
        first = mem.keys("image").materialize().numpy()
    assert files_of(m) == original  # reading wrote nothing but a lease (removed on close)
    assert not list((m / ".readers").iterdir())
    # Writes add files and replace the manifest; no shard file of format 1 is rewritten.
    with MemoryWriter.open(m) as w:
        assert w.next_id == 8
        w.add(
            {"image": np.ones((2, 4)), "text": np.ones((2, 3))},
            labels=[0, 1],
            metadata={"caption": ["new 8", "new 9"], "source": ["x", "y"]},
        )
        w.delete([1, 8])
    now = files_of(m)
    shard_files = {f: h for f, h in original.items() if f.startswith("shards/")}
    assert {f: now[f] for f in shard_files} == shard_files
    manifest = json.loads((m / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["next_id"] == 10
    assert [s.get("first_id") for s in manifest["shards"]] == [0, 3, 6, None]
    with Memory.open(m, verify="full") as mem:
        assert mem.ids.tolist() == list(range(10))
        assert mem.live.tolist() == [i not in (1, 8) for i in range(10)]
        np.testing.assert_array_equal(mem.keys("image").materialize().numpy()[:8], first)
        assert mem.metadata([9])[0]["caption"] == "new 9"
    with MemoryWriter.open(m) as w:  # the user asks: compaction rewrites what holds deleted rows
        rep = w.compact()
    assert sorted(rep.rewritten) == ["00000", "00003"]
    with Memory.open(m, verify="full") as mem:
        assert mem.ids.tolist() == [0, 2, 3, 4, 5, 6, 7, 9]
        np.testing.assert_array_equal(
            mem.keys("image").materialize().numpy()[:7], first[[0, 2, 3, 4, 5, 6, 7]]
        )
        assert [r["caption"] for r in mem.metadata([0, 1, 7])] == ["item 0", "item 2", "new 9"]


def test_build_memory_resume_assigns_ids_once(tmp_path):
    """An interrupted build resumes; every row gets one id, in order, whatever the interrupt."""
    m = tmp_path / "m"
    hook = {"n": 0}

    def interrupt(point):
        hook["n"] += 1
        if hook["n"] == 25:
            raise KeyboardInterrupt

    store._fault_hook = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            with MemoryWriter(m, MODS, has_labels=True, shard_rows=2) as w:
                for s in range(0, 10, 2):
                    w.add(**rows_for(np.arange(s, s + 2)), progress={"consumed": s + 2})
    finally:
        store._fault_hook = None
    with MemoryWriter(m, MODS, has_labels=True, shard_rows=2) as w:
        for s in range(w.progress.get("consumed", 0), 10, 2):
            w.add(**rows_for(np.arange(s, s + 2)), progress={"consumed": s + 2})
    with Memory.open(m, verify="full") as mem:
        assert mem.ids.tolist() == list(range(10))
        np.testing.assert_array_equal(mem.keys("image").materialize().numpy(), emb(range(10)))


# ---- delete ------------------------------------------------------------------------------------


def test_delete_refuses_unknown_and_deleted_ids_and_writes_nothing(tmp_path):
    m = tmp_path / "m"
    build(m, n=8)
    with MemoryWriter.open(m) as w:
        w.delete(np.array([2, 2, 4]))  # a repeat counts once
    before = files_of(m)
    with MemoryWriter.open(m) as w:
        with pytest.raises(ValueError, match=r"ids not in the memory .*: 8, 1000"):
            w.delete([1, 8, 1000])
        with pytest.raises(ValueError, match=r"ids already deleted from .*: 2, 4$"):
            w.delete([4, 2, 3])
        with pytest.raises(ValueError, match="ids is empty"):
            w.delete([])
        with pytest.raises(ValueError, match="ids must be >= 0, got -1"):
            w.delete([-1])
        with pytest.raises(TypeError, match="ids must be integers, got dtype float64"):
            w.delete([1.0])
        with pytest.raises(TypeError, match="ids must be integers, got str"):
            w.delete("12")
        with pytest.raises(TypeError, match=r"ids must be integers, got torch\.bool"):
            w.delete(torch.tensor([True]))
    assert files_of(m) == before
    assert state(m)[2] == [2, 4]


def test_compact_drops_emptied_shards_and_keeps_every_column(tmp_path):
    m = tmp_path / "m"
    build(m, n=12)
    with MemoryWriter.open(m) as w:
        w.delete([4, 5, 6, 7, 0])  # all of shard 1, one row of shard 0
    want_ids, want, _ = state(m)
    v = store.read_manifest(m).commit  # 3 shard commits and the delete
    assert v == 4
    with MemoryWriter.open(m) as w:
        rep = w.compact()
    assert rep.removed == 5 and rep.dropped == ["00001"] and rep.rewritten == ["00000"]
    got_ids, got, dead = state(m)
    assert got_ids == want_ids and got == want and dead == []
    man = json.loads((m / "manifest.json").read_text())
    assert [s["name"] for s in man["shards"]] == ["00003", "00002"]  # new names, same order
    assert man["tombstones"] == [] and man["commit"] == v + 1
    (retired,) = man["retired"]
    assert retired["commit"] == v + 1 and retired["shards"] == ["00000", "00001"]
    assert all((m / "shards" / n).is_dir() for n in retired["shards"])  # retired, not removed
    with MemoryWriter.open(m) as w:
        again = w.compact()  # nothing to compact (no commit), but no reader: gc removes
    assert again.removed == 0 and store.read_manifest(m).commit == v + 1
    assert sorted(again.collected) == [
        "shards/00000",
        "shards/00001",
        f"tombstones/{retired['tombstones'][0]}",
    ]
    assert sorted(p.name for p in (m / "shards").iterdir()) == ["00002", "00003"]


# ---- readers, leases, gc -----------------------------------------------------------------------


def test_a_reader_keeps_its_version_until_refresh_and_gc_waits_for_it(tmp_path):
    m = tmp_path / "m"
    build(m, n=12)
    with MemoryWriter.open(m) as w:
        w.delete([1, 2, 3])
    reader = Memory.open(m)
    v = reader.version
    with MemoryWriter.open(m) as w:
        w.compact()
        gc = w.gc()
    assert gc.removed == [] and "shards/00000" in gc.kept and (m / "shards" / "00000").is_dir()
    add(m, 2)
    # The reader still sees its version, and still reads its (lazily read) metadata files.
    assert reader.version == v and reader.rows == 12 and reader.live.tolist()[1:4] == [False] * 3
    assert [r["caption"] for r in reader.metadata(range(12))] == [f"item {i}" for i in range(12)]
    assert reader.refresh() is True and reader.version == v + 2
    assert reader.ids.tolist() == [0, *range(4, 14)] and bool(reader.live.all())
    assert reader.refresh() is False
    (retired,) = store.read_manifest(m).retired
    with MemoryWriter.open(m) as w:
        gc = w.gc()
    assert retired.shards == ["00000"] and len(retired.tombstones) == 1
    assert sorted(gc.removed) == ["shards/00000", f"tombstones/{retired.tombstones[0]}"]
    assert not (m / "shards" / "00000").exists() and gc.kept == []
    assert json.loads((m / "manifest.json").read_text())["retired"] == []
    assert reader.metadata([0])[0]["caption"] == "item 0"
    reader.close()
    assert not list((m / ".readers").iterdir())


def test_leases_are_released_and_stale_ones_ignored(tmp_path):
    m = tmp_path / "m"
    build(m, n=8)
    mem = Memory.open(m)
    copy = mem.to("cpu")
    assert sorted(held_versions(m)) == [mem.version] * 2
    del mem, copy  # garbage collection releases them
    import gc

    gc.collect()
    assert held_versions(m) == []
    with MemoryWriter.open(m) as w:
        w.delete([0])
    # A reader killed without closing leaves its lease; its pid is dead, so the lease is stale.
    script = f"import os\nfrom reco.memory import Memory\nm = Memory.open({str(m)!r})\nos._exit(0)"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    (lease,) = (m / ".readers").iterdir()
    # A lease from another host counts until it is older than the grace period.
    other = m / ".readers" / "77-0123456789abcdef.json"
    other.write_text(json.dumps({"pid": 77, "host": "elsewhere", "version": 0, "start": None}))
    assert held_versions(m) == [0]
    with MemoryWriter.open(m) as w:
        w.compact()
        assert w.gc().removed == []  # the other host's reader may read anything
    old = time.time() - 2 * 24 * 3600
    os.utime(other, (old, old))
    with MemoryWriter.open(m) as w:
        assert "shards/00000" in w.gc().removed
    assert not lease.exists() and not other.exists()  # stale leases are removed by gc


# ---- crash safety: a fault at every step of add, delete, compact and gc ------------------------


def _op_add(path):
    add(path, 3)


def _op_delete(path):
    with MemoryWriter.open(path) as w:
        w.delete([1, 6, 9])


def _op_compact(path):
    with MemoryWriter.open(path) as w:
        w.compact()


def _op_gc(path):
    with MemoryWriter.open(path) as w:
        w.gc()


OPS = {"add": _op_add, "delete": _op_delete, "compact": _op_compact, "gc": _op_gc}


def _base(path, op):
    """Before op: 10 rows in 3 shards, rows of two deleted (and, for gc, more deleted and all
    compacted: retired files)."""
    build(path, n=10)
    with MemoryWriter.open(path) as w:
        w.delete([0, 4, 5] + ([1, 6, 9] if op == "gc" else []))
        if op == "gc":
            w.compact()


def _listed(path):
    """Names the manifest lists (live or retired) and the journal, per folder."""
    man = store.read_manifest(path)
    shards = {s.name for s in man.shards} | {n for r in man.retired for n in r.shards}
    stones = {t.name for t in man.tombstones} | {n for r in man.retired for n in r.tombstones}
    journal = path / ".journal.json"
    if journal.exists():
        j = json.loads(journal.read_text())
        shards |= set(j["created"])
        stones |= set(j.get("tombstones", []))
    return shards, stones


def _check_folder(path, exact=False):
    """Nothing under shards/ or tombstones/ that neither the manifest nor the journal lists
    (with exact: nothing the manifest does not list, and every live or retired file there,
    except retired files gc removed)."""
    shards, stones = _listed(path)
    for folder, names in (("shards", shards), ("tombstones", stones)):
        here = {p.name for p in (path / folder).iterdir()} if (path / folder).exists() else set()
        assert here <= names, (folder, here - names)
    if exact:
        man = store.read_manifest(path)
        assert {s.name for s in man.shards} <= {p.name for p in (path / "shards").iterdir()}


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_fault_at_every_step_leaves_the_last_commit_and_a_retry_completes(tmp_path, op):
    """Ctrl-C and a disk-full error at each fault point of the operation: the memory opens (all
    sha256 checked) at the state before or after it, nothing stray is left that a writer may not
    remove, and running the operation again (if it had not committed) gives the uninterrupted
    result."""
    base = tmp_path / "base"
    _base(base, op)
    pre = state(base)
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    points = []
    store._fault_hook = points.append
    try:
        OPS[op](ref)
    finally:
        store._fault_hook = None
    post = state(ref)
    assert (pre != post) == (op != "gc") and len(points) >= (3 if op == "gc" else 10)

    class DiskFull(OSError):
        def __init__(self):
            super().__init__(28, "No space left on device")

    for exc in (KeyboardInterrupt, DiskFull):
        for i in range(len(points)):
            path = tmp_path / f"{exc.__name__}{i}"
            shutil.copytree(base, path)

            def hook(p, i=i, exc=exc, count=[0]):  # noqa: B006 (a counter per run)
                count[0] += 1
                if count[0] == i + 1:
                    raise exc()

            store._fault_hook = hook
            try:
                with pytest.raises((KeyboardInterrupt, OSError)):
                    OPS[op](path)
            finally:
                store._fault_hook = None
            _check_folder(path)
            now = state(path)
            assert now in (pre, post), (exc.__name__, i, points[i])
            if now == pre or op == "gc":
                OPS[op](path)
            assert state(path) == post, (exc.__name__, i, points[i])
            MemoryWriter.open(path).close()  # a writer's recovery leaves only listed files
            _check_folder(path, exact=True)
            if op == "gc":
                assert store.read_manifest(path).retired == []
                assert sorted(p.name for p in (path / "shards").iterdir()) == sorted(
                    s.name for s in store.read_manifest(path).shards
                )


SEQUENCE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import reco.memory.store as store
    from reco.memory import MemoryWriter
    from test_memory_live import add
    kill_at = int(sys.argv[2])
    count = [0]
    def hook(point):
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    store._fault_hook = hook
    path = sys.argv[1]
    with MemoryWriter.open(path) as w:
        w.delete([2, 3, 8])
    print("deleted", flush=True)
    with MemoryWriter.open(path) as w:
        w.compact()
    print("compacted", flush=True)
    add(path, 3)
    print("added", flush=True)
    with MemoryWriter.open(path) as w:
        w.delete([12])
        w.gc()
    print("done", count[0], flush=True)
    """
)


def test_sigkill_at_any_step_of_a_sequence_leaves_a_committed_state(tmp_path):
    """A real process killed with SIGKILL (from inside, at a fault point: no timing) during
    delete, compact, add, delete + gc; the folder opens at one of the committed states, and a
    new writer completes the work."""
    base = tmp_path / "base"
    build(base, n=12)
    script = SEQUENCE.format(tests=str(Path(__file__).parent))
    ref = tmp_path / "ref"
    shutil.copytree(base, ref)
    out = subprocess.run(
        [sys.executable, "-c", script, str(ref), "0"], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    total = int(out.stdout.split()[-1])
    # The committed states, in order: what each step leaves.
    steps = [base]
    for name, op in (
        ("s1", _delete_238),
        ("s2", _op_compact),
        ("s3", lambda p: add(p, 3)),
        ("s4", lambda p: _delete_and_gc(p)),
    ):
        nxt = tmp_path / name
        shutil.copytree(steps[-1], nxt)
        op(nxt)
        MemoryWriter.open(nxt).close()
        steps.append(nxt)
    committed = [state(p) for p in steps]
    assert state(ref) == committed[-1]
    for kill_at in sorted({total // 4, total // 2, total - 2}):
        path = tmp_path / f"kill{kill_at}"
        shutil.copytree(base, path)
        out = subprocess.run(
            [sys.executable, "-c", script, str(path), str(kill_at)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert out.returncode == -signal.SIGKILL, (kill_at, out.stderr)
        _check_folder(path)
        assert state(path) in committed, kill_at
        MemoryWriter.open(path).close()  # the next writer cleans what the killed one left
        _check_folder(path)


def _delete_238(path):
    with MemoryWriter.open(path) as w:
        w.delete([2, 3, 8])


def _delete_and_gc(path):
    with MemoryWriter.open(path) as w:
        w.delete([12])
        w.gc()


# ---- a searcher in one process, a writer in another --------------------------------------------

SEARCHER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, torch
    sys.path.insert(0, {tests!r})
    from reco.index import Index
    from reco.memory import Memory
    from test_memory_live import emb
    path, ctl = sys.argv[1], sys.argv[2]
    mem = Memory.open(path)
    print(json.dumps({{"pid": os.getpid()}}), flush=True)
    seen, searches = {{}}, 0
    while True:
        last = os.path.exists(ctl + "/stop")  # one more pass after the writer is done
        checking = os.path.exists(ctl + "/check")
        if os.path.exists(ctl + "/hold"):  # the writer asks: keep this version for now
            if not os.path.exists(ctl + "/held"):
                with open(ctl + "/held.tmp", "w") as f:
                    f.write(str(mem.version))
                os.rename(ctl + "/held.tmp", ctl + "/held")
        else:
            mem.refresh()
        mem.verify()  # every file of the version held is there and intact
        ids = mem.ids.numpy()
        keys = mem.keys("image")
        assert keys.rows == mem.rows == len(ids) == len(mem.live), (keys.rows, len(ids))
        assert (np.diff(ids) > 0).all()
        assert int((~mem.live).sum()) == mem.manifest.deleted
        if mem.version not in seen:
            np.testing.assert_array_equal(keys.materialize().numpy(), emb(ids))
            seen[mem.version] = ids[mem.live.numpy()].tolist()
            print(json.dumps({{"version": mem.version, "live": seen[mem.version]}}), flush=True)
        picks = np.random.default_rng(searches).choice(len(ids), 3)
        res = Index(keys).search(torch.from_numpy(emb(ids[picks])), 2)
        assert res.indices[:, 0].tolist() == picks.tolist(), (res.indices, picks)
        meta = mem.metadata(picks)  # read lazily: the files of a held version must stay
        assert [m["caption"] for m in meta] == [f"item {{i}}" for i in ids[picks]]
        searches += 1
        if checking:  # a whole pass begun after the writer's gc is done
            os.remove(ctl + "/check")
        if last:
            break
    print(json.dumps({{"searches": searches}}), flush=True)
    """
)


def _leased(path, pid):
    """The version the lease of process pid holds (-1 while it cannot be read)."""
    for p in (path / ".readers").glob(f"{pid}-*.json"):
        try:
            return json.loads(p.read_text())["version"]
        except (OSError, ValueError, KeyError):
            pass
    return -1


def _wait_for(condition, proc):
    deadline = time.monotonic() + 120  # a safety net, never reached unless the searcher hangs
    while not condition():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the searcher did not answer"
        time.sleep(0.005)


def test_a_searcher_sees_only_committed_states_while_a_writer_edits(tmp_path):
    m = tmp_path / "m"
    build(m, n=20, shard_rows=5)
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SEARCHER.format(tests=str(Path(__file__).parent)),
            str(m),
            str(ctl),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        pid = json.loads(proc.stdout.readline())["pid"]
        committed = {}

        def record():
            """Notes the committed state, and waits until the searcher has moved to it."""
            with Memory.open(m) as mem:
                committed[mem.version] = mem.ids[mem.live].tolist()
                version = mem.version
            _wait_for(lambda: _leased(m, pid) >= version, proc)
            return version

        record()
        rng = np.random.default_rng(0)
        for round in range(4):
            add(m, 4, shard_rows=5)
            record()
            with MemoryWriter.open(m) as w:
                w.delete(rng.choice(live_ids(m), 3, replace=False))
            version = record()
            if round % 2:
                # The searcher holds the version before the compaction while the writer
                # compacts and collects, and searches and verifies it after the gc.
                (ctl / "hold").touch()
                _wait_for(lambda: (ctl / "held").exists(), proc)
                assert int((ctl / "held").read_text()) == version
                with MemoryWriter.open(m) as w:
                    w.compact()  # gc runs first: removes what no reader holds any more
                    kept = w.gc().kept
                assert kept and all((m / k).exists() for k in kept)
                (ctl / "check").touch()
                _wait_for(lambda: not (ctl / "check").exists(), proc)
                (ctl / "hold").unlink()
                (ctl / "held").unlink()
                record()
        (ctl / "stop").touch()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    seen = [line for line in lines if "version" in line]
    versions = [s["version"] for s in seen]
    assert versions == sorted(committed) and len(versions) == 1 + 4 * 2 + 2
    assert lines[-1]["searches"] >= len(seen)
    for s in seen:
        assert s["live"] == committed[s["version"]], s["version"]
    # Everything retired has been removed now that the searcher is gone.
    with MemoryWriter.open(m) as w:
        w.gc()
    assert sorted(p.name for p in (m / "shards").iterdir()) == sorted(
        s.name for s in store.read_manifest(m).shards
    )


def test_a_bad_tombstone_file_is_refused(tmp_path):
    m = tmp_path / "m"
    build(m, n=8)
    with MemoryWriter.open(m) as w:
        w.delete([1])
    (f,) = (m / "tombstones").iterdir()
    f.write_bytes(f.read_bytes()[:-1] + b"\x07")  # id 1 becomes another id, same size
    Memory.open(m)  # sizes agree
    with pytest.raises(MemoryFormatError, match=r"tombstone file .* fails its sha256 check"):
        Memory.open(m, verify="full")
    with pytest.raises(MemoryFormatError, match="corrupt tombstones"):
        _ = Memory.open(m).live
    with MemoryWriter.open(m) as w, pytest.raises(MemoryFormatError, match="corrupt tombstones"):
        w.compact()


# ---- the command line --------------------------------------------------------------------------


def test_memory_add_delete_compact_gc_from_the_command_line(tmp_path, capsys):
    from test_memory import _clip_retrieval_folder

    from reco.cli import main

    m = str(tmp_path / "m")
    a = _clip_retrieval_folder(tmp_path / "a", parts=2, rows=4, seed=1)
    b = _clip_retrieval_folder(tmp_path / "b", parts=1, rows=3, seed=2)
    c = _clip_retrieval_folder(tmp_path / "c", parts=1, rows=3, seed=3)
    common = ["--no-progress", "--shard-rows", "4"]
    assert (
        main(["build-memory", m, "--clip-retrieval", str(a), "--encoder-name", "e1", *common]) == 0
    )
    assert (
        main(["memory", "add", m, "--clip-retrieval", str(b), "--encoder-name", "e1", *common]) == 0
    )
    assert "ids 8..10 added" in capsys.readouterr().out
    # Rows encoded by another encoder are refused, naming both, before anything is written.
    before = files_of(m)
    code = main(["memory", "add", m, "--clip-retrieval", str(c), "--encoder-name", "e2", *common])
    err = capsys.readouterr().err
    assert code == 2 and "image encoder: the memory's is e1" in err and "the new rows' is e2" in err
    assert files_of(m) == before
    assert main(["memory", "add", str(tmp_path / "none"), "--clip-retrieval", str(c)]) == 2
    assert "is not a reco memory" in capsys.readouterr().err
    assert main(["memory", "delete", m, "--ids", "0,3"]) == 0
    assert "deleted 2 rows" in capsys.readouterr().out
    (tmp_path / "ids.txt").write_text("4\n5 9\n")
    assert main(["memory", "delete", m, "--ids-file", str(tmp_path / "ids.txt")]) == 0
    assert main(["memory", "delete", m, "--ids", "3,77"]) == 2
    err = capsys.readouterr().err
    assert "ids not in the memory" in err and err.strip().endswith(": 77")
    assert main(["memory", "delete", m, "--ids", "x1"]) == 2
    assert "--ids must list ids (integers >= 0), got 'x1'" in capsys.readouterr().err
    assert main(["memory", "delete", m]) == 2
    assert "give exactly one of --ids, --ids-file or --where" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["memory", "info", m, "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 11 and info["deleted"] == 5 and info["live_rows"] == 6
    assert info["ids"] == [0, 10] and info["next_id"] == 11
    assert main(["memory", "compact", m]) == 0
    assert "removed 5 tombstoned rows" in capsys.readouterr().out
    assert main(["memory", "gc", m]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["memory", "info", m, "--verify"]) == 0
    info2 = json.loads(capsys.readouterr().out)
    assert info2["rows"] == 6 and info2["deleted"] == 0 and info2["retired_files"] == 0
    assert info2["version"] > info["version"]
    with Memory.open(m) as mem:
        assert mem.ids.tolist() == [1, 2, 6, 7, 8, 10]
        captions = [r["caption"] for r in mem.metadata(range(6))]
    assert captions == [f"part 0 row {r}" for r in (1, 2)] + [f"part 1 row {r}" for r in (2, 3)] + [
        f"part 0 row {r}" for r in (0, 2)
    ]


def test_memory_delete_where(tmp_path, capsys):
    pytest.importorskip("duckdb")
    from reco.cli import main

    m = tmp_path / "m"
    build(m, n=10)
    with MemoryWriter.open(m) as w:
        w.delete([2])
    assert main(["memory", "delete", str(m), "--where", "n >= 50 OR id = 2"]) == 0
    assert "deleted 5 rows" in capsys.readouterr().out  # id 2 is deleted already: not again
    assert state(m)[2] == [2, 5, 6, 7, 8, 9]
    assert main(["memory", "delete", str(m), "--where", "id = 2"]) == 0  # deleted already
    assert "deleted 0 rows" in capsys.readouterr().out
    assert main(["memory", "delete", str(m), "--where", "id > 100"]) == 2
    assert "selects no rows" in capsys.readouterr().err


def test_a_deleted_row_may_be_added_again(tmp_path, capsys):
    """Exact-duplicate dropping on add compares with the live rows only."""
    from test_memory import _clip_retrieval_folder

    from reco.cli import main

    m = str(tmp_path / "m")
    a = _clip_retrieval_folder(tmp_path / "a", parts=2, rows=4, seed=1)
    shutil.copytree(a, tmp_path / "copy")
    assert main(["build-memory", m, "--clip-retrieval", str(a), "--no-progress"]) == 0
    assert main(["memory", "delete", m, "--ids", "2"]) == 0
    assert (
        main(["memory", "add", m, "--clip-retrieval", str(tmp_path / "copy"), "--no-progress"]) == 0
    )
    out = capsys.readouterr().out
    assert "ids 8..8 added" in out and "7 exact duplicates" in out
    with Memory.open(m) as mem:
        assert mem.ids.tolist() == list(range(9)) and mem.live.tolist() == [
            i != 2 for i in range(9)
        ]
        torch.testing.assert_close(
            mem.keys("image")[torch.tensor([8])], mem.keys("image")[torch.tensor([2])]
        )
