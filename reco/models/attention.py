"""The retrieval-augmented recognition module (CVPR 2023): a query attends over retrieved values.

combine="residual" (the default):
f = z + W_o [ sum_j softmax_j((W_q z)_h . (W_k v_j)_h / sqrt(dh)) (W_v v_j)_h ]_h
combine="concat":
f = [ z ; mean_j v_j ; mean_h sum_j w_hj v_j ], w_hj the same softmax weights as above,
with W_q starting at zero, so the module starts as mean k-NN (uniform weights) and learns which
retrieved items to weight up; the raw values reach the classifier unprojected.
attend="scores" replaces the learned logits with the retrieval scores s_j = z . m_j (the search's
query . key) over a learned temperature, w_j = softmax_j(s_j / T): the weighted k-NN of the
memory keys, calibrated by training (one parameter, no projections to over-fit).

Learned projections let the module down-weight irrelevant memory items, unlike the plain mean of
the neighbours (MeanKNN). Because the attention logits are a bilinear form in (z, v_j), W_q and W_k
fold into an attention query in value space, a_h = W_k,h^T W_q,h z / sqrt(dh), and W_v applies
after the weighted sum: so at inference the whole retrieval + attention is one call of the fused
op (`fused_forward`), which never gathers the k value rows into a tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import check_number
from ..ops import fused_retrieve_attend
from .heads import masked_mean
from .retrieval import Retrieved, Retriever


@dataclass
class MemoryAttentionConfig:
    query_dim: int
    value_dim: int
    dim: int | None = None  # attention width (default: query_dim)
    heads: int = 8
    self_token: bool = False  # the query also attends to itself (as an extra item)
    drop_retrieved: float = 0.0  # training: probability of hiding each retrieved item
    residual: bool = True  # combine="residual" only: z + update (else the update alone)
    combine: str = "residual"  # "residual" or "concat" (see the module docstring)
    attend: str = "learned"  # attention logits: "learned" projections or retrieval "scores"
    temperature: float = 0.1  # attend="scores": the learned temperature's initial value

    def validate(self) -> None:
        check_number("query_dim", self.query_dim, integer=True, ge=1)
        check_number("value_dim", self.value_dim, integer=True, ge=1)
        check_number("dim", self.dim, integer=True, ge=1, optional=True)
        check_number("heads", self.heads, integer=True, ge=1)
        width = self.dim or self.query_dim
        if width % self.heads:
            raise ValueError(f"attention width {width} is not divisible by heads={self.heads}")
        check_number("drop_retrieved", self.drop_retrieved, ge=0.0, lt=1.0)
        if self.combine not in ("residual", "concat"):
            raise ValueError(f"combine must be 'residual' or 'concat', got {self.combine!r}")
        if self.combine == "concat" and self.self_token:
            raise ValueError("self_token applies to combine='residual' only")
        if self.attend not in ("learned", "scores"):
            raise ValueError(f"attend must be 'learned' or 'scores', got {self.attend!r}")
        if self.attend == "scores" and self.self_token:
            raise ValueError("self_token applies to attend='learned' only")
        check_number("temperature", self.temperature, gt=0.0)


class MemoryAttention(nn.Module):
    """Refines query embeddings z [B, query_dim] with retrieved values [B, k, value_dim]."""

    def __init__(self, cfg: MemoryAttentionConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        width = cfg.dim or cfg.query_dim
        self.heads, self.head_dim = cfg.heads, width // cfg.heads
        self.by_scores = cfg.attend == "scores"
        if self.by_scores:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature)))
        else:
            self.q = nn.Linear(cfg.query_dim, width, bias=False)
            self.k = nn.Linear(cfg.value_dim, width, bias=False)
        self.concat = cfg.combine == "concat"
        if self.concat:
            if not self.by_scores:
                nn.init.zeros_(self.q.weight)  # uniform weights at the start: mean k-NN
            self.out_dim = cfg.query_dim + 2 * cfg.value_dim
            return
        self.out_dim = cfg.query_dim
        self.v = nn.Linear(cfg.value_dim, width)
        self.out = nn.Linear(width, cfg.query_dim)
        if cfg.self_token:
            self.k_self = nn.Linear(cfg.query_dim, width, bias=False)
            self.v_self = nn.Linear(cfg.query_dim, width)

    def _split(self, x: Tensor) -> Tensor:  # [..., width] -> [..., heads, head_dim]
        return x.unflatten(-1, (self.heads, self.head_dim))

    def _weights(
        self, z: Tensor, values: Tensor, keep: Tensor | None, scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(weights [B, H (1 with attend="scores"), k (+1 with the self token, first)], the
        items kept [B, k])."""
        B, k, _ = values.shape
        if self.by_scores:
            if scores is None:
                raise ValueError("attend='scores' needs the retrieval scores [B, k] (scores=)")
            if scores.shape != (B, k):
                raise ValueError(f"scores must be [B, k]={(B, k)}, got {tuple(scores.shape)}")
            logits = (scores.to(z.dtype) / self.log_temperature.exp()).unsqueeze(1)
        else:
            q = self._split(self.q(z))  # [B, H, dh]
            keys = self._split(self.k(values))  # [B, k, H, dh]
            logits = torch.einsum("bhd,bkhd->bhk", q, keys) / math.sqrt(self.head_dim)
        mask = torch.ones(B, k, dtype=torch.bool, device=z.device) if keep is None else keep
        if self.training and self.cfg.drop_retrieved > 0:
            mask = mask & (torch.rand(B, k, device=z.device) >= self.cfg.drop_retrieved)
        logits = logits.masked_fill(~mask.unsqueeze(1), -torch.inf)
        if self.cfg.self_token:
            k_self = self._split(self.k_self(z))
            self_logit = (q * k_self).sum(-1, keepdim=True) / math.sqrt(self.head_dim)
            logits = torch.cat([self_logit, logits], -1)
        # A query with every item masked (and no self token) attends to nothing (attended = 0).
        return torch.softmax(logits, -1).nan_to_num(0.0), mask

    def forward(
        self,
        z: Tensor,
        values: Tensor,
        keep: Tensor | None = None,
        scores: Tensor | None = None,
    ) -> Tensor:
        """z [B, query_dim]; values [B, k, value_dim]; keep [B, k] bool (False: ignore item);
        scores [B, k] (the search's query . key; needed by attend="scores")."""
        values = values.to(z.dtype)
        weights, mask = self._weights(z, values, keep, scores)
        if self.concat:
            attended = torch.einsum("bk,bkd->bd", weights.mean(1), values)
            return torch.cat([z, masked_mean(values, mask), attended], -1)
        vals = self._split(self.v(values))  # [B, k, H, dh]
        weights = weights.expand(-1, self.heads, -1) if self.by_scores else weights
        if self.cfg.self_token:
            vals = torch.cat([self._split(self.v_self(z)).unsqueeze(1), vals], 1)
        update = self.out(torch.einsum("bhk,bkhd->bhd", weights, vals).flatten(1))
        return z + update if self.cfg.residual else update

    def attention_weights(
        self,
        z: Tensor,
        values: Tensor,
        keep: Tensor | None = None,
        scores: Tensor | None = None,
    ) -> Tensor:
        """[B, k]: the weight of each retrieved item, averaged over heads (the papers'
        "visualising attention scores"); with the self token, its weight is left out."""
        weights, _ = self._weights(z, values.to(z.dtype), keep, scores)
        return weights[..., 1:].mean(1) if self.cfg.self_token else weights.mean(1)

    def forward_retrieve(
        self, z: Tensor, retriever: Retriever, exclude: Tensor | None = None
    ) -> tuple[Tensor, Retrieved]:
        """Retrieves with z, then attends: the ordinary (training) path."""
        r = retriever(z, exclude)
        return self(z, r.values, r.keep, r.scores), r

    def attention_query(self, z: Tensor) -> Tensor:
        """a [B, H, value_dim], W_q and W_k folded: a_h . v = (W_q z)_h . (W_k v)_h / sqrt(dh)
        (attend="learned" only)."""
        q = self._split(self.q(z))  # [B, H, dh]
        wk = self.k.weight.unflatten(0, (self.heads, self.head_dim))  # [H, dh, value_dim]
        return torch.einsum("bhd,hdv->bhv", q, wk) / math.sqrt(self.head_dim)

    def fused_forward(
        self,
        z: Tensor,
        keys: Tensor,
        values: Tensor,
        k: int,
        exclude: Tensor | None = None,
    ) -> Tensor:
        """The fast inference path: search `keys` with z and attend over `values` in one call of
        the fused op (combine="concat" also gathers the k rows for their plain mean). Equals
        forward(z, values[top-k of z over keys]) for a module without self_token, in eval mode,
        with no near-duplicate masking."""
        if self.cfg.self_token:
            raise ValueError("fused_forward does not support self_token=True")
        if self.by_scores:  # softmax(s / T) over the search's own scores: one head
            t = float(self.log_temperature.detach().exp())
            r = fused_retrieve_attend(z.float(), keys, values, k, temperature=t, exclude=exclude)
        else:
            aq = self.attention_query(z.float())
            r = fused_retrieve_attend(z.float(), keys, values, k, attn_query=aq, exclude=exclude)
        if self.concat:
            mean = values[r.indices].to(z.dtype).mean(1)  # the op returns k valid rows or raises
            return torch.cat([z, mean, r.output.mean(1).to(z.dtype)], -1)
        # sum_j w_j (W_v v_j + b) = W_v (sum_j w_j v_j) + b, per head (weights sum to 1).
        if self.by_scores:  # one head of weights for every head of W_v
            attended = self.v(r.output[:, 0].to(z.dtype))
        else:
            wv = self.v.weight.unflatten(0, (self.heads, self.head_dim))  # [H, dh, value_dim]
            heads = torch.einsum("hdv,bhv->bhd", wv, r.output) + self._split(self.v.bias)
            attended = heads.flatten(1)
        update = self.out(attended)
        return z + update if self.cfg.residual else update
