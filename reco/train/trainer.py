"""One trainer for every method: AdamW, cosine schedule with warm-up, gradient clipping, bf16
autocast on GPU, safetensors checkpoints that resume exactly, JSONL (and TensorBoard) metrics,
DistributedDataParallel under torchrun (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import check_number
from ..distributed import install_clean_shutdown
from .checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import EmbeddingDataset, batch_indices
from .schedule import cosine_with_warmup

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256  # global: split evenly over the ranks
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA, off on CPU
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # 0: at the end only
    out_dir: str | None = None  # checkpoints, metrics.jsonl, TensorBoard events
    resume: bool = True  # continue from the latest checkpoint in out_dir
    progress: bool = True

    def validate(self) -> None:
        """ValueError (TypeError for a non-number) naming the field, for a number that is not
        finite or out of range, before any step runs."""
        check_number("steps", self.steps, integer=True, ge=1)
        check_number("batch_size", self.batch_size, integer=True, ge=1)
        check_number("lr", self.lr, gt=0)
        check_number("weight_decay", self.weight_decay, ge=0)
        check_number("warmup_steps", self.warmup_steps, integer=True, ge=0, lt=self.steps)
        check_number("min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_number("grad_clip", self.grad_clip, gt=0, optional=True)
        if self.amp not in ("auto", "bf16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16' or 'off', got {self.amp!r}")
        check_number("seed", self.seed, integer=True)
        check_number("log_every", self.log_every, integer=True, ge=1)
        check_number("checkpoint_every", self.checkpoint_every, integer=True, ge=0)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the message names the step. Raised before that step's
    update, on every rank, so the weights (and checkpoints) are those of the step before."""


class _LossModule(nn.Module):
    """The model with its loss, so that DDP sees a forward pass (and syncs gradients)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.loss_fn(self.model, batch)


class Trainer:
    """Trains `model` to minimise loss_fn(model, batch) over batches of `dataset`.

    Batches are a pure function of (seed, step), so a run resumed from a checkpoint continues
    bit for bit as an uninterrupted one. Under torch.distributed each rank takes its slice of the
    global batch and DDP averages the gradients.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        dataset: EmbeddingDataset,
        cfg: TrainConfig,
        *,
        config: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.dataset = dataset
        self.config = config or {"train": asdict(cfg)}
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if self.distributed:
            install_clean_shutdown()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by {self.world} ranks")
        wrapped = _LossModule(self.model, loss_fn)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        self.step_module = wrapped
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = cosine_with_warmup(
            self.optimizer,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        self.step = 0

    def _autocast(self):
        use = self.cfg.amp == "bf16" or (self.cfg.amp == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if use else nullcontext()

    def _local_batch(self, step: int) -> dict[str, Tensor]:
        idx = batch_indices(len(self.dataset), self.cfg.batch_size, step, self.cfg.seed)
        per = self.cfg.batch_size // self.world
        return self.dataset.batch(idx[self.rank * per : (self.rank + 1) * per], self.device)

    def save(self) -> Path | None:
        """Writes a checkpoint of the current step to out_dir (rank 0; others wait)."""
        path = None
        if self.cfg.out_dir is not None and self.rank == 0:
            path = checkpoint_path(self.cfg.out_dir, self.step)
            save_checkpoint(
                path,
                model=self.model,
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                step=self.step,
                config=self.config,
            )
        if self.distributed:
            dist.barrier()
        return path

    def maybe_resume(self) -> bool:
        if self.cfg.out_dir is None or not self.cfg.resume:
            return False
        latest = latest_checkpoint(self.cfg.out_dir)
        if latest is None:
            return False
        state = load_checkpoint(
            latest, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.step = int(state["step"])
        return True

    def fit(self, steps: int | None = None) -> list[dict[str, float]]:
        """Trains until `steps` (default: cfg.steps); returns the logged metrics."""
        cfg = self.cfg
        stop = cfg.steps if steps is None else min(steps, cfg.steps)
        if not self.maybe_resume() and self.step == 0:
            torch.manual_seed(cfg.seed + self.rank)
        out = Path(cfg.out_dir) if cfg.out_dir is not None and self.rank == 0 else None
        writer = _tensorboard(out)
        bar = _bar(cfg.progress and self.rank == 0, self.step, stop)
        log: list[dict[str, float]] = []
        self.model.train()
        t0 = time.perf_counter()
        try:
            while self.step < stop:
                batch = self._local_batch(self.step)
                with self._autocast():
                    loss = self.step_module(batch)
                self._check_finite(loss, stop)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == stop:
                    row = {
                        "step": self.step,
                        "loss": float(loss.detach()),
                        "lr": self.scheduler.get_last_lr()[0],
                        "seconds": time.perf_counter() - t0,
                    }
                    log.append(row)
                    if out is not None:
                        out.mkdir(parents=True, exist_ok=True)
                        with open(out / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(row) + "\n")
                    if writer is not None:
                        writer.add_scalar("train/loss", row["loss"], self.step)
                        writer.add_scalar("train/lr", row["lr"], self.step)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
            if cfg.out_dir is not None and not (
                cfg.checkpoint_every and stop % cfg.checkpoint_every == 0
            ):
                self.save()
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        return log

    def _check_finite(self, loss: Tensor, stop: int) -> None:
        """TrainingDivergedError if the loss of the step about to be taken is not finite on any
        rank (one flag all-reduced, so that every rank stops, and none waits in DDP's backward)."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bool(bad.item()):
            value = float(loss.detach())
            which = "the loss of another rank is not finite"
            if not math.isfinite(value):
                which = f"the loss is {value}"
            raise TrainingDivergedError(
                f"{which} at step {self.step + 1} of {stop} "
                f"(lr {self.scheduler.get_last_lr()[0]:.3g}): training stopped before that "
                "step's update; lower train.lr or look for NaN/inf in the data"
            )


def _tensorboard(out: Path | None):
    if out is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _bar(enabled: bool, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", desc="training")
