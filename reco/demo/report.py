"""The demo's report: report.json (every measured number), report.md (tables) and PNG figures."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.report import to_markdown
from .longtail import METHOD_NAMES

BUCKETS = ("many", "medium", "few", "all")


def _pm(s: dict[str, float]) -> str:
    if s["mean"] is None or s["mean"] != s["mean"]:  # a bucket without classes
        return "n/a"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table of formatted cells (reco.eval's writer, without alignment marks)."""
    return to_markdown([dict(zip(header, r)) for r in rows], header, align=False)


def longtail_table(lt: dict) -> str:
    rows = [
        [METHOD_NAMES[m], *(_pm(lt["table"][m][b]) for b in BUCKETS)]
        for m in METHOD_NAMES
        if m in lt["table"]
    ]
    return _table(["method", "many", "medium", "few", "all"], rows)


def noise_table(lt: dict) -> str:
    noises = list(lt["noise_sweep"])
    rows = []
    for m in ("linear", "mean_knn", "attention"):
        rows.append(
            [METHOD_NAMES[m]]
            + [
                f"{_pm(lt['noise_sweep'][n][m]['few'])} / {_pm(lt['noise_sweep'][n][m]['all'])}"
                for n in noises
            ]
        )
    return _table(["method", *(f"noise {float(n):.0%}: few / all" for n in noises)], rows)


def zeroshot_tables(zs: dict) -> str:
    main = _table(
        ["model", "seen classes", "unseen classes", "all"],
        [
            [name, *(_pm(r[s]) for s in ("seen", "unseen", "all"))]
            for name, r in zs["table"].items()
        ],
    )
    sf = zs["search_fusion"]
    if sf is None:
        return main, None, None

    def cell(key: str) -> str:
        r = sf[key]
        return f"{100 * r['unseen']:.1f} / {100 * r['all']:.1f}"

    grid = _table(
        ["search \\ fusion (unseen / all)", "uni-modal fusion", "cross-modal fusion"],
        [
            ["uni-modal search", cell("uni/uni"), cell("uni/cross")],
            ["cross-modal search", cell("cross/uni"), cell("cross/cross")],
        ],
    )
    ks = _table(
        ["k", "seen", "unseen", "all"],
        [
            [k, *(f"{100 * r[s]:.1f}" for s in ("seen", "unseen", "all"))]
            for k, r in zs["k_sweep"].items()
        ],
    )
    return main, grid, ks


def markdown(report: dict) -> str:
    cfg, lt, zs, data = report["config"], report["longtail"], report["zeroshot"], report["data"]
    seeds = list(range(cfg["seed"], cfg["seed"] + cfg["seeds"]))
    m = report["machine"]
    zmain, zgrid, zks = zeroshot_tables(zs)
    agree = [r[f"{cfg['noise']:g}"]["attention_fused"]["agreement"] for r in lt["runs"].values()]
    s0 = zs["setup"]
    return f"""# reco demo report

Dataset {data["dataset"]} ({data["train"]} training and {data["test"]} test images), distractors:
{data["distractors"]}. Image encoder {data["image_encoder"]} (ImageNet-pretrained, frozen), text
encoder {data["text_encoder"]} (frozen). Seeds {seeds}; accuracies in %, mean ± standard
deviation over the seeds. Machine: {m["cpu"]}, {m["threads"]} threads, device {m["device"]},
torch {m["torch"]}. Total time {report["timings_s"]["total"]:.0f} s.

## Experiment 1: long-tailed recognition (Iscen et al., CVPR 2023)

Long-tailed training set: {lt["train_size"]} images, per class {lt["profile"]} (class order
shuffled by seed); buckets many > 100, medium 20..100, few < 20 training images. Memory:
{lt["memory_size"]} captioned images (the training images not in the long-tailed set, plus the
distractors); keys are image features, values {_values(cfg)}. Memory noise
{cfg["noise"]:.0%} (half wrong-class, half irrelevant captions); k = {cfg["k"]}.
{_training(cfg["longtail"])}

{longtail_table(lt)}

The fused op (one retrieve-attend call per query chunk) predicts the same class as the ordinary
forward for {_agreement(min(agree))} (every seed).

{_noise_sweep(lt)}

## Experiment 2: RECO zero-shot (Iscen et al., ICLR 2024)

A small CLIP (linear projections of the frozen encoders into {cfg["zeroshot"]["dim"]} dims,
trained contrastively) sees {s0.get("pretrain")} captioned images of the seen classes
{s0.get("seen_classes")} (first seed; the seen classes are drawn per seed). RECO's fusion layers
are trained with the paper's loss on {s0.get("fusion_train")} other captioned images (of any class);
the memory ({s0.get("memory")} items, the rest) holds every class. Zero-shot with class prompts.
The control row evaluates the same RECO with the unseen classes' items taken out of the memory:
what remains of its gain on unseen classes was learnt by the fusion layers, not retrieved.

{zmain}

{_ablations(zgrid, zks, cfg["k"])}
Figure: `zeroshot.png`.
"""


def _training(lt: dict) -> str:
    """How experiment 1's models are trained (older reports lack the newer fields)."""
    tau = lt.get("logit_adjust", 0.0)
    loss = (
        f"the logit-adjusted cross-entropy (tau = {tau:g}: tau log(class prior) added to the "
        "training logits, Menon et al. 2021)"
        if tau
        else "the plain cross-entropy"
    )
    weights = (
        "a softmax of the retrieval scores over a learned temperature"
        if lt.get("attend", "learned") == "scores"
        else "from learned query and key projections"
    )
    att = (
        "[query ; mean of the retrieved values ; their weighted mean]"
        if lt.get("combine", "residual") == "concat"
        else "the query plus a projection of the values' weighted mean"
    )
    return (
        f"Every method trains with {loss}. MemoryAttention feeds its linear head {att}, the "
        f"weights {weights}; attention dropout {lt.get('drop_retrieved', 0.0):g} (each retrieved "
        "item hidden with that probability in training)."
    )


def _values(cfg: dict) -> str:
    if cfg["longtail"]["fusion_modality"] == "image":
        return "the items' image features (captions unused)"
    if cfg["longtail"]["fusion_modality"] == "both":
        return "the captions' text embeddings and the image features side by side"
    return "the captions' text embeddings"


def _agreement(fraction: float) -> str:
    if fraction == 1.0:
        return "every test image"
    return f"at least {100 * fraction:.2f}% of the test images"


def _swept(lt: dict) -> bool:
    """Whether experiment 1 ran at more than its main noise level (`reco demo --ablations`)."""
    return len(lt["noise_sweep"]) > 1


def _noise_sweep(lt: dict) -> str:
    if not _swept(lt):
        return (
            "(The memory noise sweep was not run: `reco demo --ablations`.)\n\n"
            "Figures: `longtail_buckets.png`, `explain.png`."
        )
    return f"""Memory noise sweep (few-shot / all):

{noise_table(lt)}

Figures: `longtail_buckets.png`, `noise_sweep.png`, `explain.png`."""


def _ablations(grid: str | None, ks: str | None, k: int) -> str:
    if grid is None:
        return (
            "(The search x fusion table and the k sweep were not run: `reco demo --ablations`.)\n"
        )
    return f"""Search and fusion modality (first seed, k = {k}; unseen / all):

{grid}

Number of retrieved items (first seed, uni-modal search, cross-modal fusion):

{ks}
"""


def _noise_figure(plt: Any, lt: dict, noises: list[float], save) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, b in zip(axes, ("few", "all")):
        for m in ("linear", "mean_knn", "attention"):
            s = [lt["noise_sweep"][f"{n:g}"][m][b] for n in noises]
            ax.errorbar(
                [100 * n for n in noises],
                [100 * x["mean"] for x in s],
                yerr=[100 * x["std"] for x in s],
                marker="o",
                capsize=2,
                label=METHOD_NAMES[m],
            )
        ax.set_xlabel("memory caption noise (%)")
        ax.set_ylabel(f"{b} accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Robustness to a noisy memory")
    save(fig, "noise_sweep.png", 120)


def _figures(report: dict, out: Path, demo: Any) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name: str, dpi: int) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=dpi)
        plt.close(fig)
        made.append(name)

    lt, zs = report["longtail"], report["zeroshot"]
    methods = [m for m in METHOD_NAMES if m in lt["table"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        mean = [100 * lt["table"][m][b]["mean"] for b in BUCKETS]
        std = [100 * lt["table"][m][b]["std"] for b in BUCKETS]
        ax.bar(np.arange(4) + i * width, mean, width, yerr=std, label=METHOD_NAMES[m], capsize=2)
    ax.set_xticks(np.arange(4) + width * (len(methods) - 1) / 2, BUCKETS)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Long-tailed recognition by shot bucket")
    ax.legend(fontsize=8)
    save(fig, "longtail_buckets.png", 120)

    if _swept(lt):
        _noise_figure(plt, lt, [float(n) for n in lt["noise_sweep"]], save)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(zs["table"])
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        r = zs["table"][name]
        axes[0].bar(
            np.arange(3) + i * w,
            [100 * r[s]["mean"] for s in ("seen", "unseen", "all")],
            w,
            yerr=[100 * r[s]["std"] for s in ("seen", "unseen", "all")],
            capsize=2,
            label=name if len(name) < 40 else name[:38] + "…",
        )
    axes[0].set_xticks(np.arange(3) + w * (len(names) - 1) / 2, ["seen", "unseen", "all"])
    axes[0].set_ylabel("zero-shot accuracy (%)")
    axes[0].legend(fontsize=8)
    ks = list(zs["k_sweep"] or {})
    for s in ("seen", "unseen", "all") if ks else ():
        axes[1].plot([int(k) for k in ks], [100 * zs["k_sweep"][k][s] for k in ks], "o-", label=s)
    axes[1].set_xlabel("k (retrieved items), first seed")
    axes[1].set_ylabel("RECO zero-shot accuracy (%)")
    if ks:
        axes[1].legend(fontsize=8)
    fig.suptitle("RECO zero-shot")
    save(fig, "zeroshot.png", 120)

    ex = lt.get("explain") or []
    if ex and demo is not None:
        sets = {demo.train.source: demo.train, demo.distr.source: demo.distr}
        cols = 1 + len(ex[0]["neighbours"])
        fig, axes = plt.subplots(len(ex), cols, figsize=(1.3 * cols, 1.55 * len(ex)), squeeze=False)
        colour = {"correct": "black", "wrong": "red", "irrelevant": "darkorange"}
        for r, item in enumerate(ex):
            ax = axes[r, 0]
            ax.imshow(demo.test.images[item["test_index"]], cmap="gray")
            ax.set_title(f"{item['label']}\n→ {item['predicted']}", fontsize=6)
            for j, nb in enumerate(item["neighbours"], start=1):
                src, idx = nb["source"].rsplit("/", 1)
                axes[r, j].imshow(sets[src].images[int(idx)], cmap="gray")
                cap = nb["caption"]
                cap = cap if len(cap) <= 36 else cap[:35] + "…"
                axes[r, j].set_title(
                    f"w={nb['weight']:.2f}\n{cap[:18]}\n{cap[18:]}",
                    fontsize=5,
                    color=colour[nb["caption_kind"]],
                )
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(
            "Few-shot test images (left: true → predicted), their retrieved memory items, "
            "attention weights and captions (red: wrong, orange: irrelevant)",
            fontsize=7,
        )
        save(fig, "explain.png", 150)
    return made


def write_report(report: dict, out: str | os.PathLike, demo: Any = None) -> None:
    """Writes report.json, report.md and the figures into `out` (figures need matplotlib)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report["figures"] = _figures(report, out, demo)
    except ImportError:
        report["figures"] = []
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(markdown(report))


def _holds(h: bool | None) -> str:
    return "n/a" if h is None else ("holds" if h else "fails")


def _iv(iv: dict) -> str:
    if iv.get("mean") is None or iv["mean"] != iv["mean"]:
        return "no such classes"
    if iv.get("lo") is None or iv["lo"] != iv["lo"]:  # one seed: no interval
        return f"{100 * iv['mean']:+.1f}"
    return f"{100 * iv['mean']:+.1f} [{100 * iv['lo']:+.1f}, {100 * iv['hi']:+.1f}]"


def verdict_line(report: dict) -> str:
    """The study's verdict in one sentence, as report.md and the README quote it."""
    st = report["study"]
    n = {v: sum(c["holds"] is v for c in st["claims"]) for v in (True, False, None)}
    partial = "" if st.get("complete", True) else f" (partial: {len(st['missing'])} runs missing)"
    return (
        f"The study's verdict: **{st['verdict']}**{partial}: {n[True]} of {n[True] + n[False]} "
        f"claims that apply hold, {n[False]} fail; {n[None]} do not apply (no class of that "
        "setting has fewer than 20 training images, or only one seed ran)."
    )


def _levels_lines(levels: dict | None) -> list[str]:
    if not levels:
        return []
    st, runs = levels["setting"], levels["runs"]
    parts = [f"{r['level']} {100 * r['max_abs_diff']:.1f}" for r in runs[1:]]
    return [
        f"Reproducibility: the long-tail run {st['dataset']}/{st['imbalance']:g} seed "
        f"{st['seed']}, each time in a fresh process, first at {runs[0]['level']}, then again "
        f"and at the other CPU kernel levels; the largest accuracy difference to the first run, "
        f"in points, over every method and bucket: {', '.join(parts)} "
        "(`benchmarks/study_levels.py`).",
        "",
    ]


def study_markdown(report: dict) -> str:
    """report.md of `reco study`: every setting's table, the paired intervals, the claims and
    the verdict, the machine and the wall time."""
    cfg, st, m = report["config"], report["study"], report["machine"]
    seeds = list(range(cfg["seed"], cfg["seed"] + cfg["seeds"]))
    t = report["timings_s"]
    lines = [
        "# reco study report",
        "",
        verdict_line(report),
        "",
        *(
            []
            if st.get("complete", True)
            else [
                f"**Partial**: {len(st['missing'])} runs are missing (the study was cut short; "
                "each setting is summarised over the seeds it has): "
                + ", ".join(f"`{m}`" for m in st["missing"])
                + ".",
                "",
            ]
        ),
        f"Datasets {', '.join(cfg['datasets'])}; imbalance ratios "
        f"{', '.join(f'{r:g}' for r in cfg['imbalances'])}; seeds {seeds}; memory noise "
        f"{cfg['demo']['noise']:.0%}. Every choice (steps by early stopping, lr, weight decay, k; "
        "the small CLIP's and RECO's lr and temperature) was made on a class-stratified "
        "validation split carved from the training images (never the test set), with "
        f"{cfg['demo']['search']['trials']} trials of each method's declared search "
        "(`reco.demo.select.SearchSpace`). Accuracies in %, mean ± standard deviation over seeds; "
        f"differences with the {report['interval']}. Memory values: {_values(cfg['demo'])}. "
        + _training(cfg["demo"]["longtail"]),
        "",
        f"Machine: {m['cpu']}, {m['threads']} threads, device {m['device']}, torch "
        f"{m['torch']}, CPU kernel level {m['cpu_level']}. Wall time {t['total'] / 60:.0f} min "
        f"(the runs alone {t['units'] / 60:.0f} min).",
        "",
        *_levels_lines(report.get("levels")),
        "## Claims",
        "",
    ]
    rows = [[c["setting"], c["claim"], _iv(c["value"]), _holds(c["holds"])] for c in st["claims"]]
    lines += [_table(["setting", "claim", "difference (points)", ""], rows), ""]
    for ds in cfg["datasets"]:
        lines += [f"## {ds}", "", f"Figure: `study-{ds}.png`.", ""]
        for s in st["settings"].values():
            if s["dataset"] != ds:
                continue
            lines += [
                f"### Imbalance {s['imbalance']:g}",
                "",
                f"Per class {s['profile']} training images; validation {s['split']['val']}, "
                f"memory {s['split']['memory']} items.",
                "",
                longtail_table(s),
                "",
                _table(
                    ["MemoryAttention minus", "many", "medium", "few", "all"],
                    [
                        [METHOD_NAMES[b], *(_iv(s["differences"][b][x]) for x in BUCKETS)]
                        for b in s["differences"]
                    ],
                ),
                "",
            ]
        zs = st["zeroshot"].get(ds)
        if zs is None:
            lines += ["### RECO zero-shot", "", "(No run finished.)", ""]
            continue
        gains = [
            [row, _iv(g["minus small CLIP"]), _iv(g["minus control"])]
            for row, g in zs["gains"].items()
        ]
        lines += [
            "### RECO zero-shot",
            "",
            zeroshot_tables(zs)[0],
            "",
            _table(["unseen classes", "minus small CLIP", "minus its control"], gains),
            "",
            "The headline RECO row is `RECO search=uni fusion=cross`, the fusion layers starting "
            "as the identity (zero-initialised output projections); the paper-faithful row is the "
            "same single layer at the query token with the standard initialisation. The control "
            "rows evaluate the same trained model with the unseen classes removed from the memory.",
            "",
        ]
    return "\n".join(lines)


def _study_figures(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    st, cfg = report["study"], report["config"]
    for ds in cfg["datasets"]:
        sets = [s for s in st["settings"].values() if s["dataset"] == ds]
        if not sets:
            continue
        ratios = [s["imbalance"] for s in sets]
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
        for ax, b in zip(axes, ("few", "many", "all")):
            for m in METHOD_NAMES:
                if m not in sets[0]["table"]:
                    continue
                ax.errorbar(
                    ratios,
                    [100 * s["table"][m][b]["mean"] for s in sets],
                    yerr=[100 * s["table"][m][b]["std"] for s in sets],
                    marker="o",
                    capsize=2,
                    label=METHOD_NAMES[m],
                )
            ax.set_xscale("log")
            ax.set_xlabel("imbalance ratio")
            ax.set_ylabel(f"{b}-shot accuracy (%)" if b != "all" else "accuracy (%)")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{ds}: long-tailed recognition, mean ± std over {cfg['seeds']} seeds")
        fig.tight_layout()
        name = f"study-{ds}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made


def nan_to_none(x):
    """JSON has no NaN: an accuracy of a bucket without classes becomes null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


def write_study_report(report: dict, out: str | os.PathLike) -> None:
    """report.json, report.md and one figure per dataset of `reco study` into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        report["figures"] = _study_figures(report, out)
    except ImportError:
        report["figures"] = []
    (out / "report.json").write_text(json.dumps(nan_to_none(report), indent=1, default=str))
    (out / "report.md").write_text(study_markdown(report))
