"""`reco build-memory` on bad input: exit status 2 and one line naming the file or argument."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from conftest import tiny_clip_args

from reco.cli import main

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("open_clip")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _error(capsys, code: int) -> str:
    """The one-line message of a build that failed with exit status 2."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("reco build-memory: error: ")
    return err.strip()


def _clip_folder(root, parts=1, rows=4, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    for n in range(parts):
        for sub in ("img_emb", "text_emb"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            np.save(root / sub / f"{sub}_{n}.npy", rng.standard_normal((rows, dim), np.float32))
        (root / "metadata").mkdir(exist_ok=True)
        caps = [f"{root.name} {n}-{i}" for i in range(rows)]
        pq.write_table(pa.table({"caption": caps}), root / "metadata" / f"metadata_{n}.parquet")
    return root


def _build(out, *args) -> list[str]:
    return ["build-memory", str(out), "--no-progress", *args]


def _png(path, seed=0):
    rng = np.random.default_rng(seed)
    PIL.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_a_csv_field_over_the_limit(tmp_path, tiny_clip, capsys):
    _png(tmp_path / "a.png")
    table = tmp_path / "captions.csv"
    table.write_text(f"path,caption\na.png,short\na.png,{'x' * (5 << 20)}\n")
    enc = tiny_clip_args(tiny_clip)
    err = _error(capsys, main(_build(tmp_path / "m", "--captions", str(table), *enc)))
    assert "captions.csv:3: a field is longer than" in err
    # An unclosed quote is the usual cause; it is reported at the line where the field started.
    table.write_text('path,caption\na.png,"an unclosed quote\n' + "a.png,more\n" * 200_000)
    err = _error(capsys, main(_build(tmp_path / "m", "--captions", str(table), *enc)))
    assert "captions.csv:2: a field is longer than" in err
    assert not (tmp_path / "m").exists()


def test_clip_retrieval_one_dimensional_npy(tmp_path, capsys):
    folder = _clip_folder(tmp_path / "laion", parts=2)
    np.save(folder / "img_emb" / "img_emb_1.npy", np.ones(4, np.float32))
    err = _error(capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(folder))))
    assert "img_emb_1.npy holds float32 (4,), expected a 2-D [rows, dim] array" in err
    np.save(folder / "img_emb" / "img_emb_1.npy", np.ones((4, 3), np.float32))
    err = _error(capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(folder))))
    assert "img_emb_1.npy holds 3-d rows, img_emb_0.npy 8-d" in err
    np.save(folder / "img_emb" / "img_emb_1.npy", np.ones((5, 8), np.float32))
    err = _error(capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(folder))))
    assert "part 1: img_emb_1.npy has 5 rows, text_emb_1.npy 4, metadata_1.parquet 4" in err
    (folder / "img_emb" / "img_emb_1.npy").write_bytes(b"not an array")
    err = _error(capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(folder))))
    assert "img_emb_1.npy is not a readable .npy file" in err
    assert not (tmp_path / "m").exists()


def test_clip_retrieval_garbled_parquet(tmp_path, capsys):
    folder = _clip_folder(tmp_path / "laion", parts=2)
    path = folder / "metadata" / "metadata_1.parquet"
    path.write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    err = _error(capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(folder))))
    assert f"{path} is not a readable Parquet file" in err
    assert not (tmp_path / "m").exists()


def test_clip_retrieval_parts_that_do_not_pair(tmp_path, capsys):
    folder = _clip_folder(tmp_path / "laion", parts=3)
    (folder / "text_emb" / "text_emb_1.npy").unlink()
    err = _error(capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(folder))))
    assert "parts do not pair up: part 1: no text_emb" in err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--shard-rows", "0"),
        ("--shard-rows", "-5"),
        ("--batch-size", "0"),
        ("--batch-size", "-1"),
        ("--encode-batch-size", "0"),
        ("--near-dup-threshold", "2"),
    ],
)
def test_bad_numbers(tmp_path, image_tree, tiny_clip, capsys, flag, value):
    args = _build(tmp_path / "m", "--image-folder", str(image_tree), flag, value)
    err = _error(capsys, main([*args, *tiny_clip_args(tiny_clip)]))
    assert f"{flag} must be" in err and value in err
    folder = _clip_folder(tmp_path / "laion")
    if flag != "--encode-batch-size":
        err = _error(
            capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(folder), flag, value))
        )
        assert f"{flag} must be" in err
    assert not (tmp_path / "m").exists()


def test_label_names(tmp_path, image_tree, tiny_clip, capsys):
    _png(tmp_path / "a.png")
    _tar(tmp_path / "s.tar", [("k0", {"png": (tmp_path / "a.png").read_bytes(), "txt": b"x"})])
    wds = ["--webdataset", str(tmp_path / "s.tar"), *tiny_clip_args(tiny_clip)]
    missing = tmp_path / "names.txt"
    err = _error(capsys, main(_build(tmp_path / "m", *wds, "--label-names", str(missing))))
    assert f"--label-names {missing}: no such file" in err
    err = _error(capsys, main(_build(tmp_path / "m", *wds, "--label-names", "/dev/zero")))
    assert "--label-names /dev/zero: not a regular file" in err
    missing.write_text("cat\ndog\ncat\n")
    err = _error(capsys, main(_build(tmp_path / "m", *wds, "--label-names", str(missing))))
    assert f"--label-names {missing}: 'cat' is there twice" in err
    missing.write_text("\n\n")
    err = _error(capsys, main(_build(tmp_path / "m", *wds, "--label-names", str(missing))))
    assert f"--label-names {missing} holds no names" in err
    missing.write_bytes(b"caf\xe9\n")
    err = _error(capsys, main(_build(tmp_path / "m", *wds, "--label-names", str(missing))))
    assert f"--label-names {missing} is not UTF-8 text" in err
    assert not (tmp_path / "m").exists()
    # Label names, but the samples carry no labels.
    missing.write_text("cat\ndog\n")
    err = _error(capsys, main(_build(tmp_path / "m", *wds, "--label-names", str(missing))))
    assert "s.tar#k0 has no label" in err
    # --label-names is for --webdataset (the other sources name their labels themselves).
    tree = ["--image-folder", str(image_tree), *tiny_clip_args(tiny_clip)]
    err = _error(capsys, main(_build(tmp_path / "m2", *tree, "--label-names", str(missing))))
    assert "--label-names applies to --webdataset only" in err


@pytest.mark.parametrize("kind", ["dev", "fifo", "dir"])
def test_captions_table_that_is_not_a_regular_file(tmp_path, tiny_clip, capsys, kind, deadline):
    path = {"dev": "/dev/zero", "fifo": tmp_path / "fifo.csv", "dir": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    args = _build(tmp_path / "m", "--captions", str(path), *tiny_clip_args(tiny_clip))
    with deadline(30):
        err = _error(capsys, main(args))
    assert f"{path}: not a regular file" in err
    assert not (tmp_path / "m").exists()


def test_options_that_do_not_apply_to_the_source(tmp_path, image_tree, tiny_clip, capsys):
    tree = ["--image-folder", str(image_tree), *tiny_clip_args(tiny_clip)]
    folder = str(_clip_folder(tmp_path / "laion"))
    for args, what in (
        ([*tree, "--no-captions"], "--no-captions applies to --clip-retrieval only"),
        ([*tree, "--image-root", "x"], "--image-root applies to --captions only"),
        ([*tree, "--encoder-name", "x"], "--encoder-name applies to --clip-retrieval only"),
        (["--clip-retrieval", folder, "--template", "a {}"], "--template applies to --image-fo"),
        (["--clip-retrieval", folder, "--model", "x"], "--model does not apply to --clip-retr"),
        ([*tree, "--text-pretrained", "x"], "--text-pretrained needs --text-model"),
        ([*tree, "--template", "a {} of {}"], "template 'a {} of {}' must hold one '{}'"),
    ):
        assert what in _error(capsys, main(_build(tmp_path / "m", *args)))
    assert not (tmp_path / "m").exists()


def test_missing_sources(tmp_path, tiny_clip, capsys):
    enc = tiny_clip_args(tiny_clip)
    path = tmp_path / "nothing"
    for flag, what in (
        ("--image-folder", "image folder"),
        ("--webdataset", "WebDataset shard"),
        ("--captions", "captions table"),
        ("--clip-retrieval", "clip-retrieval folder"),
    ):
        args = [flag, str(path), *(enc if flag != "--clip-retrieval" else [])]
        err = _error(capsys, main(_build(tmp_path / "m", *args)))
        assert f"{what} {path}: no such" in err
    assert not (tmp_path / "m").exists()


def test_near_dup_eval_file(tmp_path, capsys):
    folder = str(_clip_folder(tmp_path / "laion"))
    bad = tmp_path / "eval.npy"
    for arr, what in (
        (np.ones(8, np.float32), "must be [M >= 1, d]"),
        (np.full((2, 8), np.nan, np.float32), "row 0 holds NaN or inf"),
        (np.ones((2, 5), np.float32), "5-d, the memory's image embeddings are 8-d"),
    ):
        np.save(bad, arr)
        args = _build(tmp_path / "m", "--clip-retrieval", folder, "--near-dup-eval", str(bad))
        err = _error(capsys, main(args))
        assert f"--near-dup-eval {bad}" in err and what in err
    bad.write_bytes(b"garbage")
    err = _error(
        capsys,
        main(_build(tmp_path / "m", "--clip-retrieval", folder, "--near-dup-eval", str(bad))),
    )
    assert f"--near-dup-eval {bad} is not a readable .npy file" in err
    assert not (tmp_path / "m").exists()


def test_resuming_from_another_source(tmp_path, capsys):
    a, b = _clip_folder(tmp_path / "a", seed=1), _clip_folder(tmp_path / "b", seed=2)
    assert main(_build(tmp_path / "m", "--clip-retrieval", str(a))) == 0
    assert "4 rows (4 added" in capsys.readouterr().out
    err = _error(capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(b))))
    assert "was built from another source" in err and "--append" in err
    assert main(_build(tmp_path / "m", "--clip-retrieval", str(b), "--append")) == 0
    assert "8 rows (4 added this run, resumed after 0" in capsys.readouterr().out
    # The appended source is the memory's source now: running it again resumes it.
    assert main(_build(tmp_path / "m", "--clip-retrieval", str(b))) == 0
    assert "8 rows (0 added this run, resumed after 4" in capsys.readouterr().out
    assert "another source" in _error(
        capsys, main(_build(tmp_path / "m", "--clip-retrieval", str(a)))
    )


def test_encoder_files(tmp_path, image_tree, tiny_clip, capsys):
    cfg = tiny_clip_args(tiny_clip)[-1]
    tree = ["--image-folder", str(image_tree), "--model", tiny_clip[0], "--model-config", cfg]
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"not a checkpoint" * 8)
    err = _error(capsys, main(_build(tmp_path / "m", *tree, "--pretrained", str(garbage))))
    assert f"--pretrained {garbage} cannot be loaded as a checkpoint of reco-tiny-clip" in err
    missing = tmp_path / "nothing.json"
    err = _error(capsys, main(_build(tmp_path / "m", *tree, "--model-config", str(missing))))
    assert f"--model-config {missing}: no such file" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    err = _error(capsys, main(_build(tmp_path / "m", *tree, "--model-config", str(bad))))
    assert f"--model-config {bad}: not a JSON model config" in err
    bad.write_text('{"embed_dim": 8}')
    err = _error(capsys, main(_build(tmp_path / "m", *tree, "--model-config", str(bad))))
    assert f"--model-config {bad}: not an open_clip model config" in err
    # A bad config is never registered: the next build finds the tiny model as before.
    err = _error(capsys, main(_build(tmp_path / "m", *tree, "--device", "cuda:99")))
    assert "--device cuda:99" in err
    assert not (tmp_path / "m").exists()


def test_webdataset_shards_that_are_not_tar_files(tmp_path, tiny_clip, capsys):
    shard = tmp_path / "s.tar"
    shard.write_bytes(b"x" * 3000)
    args = _build(tmp_path / "m", "--webdataset", str(shard), *tiny_clip_args(tiny_clip))
    err = _error(capsys, main(args))  # one line, although tarfile's message has several
    assert f"WebDataset shard {shard} is not a readable tar file" in err
