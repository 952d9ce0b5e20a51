"""The `reco` command line: info, build-memory, memory (info, add, delete, compact, gc, merge),
search, serve, train, eval, explain."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _info(_args: argparse.Namespace) -> int:
    import torch

    import reco
    from reco import ops

    info = {**reco.build_info(), "torch": torch.__version__}
    # The CUDA kernels run only when enabled (they have not been validated on a GPU yet).
    info["cuda_kernel_enabled"] = ops.cuda_kernel_enabled()
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


def _encoders(args: argparse.Namespace):
    from reco.eval.encoders import load_encoders

    return load_encoders(
        args.model,
        args.pretrained,
        args.text_model,
        args.text_pretrained,
        model_configs=args.model_config,
        device=args.device,
        batch_size=args.encode_batch_size,
        allow_random_weights=args.allow_random_weights,
    )


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
    if args.distributed:
        if args.append:
            raise ValueError("--distributed builds a new memory: it cannot --append")
        if args.clip_retrieval is not None:
            raise ValueError(
                "--distributed decodes and encodes images; --clip-retrieval imports "
                "embeddings (run it in one process)"
            )
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "--distributed runs under torchrun (RANK and WORLD_SIZE are not set): "
                "torchrun --nproc-per-node=K -m reco build-memory ... --distributed"
            )
        from reco.distributed import init_from_env

        init_from_env(timeout_s=args.dist_timeout)
    report = _build(args, args.out, append=args.append)
    if not args.distributed or int(os.environ["RANK"]) == 0:
        print(report.summary())
    return 0


def _build(args: argparse.Namespace, out: str, append: bool):
    """Builds into (or appends to) the memory at out from the source options; the report."""
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
        "append": append,
        "progress_bar": not args.no_progress,
    }
    if kind == "--clip-retrieval":
        return builders.import_clip_retrieval(
            out,
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
        build = builders.build_from_items
        if getattr(args, "distributed", False):
            build = builders.build_distributed
            common["keep_parts"] = args.keep_parts
            del common["append"]
        workers = builders.default_workers() if args.workers is None else args.workers
        return build(
            out,
            items,
            image_encoder=image_enc,
            text_encoder=text_enc,
            label_names=label_names,
            batch_size=args.batch_size,
            workers=workers,
            **common,
        )


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
        "version": mem.version,
        "ids": [int(mem.ids[0]), int(mem.ids[-1])],
        "next_id": m.next_id,
        "deleted": m.deleted,
        "live_rows": mem.rows - m.deleted,
        "retired_files": sum(len(r.shards) + len(r.tombstones) for r in m.retired),
        "source": m.source,
        "verified": "sha256" if args.verify else "sizes",
    }
    print(json.dumps(info, indent=2))
    return 0


def _memory_add(args: argparse.Namespace) -> int:
    from reco.memory.store import read_manifest

    have = read_manifest(Path(args.path))  # an existing memory only (build-memory makes one)
    if args.dtype is None:
        args.dtype = have.modalities["image"].dtype
    report = _build(args, args.path, append=True)
    now = read_manifest(Path(args.path))
    added = f"ids {have.next_id}..{now.next_id - 1}" if now.next_id > have.next_id else "no ids"
    print(f"{report.summary()}; {added} added; version {now.commit}")
    return 0


def _memory_merge(args: argparse.Namespace) -> int:
    from reco.ingest import merge_memories

    report = merge_memories(
        args.out,
        args.parts,
        dedup=args.dedup,
        shard_rows=args.shard_rows,
        progress_bar=not args.no_progress,
    )
    print(report.summary())
    return 0


def _read_ids(args: argparse.Namespace):
    """The ids of --ids (comma-separated) or --ids-file (ids separated by commas or
    whitespace, or a .npy array of integers)."""
    import io

    import numpy as np

    from reco.memory.files import read_regular

    if args.ids is not None:
        text, what = args.ids, "--ids"
    else:
        data = read_regular(Path(args.ids_file), "--ids-file", limit=1 << 30)
        if data.startswith(b"\x93NUMPY"):
            return np.load(io.BytesIO(data), allow_pickle=False)
        text, what = data.decode("utf-8", errors="replace"), f"--ids-file {args.ids_file}"
    words = text.replace(",", " ").split()
    bad = [w for w in words if not w.isdigit()]
    if bad:
        raise ValueError(f"{what} must list ids (integers >= 0), got {bad[0]!r}")
    return np.array([int(w) for w in words], dtype=np.int64)


def _memory_delete(args: argparse.Namespace) -> int:
    from reco.memory import Memory, MemoryWriter

    if sum(x is not None for x in (args.ids, args.ids_file, args.where)) != 1:
        raise ValueError("give exactly one of --ids, --ids-file or --where")
    with MemoryWriter.open(args.path) as w:  # the lock first: the rows chosen stay the latest
        if args.where is not None:
            try:
                from reco.memory.where import where_mask
            except ImportError as e:
                raise ValueError(f"--where is not available here ({e})") from None
            with Memory.open(args.path) as mem:
                ids = mem.ids[where_mask(mem, args.where) & mem.live]
        else:
            ids = _read_ids(args)
        n = w.delete(ids) if len(ids) or args.where is None else 0
        m = w.manifest
    print(f"deleted {n} rows; version {m.commit}; {m.rows - m.deleted} live of {m.rows} rows")
    return 0


def _memory_compact(args: argparse.Namespace) -> int:
    from reco.memory import MemoryWriter

    with MemoryWriter.open(args.path) as w:
        report = w.compact()
        m = w.manifest
    print(f"{report.summary()}; version {m.commit}; {m.rows} rows")
    return 0


def _memory_gc(args: argparse.Namespace) -> int:
    from reco.memory import MemoryWriter

    with MemoryWriter.open(args.path) as w:
        print(w.gc().summary())
    return 0


def _search(args: argparse.Namespace) -> int:
    import torch

    from reco.eval.encoders import add_model_configs, open_clip_encoder
    from reco.index import Index
    from reco.memory import Memory

    if (args.image is None) == (args.text is None):
        raise ValueError("give exactly one query: --image PATH or --text STRING")
    mem = Memory.open(args.path)
    query_modality = "image" if args.image is not None else "text"
    info = mem.manifest.modalities[query_modality].encoder
    model = args.model or info.name.removeprefix("open_clip:")
    pretrained = args.pretrained or info.checkpoint
    add_model_configs(args.model_config)
    enc = open_clip_encoder(
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
    index = Index.from_memory(
        mem,
        search_modality,
        search_modality,
        backend=args.backend,
        faiss_factory=args.faiss_factory,
        faiss_params=args.faiss_params,
    )
    allow = index.allowed(where=args.where)  # the memory's live rows and the where clause
    left = mem.rows if allow is None else int(allow.sum())
    res = index.search(q.to(torch.float32), min(args.k, left), allow=allow)
    rows = res.indices[0].tolist()
    found = zip(rows, res.ids[0].tolist(), res.scores[0].tolist(), mem.metadata(rows))
    for rank, (r, i, s, meta) in enumerate(found, 1):
        print(
            f"{rank:3d}  {s:+.4f}  id {i}  row {r}  {meta.get('caption')!r}  {meta.get('source')}"
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from reco.serve.server import serve

    return serve(
        args.path,
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("RECO_SERVE_TOKEN") or None,
        backend=args.backend,
        device=args.device,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        refresh_s=args.refresh_s,
        checkpoint=args.checkpoint,
        config=args.config,
        model=args.model,
        pretrained=args.pretrained,
        model_configs=args.model_config,
        allow_random_weights=args.allow_random_weights,
    )


def _train(args: argparse.Namespace) -> int:
    from reco.train.config import load_experiment
    from reco.train.run import train

    cfg = load_experiment(args.config)
    last = train(cfg, args.out_dir, args.steps)
    print(json.dumps({"out_dir": cfg.train.out_dir, **last}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from reco.eval.trained import evaluate

    print(evaluate(args.configs, args.checkpoint))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from reco.eval.explain import explain

    k = explain(
        args.image,
        args.config,
        checkpoint=args.checkpoint,
        out=args.out,
        model=args.model,
        pretrained=args.pretrained,
        model_configs=args.model_config,
        allow_random_weights=args.allow_random_weights,
    )
    print(f"wrote {args.out}: {k} neighbours with their attention weights")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from reco.demo import Demo, demo_config
    from reco.demo.report import longtail_table, zeroshot_tables

    options = ("dataset", "data_dir", "seed", "head", "imbalance", "noise", "k", "out", "cache")
    options += ("device", "resolution", "keep_memories", "seeds", "train_limit", "test_limit")
    cfg = demo_config(
        quick=args.quick,
        steps=args.steps,
        values=args.values,
        ablations=args.ablations,
        **{name: getattr(args, name) for name in options},
    )
    report = Demo(cfg).run()
    print(longtail_table(report["longtail"]))
    print()
    print(zeroshot_tables(report["zeroshot"])[0])
    print(f"\nreport: {Path(cfg.out) / 'report.md'} ({report['timings_s']['total']:.0f} s)")
    return 0


def _study(args: argparse.Namespace) -> int:
    from reco.demo.study import Study, study_config

    fields = {"seeds": args.seeds, "seed": args.seed, "out": args.out, "cache": args.cache}
    if args.datasets:
        fields["datasets"] = tuple(args.datasets)
    if args.imbalances:
        fields["imbalances"] = tuple(args.imbalances)
    cfg = study_config(quick=args.quick, **fields)
    if args.trials is not None:
        cfg.demo.search.trials = args.trials
    if args.device:
        cfg.demo.device = args.device
    study = Study(cfg)
    if args.summarise:
        from reco.demo.report import write_study_report

        report = study.summarise()
        write_study_report(report, cfg.out)
    else:
        report = study.run(only=args.only)
    if report is None:
        print(f"{len(study.missing())} runs left: run the same command (without --only) to finish")
        return 0
    st = report["study"]
    failed = [c for c in st["claims"] if c["holds"] is False]
    tested = [c for c in st["claims"] if c["holds"] is not None]
    for c in failed:
        print(f"fails: {c['setting']}: {c['claim']}")
    partial = "" if st["complete"] else f"; partial: {len(st['missing'])} runs missing"
    print(f"verdict: {st['verdict']} ({len(failed)} of {len(tested)} claims fail{partial})")
    print(f"report: {Path(cfg.out) / 'report.md'} ({report['timings_s']['total']:.0f} s)")
    return 0


def _add_source_args(b: argparse.ArgumentParser, dtype: str | None) -> None:
    """The source options of build-memory and memory add: one parser for both."""
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
    b.add_argument(
        "--dtype",
        default=dtype,
        choices=["float16", "float32"],
        help=f"dtype of the stored embeddings (default {dtype or 'that of the memory'})",
    )
    b.add_argument("--batch-size", type=int, default=256, help="source items per encoder batch")
    b.add_argument(
        "--workers",
        type=int,
        help="processes that read, decode and resize images (0: in this one; default: the "
        "cores, at most 8); the memory does not depend on it",
    )
    b.add_argument("--shard-rows", type=int, default=1 << 16)
    b.add_argument("--no-dedup", action="store_true", help="keep exact duplicate images")
    b.add_argument("--near-dup-eval", help=".npy [M, d] image embeddings of an evaluation set")
    b.add_argument(
        "--near-dup-threshold", type=float, help="cosine for --near-dup-eval (default 0.95)"
    )
    b.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reco", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions and the compiled kernels available here").set_defaults(
        func=_info
    )

    b = sub.add_parser("build-memory", help="build (or resume building) a memory folder")
    b.add_argument("out", help="memory folder (created, or resumed if it holds a partial build)")
    _add_source_args(b, dtype="float16")
    b.add_argument(
        "--append",
        action="store_true",
        help="add this source's rows to a memory built from another source (this source is "
        "read from its start; images already in the memory are dropped as duplicates unless "
        "--no-dedup). Without it, an existing memory resumes only the source it was built from",
    )
    b.add_argument(
        "--distributed",
        action="store_true",
        help="under torchrun: each rank builds a part (OUT.parts/), then rank 0 merges them "
        "into OUT; restarted ranks resume their parts",
    )
    b.add_argument(
        "--keep-parts", action="store_true", help="--distributed: keep OUT.parts/ after the merge"
    )
    b.add_argument(
        "--dist-timeout",
        type=float,
        default=24 * 3600.0,
        help="--distributed: seconds a rank waits for the others (default a day: the fastest "
        "rank waits for the slowest part)",
    )
    b.set_defaults(func=_build_memory)

    m = sub.add_parser("memory", help="inspect and edit a memory")
    msub = m.add_subparsers(dest="memory_command", required=True)
    mi = msub.add_parser("info", help="rows, shards, encoders, sizes, ids, version")
    mi.add_argument("path")
    mi.add_argument("--verify", action="store_true", help="check every file's sha256")
    mi.set_defaults(func=_memory_info)
    ma = msub.add_parser(
        "add",
        help="add a source's rows with fresh ids (encoded as the memory's are); the same "
        "command again resumes an interrupted add",
    )
    ma.add_argument("path", help="an existing memory folder")
    _add_source_args(ma, dtype=None)
    ma.set_defaults(func=_memory_add)
    mm = msub.add_parser(
        "merge",
        help="merge memories built with the same encoders into a new one (the parts of a "
        "--distributed build in source order, others concatenated); the same command again "
        "resumes an interrupted merge",
    )
    mm.add_argument("out", help="the new memory folder")
    mm.add_argument("parts", nargs="+", help="memory folders to merge")
    mm.add_argument("--dedup", action="store_true", help="drop rows whose image is already in")
    mm.add_argument("--shard-rows", type=int, default=1 << 16)
    mm.add_argument("--no-progress", action="store_true")
    mm.set_defaults(func=_memory_merge)
    md = msub.add_parser("delete", help="delete rows by id (tombstones until compact)")
    md.add_argument("path")
    md.add_argument("--ids", help="comma-separated ids, e.g. 3,5,9")
    md.add_argument("--ids-file", help="file of ids (comma or whitespace separated, or .npy)")
    md.add_argument("--where", help="SQL condition on the metadata (and id, label, shard, row)")
    md.set_defaults(func=_memory_delete)
    mc = msub.add_parser("compact", help="write shards anew without deleted rows (ids kept)")
    mc.add_argument("path")
    mc.set_defaults(func=_memory_compact)
    mg = msub.add_parser("gc", help="remove retired files that no open reader still reads")
    mg.add_argument("path")
    mg.set_defaults(func=_memory_gc)

    s = sub.add_parser("search", help="top-k memory items for an image or a text")
    s.add_argument("path", help="memory folder")
    s.add_argument("--image", help="query image file")
    s.add_argument("--text", help="query text")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--backend", default="fused", choices=["fused", "torch", "faiss", "int8"])
    s.add_argument("--faiss-factory", default="Flat")
    s.add_argument("--faiss-params", help='e.g. "nprobe=32" or "efSearch=128"')
    s.add_argument(
        "--where",
        help="SQL WHERE clause over the memory's metadata (columns, id, label, shard, row), e.g. "
        "\"license = 'cc0' AND id > 100\" (needs pip install 'reco[sql]')",
    )
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

    v = sub.add_parser("serve", help="serve a memory over HTTP (search, images, metrics, a page)")
    v.add_argument("path", help="memory folder")
    v.add_argument("--host", default="127.0.0.1", help="a non-loopback host needs --token")
    v.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    v.add_argument(
        "--token",
        help="require 'Authorization: Bearer TOKEN' (default: $RECO_SERVE_TOKEN, which keeps it "
        "out of the process list)",
    )
    v.add_argument("--backend", default="fused", choices=["fused", "int8", "faiss", "torch"])
    v.add_argument("--device", help="device of the keys searched (default: where they are, CPU)")
    v.add_argument("--max-batch", type=int, default=64, help="queries per search call; 1: off")
    v.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="wait for more queries after the first"
    )
    v.add_argument(
        "--refresh-s",
        type=float,
        default=5.0,
        help="look for a newer committed version of the memory this often (0: never)",
    )
    v.add_argument(
        "--checkpoint", help="fusion checkpoint for POST /explain (default: --config's latest)"
    )
    v.add_argument("--config", help="experiment config of the model POST /explain runs")
    v.add_argument("--model", help="query encoder (default: the memory's encoder)")
    v.add_argument("--pretrained", help="default: the memory's encoder checkpoint")
    v.add_argument("--model-config", action="append", default=[])
    v.add_argument("--allow-random-weights", action="store_true")
    v.set_defaults(func=_serve)

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
        default="both",
        choices=["text", "image", "both"],
        help="experiment 1's memory values: caption embeddings, image features, or both "
        "(default: both, chosen on validation)",
    )
    d.add_argument("--quick", action="store_true", help="a reduced demo (minutes)")
    d.add_argument(
        "--ablations",
        action="store_true",
        help="also experiment 1's memory noise sweep (0, 25, 50%%) and experiment 2's search x "
        "fusion table and k sweep (first seed)",
    )
    d.add_argument("--keep-memories", action="store_true", help="keep every memory built")
    d.set_defaults(func=_demo)

    st = sub.add_parser(
        "study",
        help="the demo's claims over datasets x imbalance ratios x seeds, with intervals; "
        "resumes where an interrupted run stopped",
    )
    st.add_argument("--datasets", nargs="+", choices=["fashion-mnist", "mnist"])
    st.add_argument("--imbalances", nargs="+", type=float, help="default: 10 50 200")
    st.add_argument("--seed", type=int, default=0, help="first seed")
    st.add_argument("--seeds", type=int, default=5)
    st.add_argument("--trials", type=int, help="trials of each method's search (default 2)")
    st.add_argument("--out", default="reco-study", help="report folder (resumed if it holds one)")
    st.add_argument("--cache", help="encoder feature cache (default: <out>/cache)")
    st.add_argument("--device", help="default: cuda when available")
    st.add_argument("--quick", action="store_true", help="the demo's reduced settings")
    st.add_argument(
        "--only",
        choices=["longtail", "zeroshot"],
        help="run one experiment's runs (several processes may share one --out)",
    )
    st.add_argument(
        "--summarise",
        action="store_true",
        help="write the report from the runs saved so far (partial where some are missing)",
    )
    st.set_defaults(func=_study)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, KeyError, RuntimeError) as e:
        from reco.eval.encoders import one_line

        print(f"reco {args.command}: error: {one_line(e, 2000)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; run the same command to resume" if args.command == "build-memory" else ""
        print(f"reco {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
