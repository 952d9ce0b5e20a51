"""The validation runs behind the long-tail defaults of `reco demo` / `reco study` (the loss, the
memory values, MemoryAttention's combine, logits and attention dropout): each variant trained
with two fixed configs, early-stopped, the better one's balanced validation accuracy kept,
averaged over seeds. Only the validation split is read: the data's test slot holds it too.

    python benchmarks/study_choices.py --dataset mnist --cache /tmp/cache --out choices-mnist.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from reco.demo.longtail import LongTailData, LongTailRun
from reco.demo.run import Demo, as_tensor, exponential_profile, long_tail_split
from reco.demo.select import stratified_holdout
from reco.demo.study import study_config

# name: "method, memory values, logit-adjustment tau, combine, attend, attention dropout"
VARIANTS = {
    "linear, text, plain CE": "linear text 0 residual learned 0",
    "MLP, text, plain CE": "mlp text 0 residual learned 0",
    "MemoryAttention residual, text, plain CE": "attention text 0 residual learned 0",
    "MLP, text, logit-adjusted": "mlp text 1 residual learned 0",
    "MemoryAttention residual, text, logit-adjusted": "attention text 1 residual learned 0",
    "MLP, both, logit-adjusted": "mlp both 1 residual learned 0",
    "mean k-NN, both, logit-adjusted": "mean_knn both 1 residual learned 0",
    "MemoryAttention residual, both, logit-adjusted": "attention both 1 residual learned 0",
    "MemoryAttention residual, both, LA, dropout 0.5": "attention both 1 residual learned 0.5",
    "MemoryAttention concat, both, LA": "attention both 1 concat learned 0",
    "MemoryAttention concat, both, LA, dropout 0.5": "attention both 1 concat learned 0.5",
    "MemoryAttention concat, scores, both, LA, dropout 0.5 (default)": (
        "attention both 1 concat scores 0.5"
    ),
}
CONFIGS = ({"lr": 1e-2, "weight_decay": 1e-4, "k": 10}, {"lr": 3e-3, "weight_decay": 0.05, "k": 10})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--imbalance", type=float, default=200.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--work", default="study-choices")
    ap.add_argument("--out", default="study_choices.json")
    a = ap.parse_args()
    cfg = study_config(quick=True).demo
    cfg = dataclasses.replace(cfg, dataset=a.dataset, out=a.work, cache=a.cache)
    demo = Demo(cfg)
    demo.encode_all = True
    demo.load()
    y = demo.train.labels
    infos = (demo.image_encoder.info(), demo.text_encoder.info())
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for s in a.seeds:
        profile = exponential_profile(demo.classes, demo.head_size(), a.imbalance)
        subset, rest, counts = long_tail_split(y, profile, seed=s)
        val, rest = stratified_holdout(y, rest, cfg.val_per_class, s)
        vz, vy = as_tensor(demo.train_f[val]), torch.from_numpy(y[val])
        data = LongTailData(
            as_tensor(demo.train_f[subset]),
            torch.from_numpy(y[subset]),
            torch.from_numpy(counts),
            vz,  # the test slot: never the test set here
            vy,
            vz,
            vy,
        )
        parts = [
            (demo.train, rest, demo.train_f[rest]),
            (demo.distr, np.arange(len(demo.distr)), demo.distr_f),
        ]
        mem, _ = demo._memory(f"choices-{a.dataset}-{s}", parts, cfg.noise, s, infos)
        runs: dict[str, LongTailRun] = {}
        for name, spec in VARIANTS.items():
            method, values, tau, combine, attend, drop = spec.split()
            p = dataclasses.replace(
                cfg.longtail,
                k=cfg.k,
                fusion_modality=values,
                logit_adjust=float(tau),
                combine=combine,
                attend=attend,
                drop_retrieved=float(drop),
            )
            run = runs.get(values)
            run = LongTailRun(data, mem, p, s, demo.device, kmax=20) if run is None else run
            runs[values] = run
            run.p = p  # the variant's loss and model; the memory values are the run's
            t0 = time.perf_counter()
            best = max(
                run.train(method, c, cfg.search.eval_every, cfg.search.patience).val_accuracy
                for c in CONFIGS
            )
            results[name].append(best)
            print(f"seed {s} {name}: {best:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = {n: {"mean": float(np.mean(v)), "per_seed": v} for n, v in results.items()}
    out = {"dataset": a.dataset, "imbalance": a.imbalance, "seeds": a.seeds, "val": table}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    for n, r in table.items():
        print(f"{100 * r['mean']:5.1f}  {n}")


if __name__ == "__main__":
    main()
