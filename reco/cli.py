"""The `reco` command line: info, build-memory, memory info, search, train, eval, explain."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _info(_args: argparse.Namespace) -> int:
    import torch

    import reco
    from reco import ops

    info = {
        "reco": reco.__version__,
        "torch": torch.__version__,
        "compiled_core": ops._C is not None,
    }
    if ops._C is not None:
        info["cpu_levels"] = ops._C.cpu_levels()
        info["default_cpu_level"] = ops._C.default_cpu_level()
        info["with_cuda"] = bool(ops._C.with_cuda)
        # The CUDA kernels run only when enabled (they have not been validated on a GPU yet).
        info["cuda_kernel_enabled"] = ops.cuda_kernel_enabled()
    info["cuda_emulation_built"] = ops._C_emu is not None
    emulated = ops.emulated_cuda()  # ValueError for an unknown RECO_EMULATE_CUDA
    if emulated is not None:
        info["cuda"] = f"emulated {emulated}"  # CPU tensors take the CUDA path
    elif ops._C is not None and ops._C.with_cuda:
        info["cuda"] = "kernel" if ops.cuda_kernel_enabled() else "reference (RECO_CUDA_KERNEL=1)"
    else:
        info["cuda"] = "reference (built without CUDA)"
    info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(json.dumps(info, indent=2))
    return 0


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("encoders (open_clip; weights from local files only)")
    g.add_argument("--model", help="open_clip architecture name, e.g. ViT-B-32")
    g.add_argument("--pretrained", help="local open_clip checkpoint file for --model")
    g.add_argument(
        "--text-model", help="a different open_clip model for captions (default: --model)"
    )
    g.add_argument("--text-pretrained", help="checkpoint for --text-model")
    g.add_argument(
        "--model-config",
        action="append",
        default=[],
        help="extra open_clip model config JSON (its file name is the model name); repeatable",
    )
    g.add_argument(
        "--allow-random-weights",
        action="store_true",
        help="run without a checkpoint (random weights: only for tests)",
    )
    g.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    g.add_argument("--encode-batch-size", type=int, default=64)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _add_model_configs(paths: list[str], flag: str = "--model-config") -> None:
    """Registers open_clip model configs (files or folders of them) after checking each: open_clip
    keeps a registered path for good, so a bad file would break every later model lookup."""
    if not paths:
        return
    import open_clip

    for given in paths:
        path = Path(given)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{flag} {given}: no such file or folder (or not a regular file)")
            if f.suffix != ".json" or f.stat().st_size > 1 << 24:
                raise ValueError(f"{flag} {f}: not an open_clip model config (.json)")
            try:
                cfg = json.loads(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"{flag} {f}: not a JSON model config ({e})") from None
            if not isinstance(cfg, dict) or not all(
                k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
            ):
                raise ValueError(
                    f"{flag} {f}: not an open_clip model config (it needs embed_dim, vision_cfg "
                    "and text_cfg)"
                )
        open_clip.add_model_config(path)


def _open_clip(model: str, pretrained: str | None, flag: str, **kw):
    """An OpenCLIPEncoder; a checkpoint that does not load is an error naming flag."""
    import pickle

    from reco.encoders import OpenCLIPEncoder

    try:
        return OpenCLIPEncoder(model, pretrained, **kw)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        if pretrained is None:
            raise
        raise ValueError(
            f"{flag} {pretrained} cannot be loaded as a checkpoint of {model} ({_one_line(e)})"
        ) from None


def _encoders(args: argparse.Namespace):
    if args.model is None:
        raise ValueError("--model is required (an open_clip architecture name)")
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise ValueError(f"--device {args.device!r} is not a device ({e})") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0 or (device.index is not None and device.index >= count):
                raise ValueError(f"--device {args.device}: this machine has {count} CUDA devices")
    _add_model_configs(args.model_config)
    kw = {
        "device": args.device,
        "batch_size": args.encode_batch_size,
        "allow_random_weights": args.allow_random_weights,
    }
    image = _open_clip(args.model, args.pretrained, "--pretrained", **kw)
    if args.text_model is None:
        return image, image
    return image, _open_clip(args.text_model, args.text_pretrained, "--text-pretrained", **kw)


_SOURCES = ("--captions", "--image-folder", "--webdataset", "--clip-retrieval")
DEFAULT_TEMPLATE = "a photo of a {}."


def _check_build_args(args: argparse.Namespace) -> str:
    """The source flag given; every option checked against it before anything is read."""
    given = [f for f in _SOURCES if getattr(args, f[2:].replace("-", "_")) is not None]
    if len(given) != 1:
        raise ValueError(
            "give exactly one source: --captions, --image-folder, --webdataset or --clip-retrieval"
        )
    kind = given[0]
    for flag in ("--shard-rows", "--batch-size", "--encode-batch-size"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    t = args.near_dup_threshold
    if t is not None and not -1.0 <= t <= 1.0:
        raise ValueError(f"--near-dup-threshold must be a cosine in [-1, 1], got {t}")
    if t is not None and args.near_dup_eval is None:
        raise ValueError("--near-dup-threshold needs --near-dup-eval")
    only = {
        "--image-root": ("--captions", args.image_root),
        "--template": ("--image-folder", args.template),
        "--label-names": ("--webdataset", args.label_names),
        "--encoder-name": ("--clip-retrieval", args.encoder_name),
        "--text-encoder-name": ("--clip-retrieval", args.text_encoder_name),
        "--no-captions": ("--clip-retrieval", args.no_captions or None),
    }
    for flag, (source, value) in only.items():
        if value is not None and kind != source:
            raise ValueError(f"{flag} applies to {source} only")
    if kind == "--clip-retrieval":
        for flag in ("--model", "--pretrained", "--text-model", "--text-pretrained"):
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise ValueError(
                    f"{flag} does not apply to --clip-retrieval (its embeddings are imported as "
                    "they are; name their encoder with --encoder-name)"
                )
    elif args.text_pretrained is not None and args.text_model is None:
        raise ValueError("--text-pretrained needs --text-model (--pretrained is --model's)")
    return kind


def _build_memory(args: argparse.Namespace) -> int:
    from reco import ingest as builders

    kind = _check_build_args(args)
    near = None
    if args.near_dup_eval is not None:
        threshold = 0.95 if args.near_dup_threshold is None else args.near_dup_threshold
        near = builders.NearDuplicateFilter.from_file(
            args.near_dup_eval, threshold, what="--near-dup-eval"
        )
    common = {
        "dtype": args.dtype,
        "shard_rows": args.shard_rows,
        "dedup": not args.no_dedup,
        "near_duplicates": near,
        "append": args.append,
        "progress_bar": not args.no_progress,
    }
    if kind == "--clip-retrieval":
        report = builders.import_clip_retrieval(
            args.out,
            args.clip_retrieval,
            image_encoder=args.encoder_name or "unknown",
            text_encoder=args.text_encoder_name,
            captions=not args.no_captions,
            **common,
        )
    else:
        # The source is read and checked before the encoders load (a bad table fails at once).
        if kind == "--captions":
            items = builders.iter_caption_table(args.captions, args.image_root)
            label_names = items.label_names
        elif kind == "--image-folder":
            items = builders.iter_image_folder(args.image_folder, args.template or DEFAULT_TEMPLATE)
            label_names = items.label_names
        else:
            items = builders.iter_webdataset(args.webdataset)
            label_names = None
            if args.label_names is not None:
                label_names = builders.read_label_names(args.label_names, "--label-names")
        image_enc, text_enc = _encoders(args)
        report = builders.build_from_items(
            args.out,
            items,
            image_encoder=image_enc,
            text_encoder=text_enc,
            label_names=label_names,
            batch_size=args.batch_size,
            **common,
        )
    print(report.summary())
    return 0


def _memory_info(args: argparse.Namespace) -> int:
    from reco.memory import Memory

    mem = Memory.open(args.path, verify="full" if args.verify else "size")
    m = mem.manifest
    info = {
        "path": str(mem.root),
        "rows": mem.rows,
        "shards": len(m.shards),
        "bytes": sum(f.bytes for s in m.shards for f in s.files.values()),
        "modalities": {
            k: {"dim": v.dim, "dtype": v.dtype, "encoder": v.encoder.__dict__}
            for k, v in m.modalities.items()
        },
        "labels": len(m.label_names) if m.label_names else None,
        "source": m.source,
        "verified": "sha256" if args.verify else "sizes",
    }
    print(json.dumps(info, indent=2))
    return 0


def _search(args: argparse.Namespace) -> int:
    import torch

    from reco.index import Index
    from reco.memory import Memory

    if (args.image is None) == (args.text is None):
        raise ValueError("give exactly one query: --image PATH or --text STRING")
    mem = Memory.open(args.path)
    query_modality = "image" if args.image is not None else "text"
    info = mem.manifest.modalities[query_modality].encoder
    model = args.model or info.name.removeprefix("open_clip:")
    pretrained = args.pretrained or info.checkpoint
    _add_model_configs(args.model_config)
    enc = _open_clip(
        model,
        pretrained,
        "--pretrained",
        device=args.device,
        allow_random_weights=args.allow_random_weights,
    )
    if enc.sha256 is not None and info.sha256 is not None and enc.sha256 != info.sha256:
        raise ValueError(
            f"the checkpoint {pretrained} is not the one the memory's {query_modality} "
            "embeddings were built with (sha256 differs)"
        )
    if args.image is not None:
        from PIL import Image

        q = enc.encode_images([Image.open(args.image).convert("RGB")])
    else:
        q = enc.encode_texts([args.text])
    search_modality = args.search_modality or query_modality
    index = Index(
        mem.keys(search_modality),
        backend=args.backend,
        faiss_factory=args.faiss_factory,
        faiss_params=args.faiss_params,
    )
    res = index.search(q.to(torch.float32), min(args.k, mem.rows))
    rows = res.indices[0].tolist()
    for rank, (r, s, meta) in enumerate(zip(rows, res.scores[0].tolist(), mem.metadata(rows)), 1):
        print(f"{rank:3d}  {s:+.4f}  row {r}  {meta.get('caption')!r}  {meta.get('source')}")
    return 0


def _load_trained(args: argparse.Namespace):
    """The experiment config, the built experiment, with the trained weights loaded."""
    from reco.train.checkpoint import latest_checkpoint, load_checkpoint
    from reco.train.config import load_experiment
    from reco.train.run import build

    cfg = load_experiment(args.config)
    built = build(cfg)
    ckpt = args.checkpoint
    if ckpt is None and cfg.train.out_dir is not None:
        ckpt = latest_checkpoint(cfg.train.out_dir)
    if ckpt is None:
        raise ValueError("no checkpoint: pass --checkpoint or train first (train.out_dir)")
    load_checkpoint(ckpt, model=built.model, restore_rng=False)
    built.model.eval()
    return cfg, built, ckpt


def _train(args: argparse.Namespace) -> int:
    from reco.train.config import load_experiment
    from reco.train.run import train

    cfg = load_experiment(args.config)
    last = train(cfg, args.out_dir, args.steps)
    print(json.dumps({"out_dir": cfg.train.out_dir, **last}))
    return 0


def _class_prompts(cfg, built, test):
    """[C, P, d] class prompt embeddings for zero-shot evaluation (see ZeroShotConfig)."""
    import numpy as np
    import torch

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
        _add_model_configs([zs.model_config], "zero_shot.model_config")
    info = built.memory.manifest.modalities["text"].encoder
    enc = _open_clip(info.name.removeprefix("open_clip:"), info.checkpoint, "the checkpoint")
    texts = [t.format(n) for n in names for t in zs.templates]
    return enc.encode_texts(texts).unflatten(0, (len(names), len(zs.templates)))


def _eval_one(config: str, checkpoint: str | None) -> dict[str, dict]:
    """Metrics of one experiment (several rows for RECO: frozen CLIP and RECO)."""
    import torch

    from reco import eval as ev
    from reco.memory import Memory

    cfg, built, ckpt = _load_trained(argparse.Namespace(config=config, checkpoint=checkpoint))
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
            buckets = ev.ShotBuckets(lt.many_above, lt.few_below)
            pred = logits.argmax(1)
            res = ev.long_tail_accuracy(pred, test.labels, counts, buckets)
            res.update(ev.accuracy(logits, test.labels))
            res["mean_class_acc"] = ev.mean_per_class_accuracy(pred, test.labels, logits.shape[1])
            rows[f"{lt.aggregator}+{lt.head} ({Path(config).stem})"] = res
        else:
            cls = _class_prompts(cfg, built, test)
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
                logits = ev.zero_shot_logits(v, t)
                res = ev.accuracy(logits, test.labels)
                res["mean_class_acc"] = ev.mean_per_class_accuracy(
                    logits.argmax(1), test.labels, logits.shape[1]
                )
                rows[name] = res
            if "text" in test.modalities:
                txt = test.keys("text").materialize().float()
                pairs = torch.arange(len(txt))
                rows["frozen CLIP"]["retrieval"] = ev.image_text_retrieval(img, txt, pairs)
                refined_txt = built.model.refine("text", txt, retr["text"])
                rows[f"RECO ({Path(config).stem})"]["retrieval"] = ev.image_text_retrieval(
                    refined_img, refined_txt, pairs
                )
    for r in rows.values():
        r["checkpoint"] = str(ckpt)
    if cfg.train.out_dir is not None:
        out = Path(cfg.train.out_dir) / "eval.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2, default=float))
    return rows


def _eval(args: argparse.Namespace) -> int:
    from reco import eval as ev

    rows: dict[str, dict] = {}
    for config in args.configs:
        rows.update(_eval_one(config, args.checkpoint if len(args.configs) == 1 else None))
    longtail = any("many" in r for r in rows.values())
    columns = ("many", "medium", "few", "all", "top1", "top5") if longtail else ("top1", "top5")
    print(ev.compare_methods(rows, (*columns, "mean_class_acc")))
    return 0


def _explain(args: argparse.Namespace) -> int:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("reco explain draws with matplotlib: pip install 'reco[viz]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from PIL import Image

    cfg, built, _ = _load_trained(args)
    query_modality = cfg.longtail.query_modality if cfg.method == "longtail" else "image"
    if query_modality != "image":
        raise ValueError("explain shows image queries; this experiment queries with texts")
    info = built.train_memory.manifest.modalities["image"].encoder
    _add_model_configs(args.model_config)
    enc = _open_clip(
        args.model or info.name.removeprefix("open_clip:"),
        args.pretrained or info.checkpoint,
        "--pretrained",
        allow_random_weights=args.allow_random_weights,
    )
    image = Image.open(args.image).convert("RGB")
    with torch.no_grad():
        z = enc.encode_images([image])
        if cfg.method == "longtail":
            lt = cfg.longtail
            if cfg.longtail.aggregator != "attention":
                raise ValueError("explain needs an attention aggregator (longtail.aggregator)")
            r = built.task.retriever(z)
            weights = built.model.aggregator.attention_weights(z, r.values, r.keep)[0]
            k = lt.k
        else:
            r = built.model.retrievers(built.memory)["image"](z)
            weights = built.model.image_fusion.attention_weights(z, r.values, r.keep)[0, 1:]
            k = cfg.reco.k
    meta = built.memory.metadata(r.indices[0].tolist())
    cols = min(k, 5) + 1
    rows = (k + cols - 2) // (cols - 1)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("query", fontsize=9)
    for j, (m, w) in enumerate(zip(meta, weights.tolist())):
        ax = axes[j // (cols - 1), 1 + j % (cols - 1)]
        src = Path(str(m.get("source") or ""))
        if src.is_file():
            ax.imshow(Image.open(src).convert("RGB"))
        else:
            ax.text(0.5, 0.5, "(no image)", ha="center", va="center", fontsize=8)
        caption = str(m.get("caption") or "")[:40]
        ax.set_title(f"w={w:.3f}\n{caption}", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}: {k} neighbours with their attention weights")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from reco.demo import Demo, DemoConfig, LongTailParams, ZeroShotParams

    lt, zs = LongTailParams(), ZeroShotParams()
    if args.quick:  # the reduced demo the tests run: fewer images, one seed, shorter training
        lt = dataclasses.replace(lt, steps=500)
        zs = dataclasses.replace(
            zs, pretrain=4000, fusion_train=2000, clip_steps=300, reco_steps=300, ablations=False
        )
    cfg = DemoConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        seed=args.seed,
        seeds=args.seeds if args.seeds is not None else (1 if args.quick else 3),
        head=args.head,
        imbalance=args.imbalance,
        noise=args.noise,
        k=args.k,
        out=args.out,
        cache=args.cache,
        device=args.device,
        resolution=args.resolution,
        train_limit=args.train_limit or (12000 if args.quick else None),
        test_limit=args.test_limit or (2000 if args.quick else None),
        keep_memories=args.keep_memories,
        longtail=lt,
        zeroshot=zs,
    )
    if args.steps is not None:
        cfg.longtail.steps = args.steps
    cfg.longtail.fusion_modality = args.values
    report = Demo(cfg).run()
    from reco.demo.report import longtail_table, zeroshot_tables

    print(longtail_table(report["longtail"]))
    print()
    print(zeroshot_tables(report["zeroshot"])[0])
    print(f"\nreport: {Path(cfg.out) / 'report.md'} ({report['timings_s']['total']:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reco", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions and the compiled kernels available here").set_defaults(
        func=_info
    )

    b = sub.add_parser("build-memory", help="build (or resume building) a memory folder")
    b.add_argument("out", help="memory folder (created, or resumed if it holds a partial build)")
    src = b.add_argument_group("source (exactly one)")
    src.add_argument("--captions", help="CSV (path,caption[,label]) or JSONL table of images")
    src.add_argument("--image-root", help="folder that relative paths in --captions start from")
    src.add_argument("--image-folder", help="ImageFolder tree: <dir>/<class>/<image>")
    src.add_argument(
        "--template",
        help=f"caption for --image-folder, '{{}}' the class (default {DEFAULT_TEMPLATE!r})",
    )
    src.add_argument("--webdataset", nargs="+", help="WebDataset tar shards (.jpg + .txt)")
    src.add_argument("--label-names", help="file of label names, one a line (--webdataset)")
    src.add_argument("--clip-retrieval", help="folder with img_emb/, text_emb/, metadata/")
    src.add_argument("--encoder-name", help="encoder of --clip-retrieval data (default 'unknown')")
    src.add_argument("--text-encoder-name", help="text encoder of --clip-retrieval data")
    src.add_argument(
        "--no-captions",
        action="store_true",
        help="--clip-retrieval metadata without a caption column: import no captions",
    )
    _add_encoder_args(b)
    b.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    b.add_argument("--batch-size", type=int, default=256, help="items encoded per commit batch")
    b.add_argument("--shard-rows", type=int, default=1 << 16)
    b.add_argument("--no-dedup", action="store_true", help="keep exact duplicate images")
    b.add_argument("--near-dup-eval", help=".npy [M, d] image embeddings of an evaluation set")
    b.add_argument(
        "--near-dup-threshold", type=float, help="cosine for --near-dup-eval (default 0.95)"
    )
    b.add_argument(
        "--append",
        action="store_true",
        help="add this source's rows to a memory built from another source (this source is "
        "read from its start; images already in the memory are dropped as duplicates unless "
        "--no-dedup). Without it, an existing memory resumes only the source it was built from",
    )
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_build_memory)

    m = sub.add_parser("memory", help="inspect a memory")
    msub = m.add_subparsers(dest="memory_command", required=True)
    mi = msub.add_parser("info", help="rows, shards, encoders, sizes")
    mi.add_argument("path")
    mi.add_argument("--verify", action="store_true", help="check every file's sha256")
    mi.set_defaults(func=_memory_info)

    s = sub.add_parser("search", help="top-k memory items for an image or a text")
    s.add_argument("path", help="memory folder")
    s.add_argument("--image", help="query image file")
    s.add_argument("--text", help="query text")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--backend", default="fused", choices=["fused", "torch", "faiss", "int8"])
    s.add_argument("--faiss-factory", default="Flat")
    s.add_argument("--faiss-params", help='e.g. "nprobe=32" or "efSearch=128"')
    s.add_argument(
        "--search-modality",
        choices=["image", "text"],
        help="memory embeddings to search (default: the query's modality)",
    )
    s.add_argument("--model", help="default: the memory's encoder")
    s.add_argument("--pretrained", help="default: the memory's encoder checkpoint")
    s.add_argument("--model-config", action="append", default=[])
    s.add_argument("--allow-random-weights", action="store_true")
    s.add_argument("--device")
    s.set_defaults(func=_search)

    t = sub.add_parser("train", help="train a model from an experiment config (YAML/TOML)")
    t.add_argument("config")
    t.add_argument("--out-dir", help="overrides train.out_dir")
    t.add_argument("--steps", type=int, help="overrides train.steps")
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "eval", help="evaluate trained models (latest checkpoint of each out_dir), one table"
    )
    e.add_argument("configs", nargs="+", metavar="config")
    e.add_argument("--checkpoint", help="with a single config: this checkpoint")
    e.set_defaults(func=_eval)

    x = sub.add_parser("explain", help="retrieved neighbours of an image and their weights (PNG)")
    x.add_argument("image")
    x.add_argument("--config", required=True)
    x.add_argument("--checkpoint")
    x.add_argument("--out", default="explain.png")
    x.add_argument("--model", help="default: the memory's image encoder")
    x.add_argument("--pretrained", help="default: the memory's encoder checkpoint")
    x.add_argument("--model-config", action="append", default=[])
    x.add_argument("--allow-random-weights", action="store_true")
    x.set_defaults(func=_explain)

    d = sub.add_parser(
        "demo",
        help="both papers' experiments on real data from installed packages; writes a report",
    )
    d.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    d.add_argument("--data-dir", help="folder with the four IDX files (default: installed data)")
    d.add_argument("--seed", type=int, default=0, help="first seed")
    d.add_argument("--seeds", type=int, help="number of seeds (default 3; 1 with --quick)")
    d.add_argument("--imbalance", type=float, default=200.0, help="head / tail images")
    d.add_argument("--head", type=int, help="head-class images (default 1000; mnist: 300)")
    d.add_argument("--noise", type=float, default=0.25, help="memory caption noise in [0, 1]")
    d.add_argument("-k", "--k", type=int, default=10, help="retrieved items")
    d.add_argument("--out", default="reco-demo", help="report folder")
    d.add_argument("--cache", help="encoder feature cache (default: <out>/cache)")
    d.add_argument("--device", help="default: cuda when available")
    d.add_argument("--resolution", type=int, default=64, help="image encoder input size")
    d.add_argument("--train-limit", type=int, help="at most this many training images")
    d.add_argument("--test-limit", type=int, help="at most this many test images")
    d.add_argument("--steps", type=int, help="training steps of the long-tail models")
    d.add_argument(
        "--values",
        default="text",
        choices=["text", "image", "both"],
        help="experiment 1's memory values: caption embeddings, image features, or both",
    )
    d.add_argument("--quick", action="store_true", help="a reduced demo (minutes)")
    d.add_argument("--keep-memories", action="store_true", help="keep every memory built")
    d.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as e:
        print(f"reco {args.command}: error: {_one_line(e, 2000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; run the same command to resume" if args.command == "build-memory" else ""
        print(f"reco {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
