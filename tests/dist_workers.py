"""Process bodies for tests/test_distributed.py (spawned; importable by name from tests/)."""

from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from reco.distributed import shutdown_process_group


def query_batch(rank: int, case: int, B: int, d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * case + rank)
    return torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=1)


def run(rank: int, world: int, init_file: str, out_dir: str, scenario: str, args: dict) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=args.get("timeout", 60)),
    )
    result: dict = {}
    try:
        SCENARIOS[scenario](rank, world, args, result)
    except Exception as e:  # the parent asserts on what each rank saw
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    # Bounded: after an error some rank may be dead.
    shutdown_process_group(timeout_s=10 if "error" in result else 60)


def _equal(rank, world, args, result):
    from reco.distributed import ShardedIndex

    index = ShardedIndex(args["memory"], "image", "text")
    result["range"] = (index.start, index.stop)
    for c, case in enumerate(args["cases"]):
        B = case["B"][rank] if case["mode"] == "each" else (case["B"][0] if rank == 0 else 0)
        q = query_batch(rank, c, B, index.dim) if B or case["mode"] == "each" else None
        aq = None
        if case["heads"]:
            g = torch.Generator().manual_seed(77 + rank + 10 * c)
            aq = torch.randn(B, case["heads"], index.value_dim, generator=g)
        ex = None
        if case["exclude"] == "block":
            # Query i excludes the first 10 rows of one rank's range: exclusions concentrated
            # where some rank has few rows left.
            per = index.rows // world
            ex = torch.stack([torch.arange(10) + ((rank + i) % world) * per for i in range(B)])
        elif case["exclude"]:
            g = torch.Generator().manual_seed(55 + rank + 10 * c)
            ex = torch.randint(-1, index.rows, (B, case["exclude"]), generator=g)
        allow = None
        if case.get("allow"):  # the same mask on every rank
            g = torch.Generator().manual_seed(99 + c)
            allow = torch.rand(index.rows, generator=g) < case["allow"]
        before = index.bytes_exchanged
        r = index.retrieve_attend(
            q,
            case["k"],
            attn_query=aq,
            temperature=case["T"],
            exclude=ex,
            allow=allow,
            mode=case["mode"],
        )
        result[c] = {
            "query": q,
            "attn_query": aq,
            "exclude": ex,
            "allow": allow,
            "result": None if r is None else tuple(t.detach() for t in r),
            "bytes": index.bytes_exchanged - before,
        }


def _ddp(rank, world, args, result):
    from reco.distributed import ShardedIndex

    index = ShardedIndex(args["memory"], "image", "text")
    torch.manual_seed(0)
    model = torch.nn.Linear(index.dim, 2 * index.value_dim)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x = query_batch(rank, 0, args["B"], index.dim)
    aq = ddp(x).reshape(args["B"], 2, index.value_dim)
    q = x.clone().requires_grad_()
    r = index.retrieve_attend(q, args["k"], attn_query=aq, temperature=0.5)
    loss = (r.output**2).sum() + r.scores.sum()
    loss.backward()
    result["grads"] = [p.grad.clone() for p in model.parameters()]
    result["query_grad"] = q.grad.clone()
    result["x"] = x


def _dead_rank(rank, world, args, result):
    from reco.distributed import ShardedIndex

    index = ShardedIndex(args["memory"], "image", "text")
    if rank == world - 1:
        os._exit(3)  # dies without a word
    t0 = time.time()
    try:
        index.retrieve_attend(query_batch(rank, 0, 2, index.dim), 3)
    finally:
        result["seconds"] = time.time() - t0


def _verify(rank, world, args, result):
    from reco.distributed import ShardedIndex

    ShardedIndex(args["memory"], "image", "text", verify="full")


def _bad_exclude(rank, world, args, result):
    """Per case, the ranks listed in case["bad"] put an out-of-range row into their exclude;
    records what every rank raised, then checks that the ranks still retrieve together."""
    from reco.distributed import ShardedIndex

    index = ShardedIndex(args["memory"], "image", "text")
    for c, case in enumerate(args["cases"]):
        g = torch.Generator().manual_seed(31 * c + rank)
        ex = torch.randint(-1, index.rows, (3, 4), generator=g)
        if rank in case["bad"]:
            ex[int(torch.randint(3, (1,), generator=g)), 1:] = case["value"]
        q = query_batch(rank, c, 3, index.dim)
        result[c] = {"query": q, "exclude": ex}
        try:
            index.retrieve_attend(q, 4, exclude=ex)
            result[c]["raised"] = None
        except Exception as e:
            result[c]["raised"] = (type(e).__name__, str(e))
    r = index.retrieve_attend(query_batch(rank, 99, 2, index.dim), 4)
    result["after"] = r.indices


def _diverge(rank, world, args, result):
    """DDP training on the long-tail task with an inf in one training item (see test_training)."""
    import synthetic

    from reco.models import LinearHead, MemoryAttention, MemoryAttentionConfig, RetrievalClassifier
    from reco.train import LongTailTask, TrainConfig, Trainer

    data, _, retriever = synthetic.long_tail_task(seed=3)
    data.tensors["image"] = data.tensors["image"].clone()
    data.tensors["image"][args["bad_row"]] = torch.inf
    torch.manual_seed(7)
    att = MemoryAttention(MemoryAttentionConfig(synthetic.D, synthetic.DV, dim=32, heads=1))
    model = RetrievalClassifier(att, LinearHead(synthetic.D, synthetic.C))
    cfg = TrainConfig(steps=40, batch_size=64, warmup_steps=2, progress=False)
    trainer = Trainer(model, LongTailTask(retriever), data, cfg, device="cpu")
    try:
        trainer.fit()
    finally:
        result["step"] = trainer.step


def _hung_peer(rank, world, args, result):
    """Rank 0 shuts down while rank 1 is busy elsewhere for longer than the barrier's timeout."""
    if rank == 0:
        t0 = time.time()
        shutdown_process_group(timeout_s=args["barrier_s"])
        result["seconds"] = time.time() - t0
        result["left_alone"] = dist.is_initialized()
    else:
        time.sleep(args["busy_s"])


SCENARIOS = {
    "equal": _equal,
    "ddp": _ddp,
    "dead_rank": _dead_rank,
    "verify": _verify,
    "bad_exclude": _bad_exclude,
    "diverge": _diverge,
    "hung_peer": _hung_peer,
}


def ddp_train(rank: int, world: int, init_file: str, out: str, which: str = "long_tail") -> None:
    """Trains a small model under DDP (see synthetic.py); rank 0 saves the weights."""
    import synthetic

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = getattr(synthetic, f"train_small_{which}_model")()
    if rank == 0:
        torch.save(model.state_dict(), out)
    shutdown_process_group()


def exit_job(
    rank: int, world: int, init_file: str, memory: str, destroy: bool, switch_s: float = 0.1
) -> None:
    """The job that used to abort at interpreter exit (SIGABRT) in most runs: the op through
    ShardedIndex, collectives, then the end of the script, with the script's own
    destroy_process_group() or without."""
    from reco.distributed import ShardedIndex

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    index = ShardedIndex(memory, "image", "text")
    # A long switch interval keeps the GIL with the main thread, as a busy machine does, so that
    # the race at exit (a gloo thread waiting for the GIL while the interpreter finalizes) shows
    # in most runs rather than in a few.
    sys.setswitchinterval(switch_s)
    r = index.retrieve_attend(query_batch(rank, 0, 4, index.dim), 3)
    out = [torch.empty_like(r.output) for _ in range(world)]
    dist.all_gather(out, r.output)
    # A collective whose handle is not kept (as for metrics sent off without waiting).
    dist.all_gather([torch.empty_like(r.output) for _ in range(world)], r.output, async_op=True)
    if destroy:
        dist.destroy_process_group()
