"""The `reco` command line: build-memory, memory info, search."""

from __future__ import annotations

import json

import pytest
from conftest import DATA, tiny_clip_args

from reco.cli import main

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("open_clip")


def test_build_info_search(tmp_path, image_tree, tiny_clip, capsys):
    out = tmp_path / "mem"
    args = ["build-memory", str(out), "--image-folder", str(image_tree), "--no-progress"]
    assert main(args + tiny_clip_args(tiny_clip) + ["--shard-rows", "5", "--batch-size", "4"]) == 0
    assert "12 rows" in capsys.readouterr().out
    assert main(["memory", "info", str(out), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 12 and info["labels"] == 2 and info["verified"] == "sha256"
    assert info["modalities"]["image"]["encoder"]["name"] == "open_clip:reco-tiny-clip"
    cfg = ["--model-config", str(DATA / "reco-tiny-clip.json")]
    assert main(["search", str(out), "--text", "a photo of a bee.", "-k", "3", *cfg]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "a photo of a" in lines[0]
    query = image_tree / "ant" / "2.png"
    assert (
        main(["search", str(out), "--image", str(query), "-k", "2", "--backend", "faiss", *cfg])
        == 0
    )
    first = capsys.readouterr().out.strip().splitlines()[0]
    # It finds itself (cosine 1 up to the float16 storage of the memory).
    assert float(first.split()[1]) > 0.999 and first.endswith("ant/2.png")
    # A where clause: only other classes' images, each line with its stable id.
    where = ["--where", "source NOT LIKE '%/ant/%'"]
    assert main(["search", str(out), "--image", str(query), "-k", "20", *where, *cfg]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all("/ant/" not in line for line in lines), lines
    assert all(line.split()[2] == "id" and line.split()[3].isdigit() for line in lines)
    assert main(["search", str(out), "--image", str(query), "--where", "nope(", *cfg]) == 2
    assert "where" in capsys.readouterr().err


def test_refuses_random_weights_and_bad_sources(tmp_path, image_tree, tiny_clip, capsys):
    cfg = ["--model-config", str(DATA / "reco-tiny-clip.json")]
    build = ["build-memory", str(tmp_path / "m"), "--image-folder", str(image_tree)]
    code = main([*build, "--model", tiny_clip[0], *cfg])
    assert code == 2 and "weights would be random" in capsys.readouterr().err
    code = main(["build-memory", str(tmp_path / "m"), "--model", tiny_clip[0], *cfg])
    assert code == 2 and "give exactly one source" in capsys.readouterr().err
    code = main(["memory", "info", str(tmp_path / "nothing")])
    assert code == 2 and "is not a reco memory" in capsys.readouterr().err
    code = main(
        [
            "build-memory",
            str(tmp_path / "m"),
            "--image-folder",
            str(image_tree),
            "--model",
            "no-such-arch",
            "--allow-random-weights",
        ]
    )
    assert code == 2 and "not an open_clip architecture" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_info_shows_the_cuda_emulation(arch, monkeypatch, capsys):
    from reco import ops

    if ops._C_emu is None:
        pytest.skip("reco was built without the CUDA emulation (_C_emu)")
    monkeypatch.setenv("RECO_EMULATE_CUDA", arch)
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cuda"] == f"emulated {arch}" and info["cuda_emulation"]


def test_info_refuses_an_unknown_emulated_gpu(monkeypatch, capsys):
    monkeypatch.setenv("RECO_EMULATE_CUDA", "sm_75")
    assert main(["info"]) == 2
    assert "RECO_EMULATE_CUDA must be sm_80, sm_90 or unset, got 'sm_75'" in capsys.readouterr().err
