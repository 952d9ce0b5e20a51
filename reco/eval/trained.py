"""Evaluating trained experiments (`reco eval`): an experiment config's model with its trained
weights, zero-shot class prompts, and the metrics rows and table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..memory import Memory
from ..train.checkpoint import latest_checkpoint, load_checkpoint
from ..train.config import load_experiment
from ..train.run import build
from .encoders import add_model_configs, open_clip_encoder
from .metrics import (
    ShotBuckets,
    accuracy,
    image_text_retrieval,
    long_tail_accuracy,
    mean_per_class_accuracy,
    zero_shot_logits,
)
from .report import compare_methods


def load_trained(config: str | os.PathLike, checkpoint: str | os.PathLike | None = None):
    """The experiment config, the built experiment, with the trained weights loaded."""
    cfg = load_experiment(config)
    built = build(cfg)
    ckpt = checkpoint
    if ckpt is None and cfg.train.out_dir is not None:
        ckpt = latest_checkpoint(cfg.train.out_dir)
    if ckpt is None:
        raise ValueError("no checkpoint: pass --checkpoint or train first (train.out_dir)")
    load_checkpoint(ckpt, model=built.model, restore_rng=False)
    built.model.eval()
    return cfg, built, ckpt


def class_prompts(cfg, built, test):
    """[C, P, d] class prompt embeddings for zero-shot evaluation (see ZeroShotConfig)."""
    zs = cfg.zero_shot
    if zs.class_embeddings is not None:
        cls = torch.from_numpy(np.load(zs.class_embeddings)).float()
        return cls if cls.dim() == 3 else cls.unsqueeze(1)
    names = zs.class_names or test.manifest.label_names
    if not names:
        raise ValueError(
            "zero-shot needs zero_shot.class_embeddings, zero_shot.class_names or "
            "label names in the test memory"
        )
    if zs.model_config is not None:
        add_model_configs([zs.model_config], "zero_shot.model_config")
    info = built.memory.manifest.modalities["text"].encoder
    enc = open_clip_encoder(info.name.removeprefix("open_clip:"), info.checkpoint, "the checkpoint")
    texts = [t.format(n) for n in names for t in zs.templates]
    return enc.encode_texts(texts).unflatten(0, (len(names), len(zs.templates)))


def evaluate_experiment(
    config: str | os.PathLike, checkpoint: str | os.PathLike | None = None
) -> dict[str, dict]:
    """Metrics of one trained experiment, by row name (several rows for RECO: frozen CLIP and
    RECO); also written to train.out_dir/eval.json."""
    cfg, built, ckpt = load_trained(config, checkpoint)
    if cfg.data.test is None:
        raise ValueError(f"{config}: data.test (a memory folder of evaluation items) is required")
    test = Memory.open(cfg.data.test)
    if test.labels is None:
        raise ValueError(f"data.test={cfg.data.test} has no labels")
    rows: dict[str, dict] = {}
    with torch.no_grad():
        if cfg.method == "longtail":
            lt = cfg.longtail
            z = test.keys(lt.query_modality).materialize().float()
            logits = torch.cat(
                [
                    built.task.logits(built.model, {lt.query_modality: z[i : i + 4096]})
                    for i in range(0, len(z), 4096)
                ]
            )
            counts = torch.bincount(built.train_memory.labels, minlength=logits.shape[1])
            buckets = ShotBuckets(lt.many_above, lt.few_below)
            pred = logits.argmax(1)
            res = long_tail_accuracy(pred, test.labels, counts, buckets)
            res.update(accuracy(logits, test.labels))
            res["mean_class_acc"] = mean_per_class_accuracy(pred, test.labels, logits.shape[1])
            rows[f"{lt.aggregator}+{lt.head} ({Path(config).stem})"] = res
        else:
            cls = class_prompts(cfg, built, test)
            img = test.keys("image").materialize().float()
            retr = built.model.retrievers(built.memory)
            refined_cls = built.model.refine("text", cls.flatten(0, 1), retr["text"])
            refined_img = torch.cat(
                [
                    built.model.refine("image", img[i : i + 4096], retr["image"])
                    for i in range(0, len(img), 4096)
                ]
            )
            for name, (v, t) in {
                "frozen CLIP": (img, cls),
                f"RECO ({Path(config).stem})": (
                    refined_img,
                    refined_cls.unflatten(0, cls.shape[:2]),
                ),
            }.items():
                logits = zero_shot_logits(v, t)
                res = accuracy(logits, test.labels)
                res["mean_class_acc"] = mean_per_class_accuracy(
                    logits.argmax(1), test.labels, logits.shape[1]
                )
                rows[name] = res
            if "text" in test.modalities:
                txt = test.keys("text").materialize().float()
                pairs = torch.arange(len(txt))
                rows["frozen CLIP"]["retrieval"] = image_text_retrieval(img, txt, pairs)
                refined_txt = built.model.refine("text", txt, retr["text"])
                rows[f"RECO ({Path(config).stem})"]["retrieval"] = image_text_retrieval(
                    refined_img, refined_txt, pairs
                )
    for r in rows.values():
        r["checkpoint"] = str(ckpt)
    if cfg.train.out_dir is not None:
        out = Path(cfg.train.out_dir) / "eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2, default=float))
    return rows


def evaluate(configs: list[str], checkpoint: str | None = None) -> str:
    """`reco eval`: one table of every experiment's metrics (checkpoint: with a single config,
    this checkpoint instead of the latest)."""
    rows: dict[str, dict] = {}
    for config in configs:
        rows.update(evaluate_experiment(config, checkpoint if len(configs) == 1 else None))
    longtail = any("many" in r for r in rows.values())
    columns = ("many", "medium", "few", "all", "top1", "top5") if longtail else ("top1", "top5")
    return compare_methods(rows, (*columns, "mean_class_acc"))
