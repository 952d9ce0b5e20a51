"""Training: the models learn what the papers claim on synthetic tasks built here, resume exactly,
and train the same under DDP."""

from __future__ import annotations

import multiprocessing
import tempfile

import pytest
import torch
from dist_workers import ddp_train
from synthetic import COUNTS, DV, C, D, long_tail_task
from torch.nn import functional as F

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
from reco.train import EmbeddingDataset, LongTailTask, TrainConfig, Trainer


def train_and_score(model, data, test, retriever, steps=600):
    torch.manual_seed(0)
    task = LongTailTask(retriever if model.aggregator is not None else None)
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


def test_memory_attention_beats_mean_knn_with_half_the_memory_distractors():
    data, test, retriever = long_tail_task(seed=2, distractors=0.5)
    knn = train_and_score(
        RetrievalClassifier(MeanKNN(), LinearHead(D + DV, C)), data, test, retriever
    )
    attn = train_and_score(
        RetrievalClassifier(_attention(), LinearHead(D, C)), data, test, retriever
    )
    assert attn["all"] >= knn["all"] + 0.03, (knn, attn)


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
