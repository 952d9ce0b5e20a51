"""Training: the models learn what the papers claim on synthetic tasks built here, resume exactly,
and train the same under DDP."""

from __future__ import annotations

import math
import multiprocessing
import re
import tempfile

import pytest
import torch
import yaml
from dist_workers import ddp_train, run
from synthetic import COUNTS, DV, C, D, long_tail_task
from torch import nn
from torch.nn import functional as F

from reco.cli import main
from reco.memory import EncoderInfo, MemoryWriter, ModalityInfo
from reco.models import (
    RECO,
    FusionConfig,
    LinearHead,
    MeanKNN,
    MemoryAttention,
    MemoryAttentionConfig,
    MLPHead,
    RECOConfig,
    RetrievalClassifier,
    Retriever,
)
from reco.train import (
    EmbeddingDataset,
    LongTailTask,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    batch_indices,
    logit_adjustment,
)


def train_and_score(model, data, test, retriever, steps=600, logit_adjust=None):
    torch.manual_seed(0)
    task = LongTailTask(retriever if model.aggregator is not None else None, "image", logit_adjust)
    cfg = TrainConfig(
        steps=steps,
        batch_size=128,
        lr=3e-3,
        weight_decay=1e-4,
        warmup_steps=10,
        log_every=100,
        progress=False,
    )
    Trainer(model, task, data, cfg, device="cpu").fit()
    model.eval()
    with torch.no_grad():
        pred = task.logits(model, {"image": test[0]}).argmax(1)
    correct = pred == test[1]
    few = torch.tensor(COUNTS)[test[1]] < 20
    return {"few": float(correct[few].float().mean()), "all": float(correct.float().mean())}


def _attention():
    return MemoryAttention(MemoryAttentionConfig(D, DV, dim=32, heads=1))


def test_memory_attention_lifts_few_shot_far_above_a_linear_head():
    data, test, retriever = long_tail_task(seed=0)
    linear = train_and_score(RetrievalClassifier(None, LinearHead(D, C)), data, test, retriever)
    attn = train_and_score(
        RetrievalClassifier(_attention(), LinearHead(D, C)), data, test, retriever
    )
    assert attn["few"] >= linear["few"] + 0.2, (linear, attn)
    assert attn["all"] > linear["all"], (linear, attn)


@pytest.mark.parametrize("combine", ["residual", "concat"])
def test_memory_attention_beats_mean_knn_with_half_the_memory_distractors(combine):
    data, test, retriever = long_tail_task(seed=2, distractors=0.5)
    knn = train_and_score(
        RetrievalClassifier(MeanKNN(), LinearHead(D + DV, C)), data, test, retriever
    )
    att = MemoryAttention(MemoryAttentionConfig(D, DV, dim=32, heads=1, combine=combine))
    attn = train_and_score(
        RetrievalClassifier(att, LinearHead(att.out_dim, C)), data, test, retriever
    )
    assert attn["all"] >= knn["all"] + 0.03, (knn, attn)


def test_logit_adjusted_loss_lifts_the_tail_of_a_linear_head():
    """tau log(prior) added to the training logits (Menon et al.): the plain logits come out
    balanced, so the few-shot classes of a balanced test set are recognised far more often."""
    data, test, retriever = long_tail_task(seed=1)
    adjust = logit_adjustment(torch.tensor(COUNTS), 1.0)
    plain = train_and_score(RetrievalClassifier(None, LinearHead(D, C)), data, test, retriever)
    adjusted = train_and_score(
        RetrievalClassifier(None, LinearHead(D, C)), data, test, retriever, logit_adjust=adjust
    )
    assert adjusted["few"] >= plain["few"] + 0.3, (plain, adjusted)
    assert adjusted["all"] > plain["all"], (plain, adjusted)


def test_logit_adjustment_offsets_and_loss():
    import numpy as np

    counts = torch.tensor([50, 5, 0, 45])
    got = logit_adjustment(counts, 0.5).numpy()
    n = np.array([50, 5, 1, 45], dtype=np.float64)  # an empty class counts as one
    np.testing.assert_allclose(got, 0.5 * np.log(n / n.sum()), rtol=1e-6)
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    model = RetrievalClassifier(None, nn.Identity())
    loss = LongTailTask(None, logit_adjust=torch.from_numpy(got))(
        model, {"image": logits, "label": labels}
    )
    x = logits.numpy() + got
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    assert float(loss) == pytest.approx(-logp[np.arange(6), labels.numpy()].mean(), rel=1e-5)
    with pytest.raises(ValueError, match="tau must be a number >= 0"):
        logit_adjustment(counts, -1.0)
    with pytest.raises(ValueError, match="counts must be a non-empty 1-D"):
        logit_adjustment(torch.ones(2, 2), 1.0)
    with pytest.raises(ValueError, match="logit_adjust has 3 classes, the model 4"):
        LongTailTask(None, logit_adjust=torch.zeros(3))(model, {"image": logits, "label": labels})


def _resumable_model():
    torch.manual_seed(3)
    att = MemoryAttention(MemoryAttentionConfig(D, DV, dim=32, heads=2, drop_retrieved=0.2))
    return RetrievalClassifier(att, MLPHead(D, C, hidden=64, dropout=0.3))


def test_resume_is_exact(tmp_path):
    """2N steps in one run == N steps, checkpoint, a fresh process state, N more (dropout and
    retrieval dropout make the RNG state matter)."""
    data, _, retriever = long_tail_task(seed=4)
    task = LongTailTask(retriever)
    cfg = dict(steps=20, batch_size=64, warmup_steps=4, log_every=5, progress=False)
    straight = _resumable_model()
    Trainer(straight, task, data, TrainConfig(**cfg), device="cpu").fit()
    first = _resumable_model()
    Trainer(first, task, data, TrainConfig(**cfg, out_dir=str(tmp_path)), device="cpu").fit(10)
    torch.manual_seed(999)  # the resumed run must not depend on the process's RNG
    resumed = _resumable_model()
    trainer = Trainer(resumed, task, data, TrainConfig(**cfg, out_dir=str(tmp_path)), device="cpu")
    trainer.fit()
    assert trainer.step == 20
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 4


@pytest.mark.parametrize("which", ["long_tail", "reco"])
def test_ddp_with_two_processes_equals_one_process(tmp_path, which):
    """The same global batches on 2 ranks or on 1: the same weights. For RECO the contrastive
    loss gathers the ranks' embeddings, so both runs see the same negatives."""
    ctx = multiprocessing.get_context("spawn")
    init, out = tempfile.mktemp(dir=tmp_path), tmp_path / "ddp.pt"
    procs = [ctx.Process(target=ddp_train, args=(r, 2, init, str(out), which)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    import synthetic

    model = getattr(synthetic, f"train_small_{which}_model")()  # one process
    ddp = torch.load(out)
    for name, t in model.state_dict().items():
        if name.endswith("attn.in_proj_bias"):
            # The key bias has an exactly zero gradient (softmax ignores a per-query constant);
            # Adam turns the rounding noise of that zero into full-size steps, different in
            # every summation order. Compare the query and value biases only.
            dim = t.shape[0] // 3
            t, ddp[name] = (
                torch.cat([t[:dim], t[2 * dim :]]),
                torch.cat([ddp[name][:dim], ddp[name][2 * dim :]]),
            )
        torch.testing.assert_close(ddp[name], t, atol=1e-5, rtol=1e-4)


def test_reco_training_raises_zero_shot_accuracy():
    """A small frozen "CLIP" whose image embeddings of half the classes sit far from their class
    text (rare concepts); the memory pairs images with their captions. RECO retrieves similar
    memory images and fuses their captions, which moves those images towards their class."""
    from reco.train import RECOTask

    g = torch.Generator().manual_seed(6)
    d = 32
    text_proto = F.normalize(torch.randn(C, d, generator=g), dim=1)
    gap = F.normalize(torch.randn(C, d, generator=g), dim=1)
    align = torch.tensor([0.9] * 5 + [0.25] * 5)  # the last five classes are poorly aligned

    def images(c, n):
        x = align[c] * text_proto[c] + (1 - align[c]) * 2 * gap[c]
        return F.normalize(x + 0.15 * torch.randn(n, d, generator=g), dim=1)

    def captions(c, n):
        return F.normalize(text_proto[c] + 0.15 * torch.randn(n, d, generator=g), dim=1)

    mem_img = torch.cat([images(c, 100) for c in range(C)])
    mem_txt = torch.cat([captions(c, 100) for c in range(C)])
    test_img, test_y = (
        torch.cat([images(c, 50) for c in range(C)]),
        torch.arange(C).repeat_interleave(50),
    )
    prompts = text_proto  # the class-name prompt embeddings

    cfg = RECOConfig(k=10, fusion=FusionConfig(dim=d, heads=4))
    torch.manual_seed(0)
    model = RECO(cfg)
    retrievers = {
        "image": Retriever(mem_img, mem_txt, k=10),
        "text": Retriever(mem_txt, mem_img, k=10),
    }
    data = EmbeddingDataset({"image": mem_img, "text": mem_txt, "row": torch.arange(len(mem_img))})
    train_cfg = TrainConfig(steps=300, batch_size=100, lr=2e-3, warmup_steps=20, progress=False)
    Trainer(model, RECOTask(retrievers, temperature=0.1), data, train_cfg, device="cpu").fit()
    model.eval()
    with torch.no_grad():
        frozen = (F.normalize(test_img, dim=1) @ prompts.T).argmax(1)
        v = model.refine("image", test_img, retrievers["image"])
        t = model.refine("text", prompts, retrievers["text"])
        refined = (v @ t.T).argmax(1)
    acc_frozen = float((frozen == test_y).float().mean())
    acc_reco = float((refined == test_y).float().mean())
    assert acc_reco >= acc_frozen + 0.15, (acc_frozen, acc_reco)


def test_bad_train_configs():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=10).validate()
    data = EmbeddingDataset(
        {"image": torch.randn(10, 4), "label": torch.zeros(10, dtype=torch.long)}
    )
    with pytest.raises(ValueError, match="exceeds the dataset's 10 rows"):
        Trainer(
            RetrievalClassifier(None, LinearHead(4, 2)),
            LongTailTask(None),
            data,
            TrainConfig(steps=2, batch_size=16, warmup_steps=0, progress=False),
        ).fit()


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", NAN),
        ("lr", INF),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("weight_decay", NAN),
        ("weight_decay", -0.1),
        ("steps", 0),
        ("batch_size", 0),
        ("log_every", 0),
        ("log_every", -5),
        ("checkpoint_every", -1),
        ("warmup_steps", -1),
        ("warmup_steps", 10),
        ("min_lr_ratio", NAN),
        ("min_lr_ratio", 1.5),
        ("grad_clip", NAN),
        ("grad_clip", INF),
        ("grad_clip", 0.0),
    ],
)
def test_train_config_numbers_are_finite_and_in_range(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got {value}"):
        TrainConfig(**{"steps": 10, "warmup_steps": 2, field: value}).validate()
    with pytest.raises(TypeError, match=rf"^{field} must be"):
        TrainConfig(**{"steps": 10, "warmup_steps": 2, field: "1"}).validate()


def _diverging_data(bad_row: int):
    data, _, retriever = long_tail_task(seed=3)
    data.tensors["image"] = data.tensors["image"].clone()
    data.tensors["image"][bad_row] = torch.inf
    return data, retriever


def test_a_non_finite_loss_stops_training_at_its_step():
    """An inf in one training item: the first step whose batch holds it raises, naming that step
    (as numbered in the metrics), before its update: the weights stay those of the step before."""
    bad_row, batch = 123, 64
    data, retriever = _diverging_data(bad_row)
    cfg = TrainConfig(steps=40, batch_size=batch, warmup_steps=2, progress=False)
    # The first global batch holding the row (batch_indices is the trainer's own batch order).
    step = next(s for s in range(40) if bad_row in batch_indices(len(data), batch, s, cfg.seed))
    torch.manual_seed(7)
    model = RetrievalClassifier(_attention(), LinearHead(D, C))
    trainer = Trainer(model, LongTailTask(retriever), data, cfg, device="cpu")
    with pytest.raises(TrainingDivergedError, match=rf"at step {step + 1}\b") as e:
        trainer.fit()
    assert isinstance(e.value, RuntimeError)  # `reco train` reports RuntimeErrors in one line
    assert trainer.step == step
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Under DDP the ranks agree to stop: each raises naming the step, none waits for the
    others in a collective."""
    out = tmp_path / "out"
    out.mkdir()
    init = tempfile.mktemp(dir=tmp_path)
    ctx = multiprocessing.get_context("spawn")
    args = {"bad_row": 123, "timeout": 60}
    procs = [
        ctx.Process(target=run, args=(r, 2, init, str(out), "diverge", args)) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        p.kill()
    assert not any(alive), "a rank hung"
    assert [p.exitcode for p in procs] == [0, 0]
    data, _ = _diverging_data(123)
    step = next(s for s in range(40) if 123 in batch_indices(len(data), 64, s, 0))
    for r in range(2):
        res = torch.load(out / f"rank{r}.pt", weights_only=False)
        assert "TrainingDivergedError" in res["error"] and f"at step {step + 1}" in res["error"]
        assert res["step"] == step


# -- `reco train` on bad configs -----------------------------------------------------------------


def _write_memory(path, embeddings: dict, labels=None):
    mods = {
        m: ModalityInfo(x.shape[1], "float32", EncoderInfo("synthetic"))
        for m, x in embeddings.items()
    }
    with MemoryWriter(path, mods, has_labels=labels is not None) as w:
        w.add(
            {m: x.numpy() for m, x in embeddings.items()},
            labels=None if labels is None else labels.numpy(),
        )


@pytest.fixture(scope="module")
def long_tail_memories(tmp_path_factory):
    """(train memory, retrieval memory) folders of the synthetic long-tail task."""
    root = tmp_path_factory.mktemp("lt")
    data, _, retriever = long_tail_task(seed=0)
    _write_memory(root / "train", {"image": data.tensors["image"]}, data.tensors["label"])
    keys, values = retriever.index.keys.shards[0], retriever.index.values.shards[0]
    _write_memory(root / "memory", {"image": keys, "text": values})
    return root / "train", root / "memory"


def _config(tmp_path, memories, section: str, key: str, value: str, method="longtail") -> str:
    """A YAML experiment config with section.key (key may be dotted; section "" for a top-level
    key) set to the YAML value `value`."""
    train, memory = memories
    cfg = {
        "method": method,
        "data": {"train": str(train), "memory": str(memory)},
        "longtail": {"k": 5, "heads": 2, "attention_dim": 32},
        "reco": {"k": 5, "fusion": {"dim": 32, "heads": 2}},
        "train": {
            "steps": 12,
            "batch_size": 64,
            "warmup_steps": 2,
            "log_every": 4,
            "out_dir": str(tmp_path / "run"),
            "progress": False,
        },
    }
    *parents, name = [p for p in (section, *key.split(".")) if p]
    table = cfg
    for p in parents:
        table = table[p]
    table[name] = yaml.safe_load(value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize(
    ("method", "section", "key", "value"),
    [
        ("longtail", "train", "lr", ".nan"),
        ("longtail", "train", "lr", ".inf"),
        ("longtail", "train", "lr", "-0.1"),
        ("longtail", "train", "weight_decay", ".nan"),
        ("longtail", "train", "grad_clip", ".nan"),
        ("longtail", "train", "log_every", "0"),
        ("longtail", "train", "steps", "0"),
        ("longtail", "train", "batch_size", "0"),
        ("longtail", "longtail", "heads", "0"),
        ("longtail", "longtail", "heads", "-2"),
        ("longtail", "longtail", "heads", "3"),  # does not divide attention_dim 32
        ("longtail", "longtail", "k", "0"),
        ("longtail", "longtail", "drop_retrieved", ".nan"),
        ("reco", "reco", "fusion.heads", "0"),
        ("reco", "reco", "fusion.heads", "-2"),
        ("reco", "reco", "fusion.mlp_ratio", ".nan"),
        ("reco", "reco", "k", "0"),
        ("reco", "", "temperature", ".nan"),
        ("reco", "", "temperature", "0"),
    ],
)
def test_reco_train_rejects_bad_config_values(
    tmp_path, long_tail_memories, capsys, method, section, key, value
):
    """Exit status 2 and one line naming the key, before any training (no traceback, and never
    exit 0 with a model trained to NaN)."""
    cfg = _config(tmp_path, long_tail_memories, section, key, value, method)
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err.strip()
    dotted = f"{section}.{key}" if section else key
    assert len(err.splitlines()) == 1 and err.startswith("reco train: error:"), err
    assert f"{dotted} must be" in err or f"{dotted}=" in err, err
    assert not (tmp_path / "run").exists()


def test_reco_train_rejects_a_nan_lr_in_toml(tmp_path, long_tail_memories, capsys):
    train, memory = long_tail_memories
    cfg = tmp_path / "nan.toml"
    cfg.write_text(
        f'method = "longtail"\n[data]\ntrain = "{train}"\nmemory = "{memory}"\n'
        "[longtail]\nheads = 2\n[train]\nsteps = 5\nbatch_size = 64\nwarmup_steps = 1\n"
        "lr = nan\nprogress = false\n"
    )
    assert main(["train", str(cfg)]) == 2
    assert "train.lr must be a finite number" in capsys.readouterr().err


def test_reco_train_stops_when_the_loss_goes_non_finite(tmp_path, long_tail_memories, capsys):
    """A learning rate far too large: the loss overflows within a few steps; `reco train`
    exits 2 with one line naming the step (it used to exit 0)."""
    cfg = _config(tmp_path, long_tail_memories, "train", "lr", "1.0e+30")
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(r"the loss is (nan|inf|-inf) at step \d+ of 12", err), err
