"""A memory sharded over torch.distributed ranks (NCCL between GPUs, gloo on CPU; launch with
torchrun). Each rank holds a contiguous row range of the memory; a retrieval gathers the queries,
searches every shard with the fused op, sends each rank the per-shard top-k of its own queries
(scores, row ids and values of the k candidates, plus their keys when a query needs gradients:
O(world x B x k x dv) bytes received per rank, never O(N)), merges them into the exact global
top-k and attends exactly as the single-device op does.

Joining or using a process group here (init_from_env, ShardedIndex, the Trainer) installs a
clean shutdown at interpreter exit (install_clean_shutdown): without it a gloo job can abort at
exit (SIGABRT, "terminate called without an active exception") when a gloo worker thread
releases the last C++ reference to a collective's Python tensors while the interpreter is
finalizing (it needs the GIL, and a thread that takes the GIL then is ended by pthread_exit).

Failures surface on every rank: a shard that fails its checks raises on all ranks (the error is
shared before any search), and a rank that dies makes the others' next collective fail, after at
most the process group's timeout. Restart all ranks together (torchrun --max-restarts=N restarts
the whole group); the memory on disk is read-only here, so a restart needs no repair.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys
import types
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

# Imported before any group exists, so that its defaults hold none (_drop_stale_group_defaults).
import torch.distributed.nn.functional
from torch import Tensor

from . import reference
from .index import PAD_ROW, Index, check_exclude_rows, mask_excluded, merge_candidates
from .memory import EmbeddingTable, Memory, MemoryFormatError
from .ops import RetrieveAttend, check_allow

if dist.is_available():
    # Imported before any group exists, so that its defaults hold none (see
    # _drop_stale_group_defaults).
    import torch.distributed.nn.functional

log = logging.getLogger(__name__)

# How long the barrier at exit waits for the other ranks: a dead or hung peer must not hang the
# exit of the others; a live one that is merely slower than this only makes it skip the barrier.
EXIT_BARRIER_TIMEOUT_S = 30.0
_exit_hook = {"installed": False, "timeout_s": EXIT_BARRIER_TIMEOUT_S}


def shutdown_process_group(timeout_s: float = EXIT_BARRIER_TIMEOUT_S) -> None:
    """Ends the default process group cleanly, so that no gloo thread outlives it into the
    interpreter's finalization. Call it on every rank (install_clean_shutdown does, at exit).

    On gloo: a barrier bounded by timeout_s, which also waits for this rank's pending
    collectives; garbage collection (reference cycles can hold collectives and their tensors);
    destroy_process_group(); then the group's worker threads are ended (joined, the GIL
    released) while the interpreter still runs. Safe at any time: without a group (never made,
    or already destroyed by the caller) it only drops torch's stale references to it and
    collects garbage. A barrier that fails (a peer died) is logged; one that times out (a peer
    hung) leaves the group alone, since destroying it would wait for the pending barrier until
    the group's own timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if dist.is_available():  # destroyed by the caller: its threads may still be alive
            _drop_stale_group_defaults()
        gc.collect()
        return
    if dist.get_backend() == "gloo":
        work = dist.barrier(async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=timeout_s))
        except Exception as e:
            if not work.is_completed():  # a hung peer: the barrier is still pending
                log.warning("barrier at process group shutdown timed out (%s); leaving it", e)
                return
            log.warning("barrier at process group shutdown failed (%s); destroying it", e)
        del work
    gc.collect()
    try:
        dist.destroy_process_group()
    except Exception as e:  # already being torn down elsewhere
        log.warning("destroy_process_group at shutdown failed: %s", e)
    # Usually the last references: ProcessGroupGloo's destructor then joins its worker threads
    # (the GIL released) while the interpreter still runs.
    _drop_stale_group_defaults()
    gc.collect()


def _drop_stale_group_defaults() -> None:
    """torch.distributed.nn.functional binds `group=group.WORLD` as default arguments when it is
    imported; imported after init_process_group (torch._dynamo imports it, on the first call of
    any custom op), its functions keep the group, and its worker threads, alive after
    destroy_process_group, until the interpreter finalizes. Call once no group is left: those
    defaults become None (the default group)."""
    module = sys.modules.get("torch.distributed.nn.functional")
    for f in vars(module).values() if module is not None else ():
        if isinstance(f, types.FunctionType) and f.__defaults__:
            stale = [isinstance(d, dist.ProcessGroup) for d in f.__defaults__]
            if any(stale):
                f.__defaults__ = tuple(
                    None if s else d for s, d in zip(stale, f.__defaults__, strict=True)
                )


def install_clean_shutdown(timeout_s: float = EXIT_BARRIER_TIMEOUT_S) -> None:
    """Registers shutdown_process_group(timeout_s) to run at interpreter exit, once (later
    calls only update the timeout); safe whether or not the group is still there by then."""
    _exit_hook["timeout_s"] = timeout_s
    if not _exit_hook["installed"]:
        atexit.register(_shutdown_at_exit)
        _exit_hook["installed"] = True


def _shutdown_at_exit() -> None:
    shutdown_process_group(_exit_hook["timeout_s"])


class ShardedIndexError(RuntimeError):
    """A distributed retrieval failed on some rank (the message names it); every rank raises."""


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) that rank holds: as even as possible, lower ranks first."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedIndex:
    """Exact retrieval over a memory split across the ranks of a process group.

    memory: a memory folder (or an open Memory). Rank r keeps rows row_range(N, world, r) of the
    key and value modalities, memory-mapped (or copied to `device`), and skips the memory's
    deleted rows. Call every method on every rank of the group, in the same order (they are
    collectives).
    """

    def __init__(
        self,
        memory: str | os.PathLike | Memory,
        key_modality: str = "image",
        value_modality: str = "text",
        *,
        group: dist.ProcessGroup | None = None,
        device: str | torch.device | None = None,
        verify: Literal["size", "full"] = "size",
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ShardedIndex needs torch.distributed.init_process_group() first")
        install_clean_shutdown()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = torch.device(device) if device is not None else self._default_device()
        self.bytes_exchanged = 0  # by this rank's collectives: for cost accounting and tests
        error = None
        try:
            mem = memory if isinstance(memory, Memory) else Memory.open(memory, verify="size")
            if verify == "full":
                mem.verify(rows=row_range(mem.rows, self.world, self.rank))
            self.rows = mem.rows
            self.start, self.stop = row_range(mem.rows, self.world, self.rank)
            # Views of the memory-mapped shards (a range may span several); one tensor each on
            # an accelerator.
            self.keys = _rows_table(mem.keys(key_modality), self.start, self.stop)
            self.values = _rows_table(mem.values(value_modality), self.start, self.stop)
            if self.keys is not None and self.device.type != "cpu":
                self.keys, self.values = self.keys.to(self.device), self.values.to(self.device)
            live = mem.live[self.start : self.stop]
            self._index = None
            if self.keys is not None:
                self._index = Index(self.keys, self.values, allow=live.to(self.keys.device))
            self._dtypes = (mem.keys(key_modality).dtype, mem.values(value_modality).dtype)
            self.dim, self.value_dim = mem.keys(key_modality).dim, mem.values(value_modality).dim
        except (MemoryFormatError, KeyError, OSError, ValueError) as e:
            error = f"rank {self.rank}: {type(e).__name__}: {e}"
        self._raise_if_any(error)

    def _default_device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- collectives ---------------------------------------------------------------------------
    def _raise_if_any(self, error: str | None) -> None:
        """Every rank learns every rank's error; all raise if any rank failed."""
        errors: list[str | None] = [None] * self.world
        self._collective(dist.all_gather_object, errors, error, group=self.group)
        failed = [e for e in errors if e]
        if failed:
            raise ShardedIndexError("; ".join(failed))

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError, ConnectionError) as e:
            raise ShardedIndexError(
                f"rank {self.rank}: a collective failed ({type(e).__name__}: {e}); another rank "
                "has probably died. Restart every rank (e.g. torchrun --max-restarts)"
            ) from e

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        """All ranks' t (same shape everywhere). bytes_exchanged counts what this rank receives."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._collective(dist.all_gather, out, t, group=self.group)
        self.bytes_exchanged += t.numel() * t.element_size() * self.world
        return out

    def _all_to_all(self, t: Tensor) -> Tensor:
        """t [world * m, ...]: rows [j*m, (j+1)*m) go to rank j; returns what every rank sent
        here, concatenated along dim 1 ([m, world * ...]).

        all_to_all_single (one tensor, equal splits), not the list form dist.all_to_all, which
        gloo implements only in recent torch (pytorch#165435; torch 2.4 raises "Backend gloo
        does not support alltoall")."""
        send = t.contiguous()
        recv = torch.empty_like(send)
        self._collective(dist.all_to_all_single, recv, send, group=self.group)
        self.bytes_exchanged += recv.numel() * recv.element_size()
        return torch.cat(recv.chunk(self.world), 1)

    # -- retrieval -----------------------------------------------------------------------------
    def retrieve_attend(
        self,
        query: Tensor | None,
        k: int,
        *,
        attn_query: Tensor | None = None,
        temperature: float = 1.0,
        exclude: Tensor | None = None,
        allow: Tensor | None = None,
        mode: Literal["each", "root"] = "each",
    ) -> RetrieveAttend | None:
        """The fused op's result for this rank's queries, over the whole memory.

        mode "each" (training): every rank brings its own batch (sizes may differ, even 0) and
        gets its own result. mode "root" (serving): rank 0 brings the batch, the other ranks pass
        None and get None. Gradients reach query and attn_query; the memory stays frozen.
        allow: [N] bool over the whole memory, rows every query may select: the same on every
        rank (each searches its slice of it).
        """
        if mode not in ("each", "root"):
            raise ValueError(f"mode must be 'each' or 'root', got {mode!r}")
        if not 1 <= k <= self.rows:
            raise ValueError(f"k={k} must be in [1, N={self.rows}]")
        local = query is not None and (mode == "each" or self.rank == 0)
        B = query.shape[0] if local else 0
        H = attn_query.shape[1] if (local and attn_query is not None) else 0
        bad_exclude = None
        if local and exclude is not None:
            try:
                check_exclude_rows(exclude, self.rows)
            except ValueError as e:
                bad_exclude = e
        try:  # every rank passes allow: a bad one is flagged like a bad exclude
            check_allow(allow, self.rows)
        except (TypeError, ValueError) as e:
            bad_exclude = e
        E = exclude.shape[1] if (local and exclude is not None and bad_exclude is None) else 0
        grad = int(local and query.requires_grad and torch.is_grad_enabled())
        # Sizes first (batches may differ by rank), with a flag for a bad exclude: every rank
        # learns of it before any search, so that all raise and none waits in a collective.
        sizes = torch.tensor(
            [B, H, E, grad, bad_exclude is not None], dtype=torch.int64, device=self.device
        )
        meta = torch.stack(self._all_gather(sizes)).cpu()
        if bool(meta[:, 4].any()):
            if bad_exclude is not None:
                raise bad_exclude
            bad = [str(r) for r in range(self.world) if meta[r, 4]]
            who = f"rank {bad[0]}" if len(bad) == 1 else f"ranks {', '.join(bad)}"
            raise ShardedIndexError(
                f"rank {self.rank}: the exclude or allow of {who} is invalid (N={self.rows}); "
                "its error names the problem"
            )
        counts = meta[:, 0].tolist()
        heads = {h for h in meta[:, 1].tolist() if h} or {0}
        if len(heads) > 1:
            raise ValueError(f"attn_query must have the same H on every rank, got {sorted(heads)}")
        E_max, B_max = int(meta[:, 2].max()), max(counts)
        # Keys of the candidates travel only when some rank needs gradients w.r.t. its query.
        send_keys = bool(meta[:, 3].any())
        if B_max == 0:
            return self._empty(k, attn_query) if local else None
        q_pad = torch.zeros(B_max, self.dim, device=self.device)
        ex_pad = torch.full((B_max, E_max), -1, dtype=torch.int64, device=self.device)
        if local:
            q_pad[:B] = query.detach().to(self.device, torch.float32)
            if E:
                ex_pad[:B, :E] = exclude.to(self.device)
        all_q = torch.cat(self._all_gather(q_pad))  # [world * B_max, d]
        all_ex = torch.cat(self._all_gather(ex_pad)) if E_max else None
        part = None if allow is None else allow[self.start : self.stop].to(self.device)
        cand = self._local_candidates(all_q, all_ex, k, send_keys, part)
        # Each rank receives every shard's candidates for its own queries only: [B_max, world*k].
        s, rows, vals, keys = (None if c is None else self._all_to_all(c) for c in cand)
        if not local:
            return None
        s, rows, vals = s[:B], rows[:B], vals[:B].float()
        top = merge_candidates(s, rows, k)
        top_rows, top_s = top.indices, top.scores
        pos = (rows.unsqueeze(1) == top_rows.unsqueeze(2)).float().argmax(2)  # [B, k]
        v_sel = vals.gather(1, pos.unsqueeze(-1).expand(-1, -1, vals.shape[2]))
        if send_keys:
            k_sel = keys[:B].float().gather(1, pos.unsqueeze(-1).expand(-1, -1, keys.shape[2]))
            # Recomputed from the keys so that gradients reach the query.
            top_s = torch.einsum("bd,bkd->bk", query.to(self.device, torch.float32), k_sel)
        return reference.attend_rows(top_s, v_sel, top_rows, attn_query, temperature)

    def _local_candidates(
        self,
        q: Tensor,
        exclude: Tensor | None,
        k: int,
        with_keys: bool,
        allow: Tensor | None = None,
    ):
        """This rank's candidates for every gathered query: its top-(k + E) rows (E = exclude's
        width, so that at least k survive wherever a query's excluded rows lie), excluded rows
        and missing ones as padding (NaN, PAD_ROW), with their values (and keys) in storage
        dtype: exact, and half the bytes of float32 for a float16 memory."""
        Bt = q.shape[0]
        width = k + (0 if exclude is None else exclude.shape[1])
        scores = torch.full((Bt, width), torch.nan, device=self.device)
        rows = torch.full((Bt, width), PAD_ROW, dtype=torch.int64, device=self.device)
        if self._index is not None:
            sc, idx = self._index.search_candidates(
                q, min(width, self.stop - self.start), allow=allow
            )
            sc, idx = mask_excluded(sc, idx + self.start, exclude)
            m = min(width, idx.shape[1])
            top, top_s = reference.merge_topk(sc, idx, m)
            rows[:, :m], scores[:, :m] = top, top_s
        real = rows != PAD_ROW
        local = torch.where(real, rows - self.start, 0)
        vals = torch.zeros(Bt, width, self.value_dim, dtype=self._dtypes[1], device=self.device)
        keys = None
        if with_keys:
            keys = torch.zeros(Bt, width, self.dim, dtype=self._dtypes[0], device=self.device)
        if self._index is not None:
            vals[real] = self.values[local[real]]
            if keys is not None:
                keys[real] = self.keys[local[real]]
        return scores, rows, vals, keys

    def _empty(self, k: int, attn_query: Tensor | None) -> RetrieveAttend:
        H = 1 if attn_query is None else attn_query.shape[1]
        z = torch.empty(0, device=self.device)
        return RetrieveAttend(
            z.new_empty(0, H, self.value_dim),
            z.new_empty(0, H, k),
            torch.empty(0, k, dtype=torch.int64, device=self.device),
            z.new_empty(0, k),
        )


def _rows_table(table: EmbeddingTable, start: int, stop: int) -> EmbeddingTable | None:
    """Rows [start, stop) of a table, as views of its (memory-mapped) shards; None if empty."""
    parts = []
    for s, t in enumerate(table.shards):
        lo, hi = max(start, table.offsets[s]), min(stop, table.offsets[s + 1])
        if lo < hi:
            parts.append(t[lo - table.offsets[s] : hi - table.offsets[s]])
    return EmbeddingTable(parts) if parts else None


def init_from_env(backend: str | None = None, timeout_s: float = 120.0) -> None:
    """init_process_group from torchrun's environment, with a bounded collective timeout, and a
    clean shutdown of the group at exit (install_clean_shutdown).

    Under torchrun the group's keys go under a prefix of their own per restart attempt: torchrun's
    static rendezvous keeps one store across restarts of the group, so without it a restarted
    group reads the previous attempt's addresses, connects to dead peers and hangs (until the
    timeout) in init_process_group.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        agent = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout
        )
        store = dist.PrefixStore(f"reco/attempt-{attempt}/", agent)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    install_clean_shutdown()
