"""`reco train`, `reco eval` and `reco explain` end to end on memories the tests build."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DATA, tiny_longtail_config
from synthetic import C, long_tail_task
from torch.nn import functional as F

from reco.cli import main
from reco.memory import EncoderInfo, MemoryWriter, ModalityInfo


def _write(path, embeddings: dict, labels=None, label_names=None):
    mods = {
        m: ModalityInfo(x.shape[1], "float32", EncoderInfo("synthetic"))
        for m, x in embeddings.items()
    }
    with MemoryWriter(path, mods, has_labels=labels is not None, label_names=label_names) as w:
        w.add(
            {m: x.numpy() for m, x in embeddings.items()},
            labels=None if labels is None else labels.numpy(),
        )


def _long_tail_memories(tmp_path) -> None:
    """train/, test/ (labelled) and memory/ folders of the synthetic long-tail task."""
    data, (x_test, y_test), retriever = long_tail_task(seed=0)
    names = [f"class{c}" for c in range(C)]
    _write(tmp_path / "train", {"image": data.tensors["image"]}, data.tensors["label"], names)
    _write(tmp_path / "test", {"image": x_test}, y_test, names)
    keys, values = retriever.index.keys.shards[0], retriever.index.values.shards[0]
    _write(tmp_path / "memory", {"image": keys, "text": values})


def test_train_and_eval_long_tail(tmp_path, capsys):
    _long_tail_memories(tmp_path)
    cfg = tmp_path / "lt.yaml"
    cfg.write_text(
        f"""
method: longtail
data: {{train: {tmp_path / "train"}, memory: {tmp_path / "memory"}, test: {tmp_path / "test"}}}
longtail: {{aggregator: attention, head: linear, k: 10, heads: 1, attention_dim: 32}}
train: {{steps: 300, batch_size: 128, lr: 0.003, weight_decay: 0.0001, warmup_steps: 10,
        out_dir: {tmp_path / "run"}, progress: false}}
"""
    )
    assert main(["train", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 300
    base = tmp_path / "linear.yaml"
    base.write_text(
        cfg.read_text()
        .replace("aggregator: attention", "aggregator: none")
        .replace(str(tmp_path / "run"), str(tmp_path / "run-linear"))
    )
    assert main(["train", str(base)]) == 0
    capsys.readouterr()
    assert main(["eval", str(cfg), str(base)]) == 0  # one table for both
    table = capsys.readouterr().out
    assert "attention+linear (lt)" in table and "none+linear (linear)" in table and "few" in table
    res = json.loads((tmp_path / "run" / "eval.json").read_text())["attention+linear (lt)"]
    lin = json.loads((tmp_path / "run-linear" / "eval.json").read_text())["none+linear (linear)"]
    bounds = {"many": "> 100 training images", "medium": "20..100", "few": "< 20"}
    assert res["boundaries"] == bounds
    assert res["all"] > 0.5 and res["few"] >= lin["few"] + 0.1, (res, lin)


def test_train_and_eval_reco_zero_shot(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    d = 32
    text_proto = F.normalize(torch.randn(C, d, generator=g), dim=1)
    gap = F.normalize(torch.randn(C, d, generator=g), dim=1)
    align = torch.tensor([0.9] * 5 + [0.25] * 5)

    def pairs(n):
        img = torch.cat(
            [
                F.normalize(
                    align[c] * text_proto[c]
                    + (1 - align[c]) * 2 * gap[c]
                    + 0.15 * torch.randn(n, d, generator=g),
                    dim=1,
                )
                for c in range(C)
            ]
        )
        txt = torch.cat(
            [
                F.normalize(text_proto[c] + 0.15 * torch.randn(n, d, generator=g), dim=1)
                for c in range(C)
            ]
        )
        return img, txt, torch.arange(C).repeat_interleave(n)

    img, txt, _ = pairs(100)
    _write(tmp_path / "memory", {"image": img, "text": txt})
    test_img, test_txt, test_y = pairs(30)
    _write(
        tmp_path / "test", {"image": test_img, "text": test_txt}, test_y, [str(c) for c in range(C)]
    )
    np.save(tmp_path / "classes.npy", text_proto.numpy())
    cfg = tmp_path / "reco.toml"
    cfg.write_text(
        f"""
method = "reco"
temperature = 0.1
[data]
train = "{tmp_path / "memory"}"
memory = "{tmp_path / "memory"}"
test = "{tmp_path / "test"}"
train_in_memory = true
[reco]
k = 10
[reco.fusion]
dim = 32
heads = 4
[zero_shot]
class_embeddings = "{tmp_path / "classes.npy"}"
[train]
steps = 300
batch_size = 100
lr = 0.002
warmup_steps = 20
out_dir = "{tmp_path / "run"}"
progress = false
"""
    )
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["eval", str(cfg)]) == 0
    assert "RECO" in capsys.readouterr().out
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert res["RECO (reco)"]["top1"] >= res["frozen CLIP"]["top1"] + 0.15, res
    assert set(res["RECO (reco)"]["retrieval"]) == {"image_to_text", "text_to_image"}


def test_config_errors_are_clear(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("method: longtail\ndata: {train: a, memory: b}\ntrain: {stpes: 10}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.stpes" in err and "steps" in err


def test_explain_writes_a_grid(tmp_path, image_tree, tiny_memory, capsys):
    PIL = pytest.importorskip("PIL.Image")
    cfg = tiny_longtail_config(tmp_path, tiny_memory)
    assert main(["train", str(cfg)]) == 0
    out = tmp_path / "grid.png"
    code = main(
        [
            "explain",
            str(image_tree / "bee" / "3.png"),
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--model-config",
            str(DATA / "reco-tiny-clip.json"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    im = PIL.open(out)
    assert im.format == "PNG" and im.size[0] > 300


def test_zero_shot_prompts_from_class_names(tmp_path, tiny_memory, capsys):
    """RECO eval without precomputed prompts: the test memory's label names and the templates are
    encoded with the memory's own text encoder (its recorded checkpoint)."""
    config_json = str(DATA / "reco-tiny-clip.json")
    cfg = tmp_path / "zs.yaml"
    cfg.write_text(
        f"""
method: reco
data: {{train: {tiny_memory}, memory: {tiny_memory}, test: {tiny_memory},
        train_in_memory: true}}
reco: {{k: 3, fusion: {{dim: 32, heads: 2}}}}
zero_shot:
  templates: ["a photo of a {{}}.", "a picture of a {{}}."]
  model_config: {config_json}
train: {{steps: 4, batch_size: 4, warmup_steps: 1, out_dir: {tmp_path / "run"}, progress: false}}
"""
    )
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["eval", str(cfg)]) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(res) == {"frozen CLIP", "RECO (zs)"}
    assert 0.0 <= res["frozen CLIP"]["top1"] <= 1.0


def test_train_and_evaluate_as_library_functions(tmp_path):
    """What `reco train` and `reco eval` call, without the CLI."""
    from reco.eval.trained import evaluate, evaluate_experiment, load_trained
    from reco.train.config import load_experiment
    from reco.train.run import train

    _long_tail_memories(tmp_path)
    cfg = tmp_path / "lt.yaml"
    cfg.write_text(
        f"""
method: longtail
data: {{train: {tmp_path / "train"}, memory: {tmp_path / "memory"}, test: {tmp_path / "test"}}}
longtail: {{aggregator: mean_knn, head: linear, k: 10}}
train: {{steps: 50, batch_size: 64, warmup_steps: 5, out_dir: {tmp_path / "run"}, progress: false}}
"""
    )
    with pytest.raises(ValueError, match="no checkpoint"):
        load_trained(cfg)
    last = train(load_experiment(cfg), steps=40)
    assert last["step"] == 40
    _, built, ckpt = load_trained(cfg)
    assert ckpt.name == "step-00000040.safetensors" and not built.model.training
    rows = evaluate_experiment(cfg)
    row = rows["mean_knn+linear (lt)"]
    assert {"many", "medium", "few", "all", "top1", "mean_class_acc"} <= row.keys()
    assert json.loads((tmp_path / "run" / "eval.json").read_text()).keys() == rows.keys()
    table = evaluate([str(cfg)])
    assert "mean_knn+linear (lt)" in table and "few" in table.splitlines()[0]


def test_explain_as_a_library_function(tmp_path, image_tree, tiny_memory):
    pytest.importorskip("matplotlib")
    from reco.eval.explain import explain
    from reco.train.config import load_experiment
    from reco.train.run import train

    cfg = tiny_longtail_config(tmp_path, tiny_memory)
    train(load_experiment(cfg))
    out = tmp_path / "grid.png"
    k = explain(
        image_tree / "bee" / "3.png",
        cfg,
        out=out,
        model_configs=[str(DATA / "reco-tiny-clip.json")],
    )
    assert k == 4 and out.stat().st_size > 0


def test_load_encoders_checks_its_arguments():
    from reco.eval.encoders import load_encoders, one_line

    with pytest.raises(ValueError, match="--model is required"):
        load_encoders(None)
    with pytest.raises(ValueError, match="is not a device"):
        load_encoders("RN50", device="gpu-ish")
    assert one_line(ValueError("a\n  b"), 300) == "a b"
    assert one_line(ValueError("x" * 20), 10) == "xxxxxxx..."
