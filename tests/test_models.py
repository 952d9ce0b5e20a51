"""reco.models: shapes, masks, the fused inference path, and an independent reference layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from reco.models import (
    RECO,
    FusionConfig,
    FusionTransformer,
    MeanKNN,
    MemoryAttention,
    MemoryAttentionConfig,
    RECOConfig,
    Retriever,
)


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_fusion_layer_equals_a_torch_pre_norm_encoder_layer():
    """At the query token, FusionTransformer is exactly nn.TransformerEncoderLayer(norm_first)."""
    torch.manual_seed(0)
    cfg = FusionConfig(dim=64, heads=4, mlp_ratio=4.0, zero_init=False)
    fusion = FusionTransformer(cfg).eval()
    ref = nn.TransformerEncoderLayer(
        64, 4, 256, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    ).eval()
    ref.self_attn.load_state_dict(fusion.attn.state_dict())
    ref.norm1.load_state_dict(fusion.norm1.state_dict())
    ref.norm2.load_state_dict(fusion.norm2.state_dict())
    ref.linear1.load_state_dict(fusion.mlp[0].state_dict())
    ref.linear2.load_state_dict(fusion.mlp[3].state_dict())
    q, r = torch.randn(5, 64), torch.randn(5, 7, 64)
    want = nn.functional.normalize(ref(torch.cat([q[:, None], r], 1))[:, 0], dim=-1)
    torch.testing.assert_close(fusion(q, r), want, atol=1e-5, rtol=1e-5)


def test_zero_init_fusion_starts_as_the_identity_and_learns():
    torch.manual_seed(0)
    q, r = torch.randn(4, 32), torch.randn(4, 5, 32)
    fusion = FusionTransformer(FusionConfig(dim=32, heads=4))
    torch.testing.assert_close(fusion(q, r), nn.functional.normalize(q, dim=-1))
    random = FusionTransformer(FusionConfig(dim=32, heads=4, zero_init=False))
    assert (random(q, r) - nn.functional.normalize(q, dim=-1)).abs().max() > 1e-2
    # The zeroed projections still get gradients, so the retrieved items come into play.
    target = nn.functional.normalize(r.mean(1), dim=-1)
    opt = torch.optim.SGD(fusion.parameters(), lr=0.5)
    for _ in range(20):
        loss = -(fusion(q, r) * target).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fusion.attn.out_proj.weight.abs().max() > 0
    assert (fusion(q, r) * target).sum(1).mean() > (
        nn.functional.normalize(q, dim=-1) * target
    ).sum(1).mean() + 0.1


def test_fusion_size_matches_the_paper():
    n = sum(p.numel() for p in FusionTransformer(FusionConfig(dim=512)).parameters())
    assert 3.1e6 < n < 3.3e6, n  # "about 3.2M parameters for CLIP-B/32"


def test_masked_items_do_not_matter():
    torch.manual_seed(1)
    q, r = torch.randn(3, 32), torch.randn(3, 6, 32)
    keep = torch.tensor([[1, 1, 0, 1, 0, 1]] * 3, dtype=torch.bool)
    r2 = r.clone()
    r2[~keep] = 100.0
    fusion = FusionTransformer(FusionConfig(dim=32, heads=4, zero_init=False)).eval()
    torch.testing.assert_close(fusion(q, r, keep), fusion(q, r2, keep))
    for combine in ("residual", "concat"):
        att = MemoryAttention(MemoryAttentionConfig(32, 32, heads=4, combine=combine)).eval()
        nn.init.normal_(att.q.weight)  # concat starts with zero W_q: make the weights vary
        torch.testing.assert_close(att(q, r, keep), att(q, r2, keep))
    knn = MeanKNN(query=False)
    torch.testing.assert_close(knn(q, r, keep), r[:, [0, 1, 3, 5]].mean(1))


@pytest.mark.parametrize("attend", ["learned", "scores"])
@pytest.mark.parametrize("combine", ["residual", "concat"])
def test_fused_inference_path_equals_the_module(combine, attend):
    torch.manual_seed(2)
    keys, values = _unit(3000, 24, seed=3), _unit(3000, 40, seed=4)
    z = _unit(9, 24, seed=5)
    for heads in (1, 4):
        cfg = MemoryAttentionConfig(24, 40, dim=32, heads=heads, combine=combine, attend=attend)
        att = MemoryAttention(cfg).eval()
        if attend == "learned":
            nn.init.normal_(att.q.weight)
        else:
            nn.init.constant_(att.log_temperature, -3.0)  # weights far from uniform
        want, _ = att.forward_retrieve(z, Retriever(keys, values, k=12))
        got = att.fused_forward(z, keys, values, 12)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # Gradients reach the module's weights through the fused op too (attend="scores": the
        # temperature enters the op as a number, so it trains through the ordinary forward).
        att.train()
        if attend == "scores":
            att.forward_retrieve(z, Retriever(keys, values, k=12))[0].sum().backward()
        else:
            att.fused_forward(z, keys, values, 12).sum().backward()
        params = (att.log_temperature,) if attend == "scores" else (att.q.weight, att.k.weight)
        params += () if combine == "concat" else (att.v.weight,)
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def test_score_attention_is_a_weighted_knn_with_a_learned_temperature():
    """attend="scores": w = softmax(s / T) over the retrieval scores (numpy here), T learned."""
    import numpy as np

    torch.manual_seed(4)
    z, values, scores = torch.randn(4, 6), torch.randn(4, 5, 3), torch.rand(4, 5)
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[1, 2] = False
    cfg = MemoryAttentionConfig(6, 3, heads=2, combine="concat", attend="scores", temperature=0.2)
    att = MemoryAttention(cfg).eval()
    got = att(z, values, keep, scores).detach().numpy()
    for b in range(4):
        s, v = scores[b].numpy()[keep[b].numpy()], values[b].numpy()[keep[b].numpy()]
        w = np.exp((s - s.max()) / 0.2)
        np.testing.assert_allclose(got[b], np.r_[z[b], v.mean(0), (w / w.sum()) @ v], rtol=1e-5)
    att.train()
    att(z, values, keep, scores).square().sum().backward()
    assert float(att.log_temperature.grad.abs()) > 0
    with pytest.raises(ValueError, match="needs the retrieval scores"):
        att(z, values, keep)
    with pytest.raises(ValueError, match=r"scores must be \[B, k\]"):
        att(z, values, keep, scores[:, :3])
    with pytest.raises(ValueError, match="attend must be 'learned' or 'scores', got 'dot'"):
        MemoryAttention(MemoryAttentionConfig(6, 3, heads=1, attend="dot"))
    with pytest.raises(ValueError, match="temperature must be"):
        MemoryAttention(MemoryAttentionConfig(6, 3, heads=1, attend="scores", temperature=0.0))


def test_concat_attention_against_an_independent_computation():
    """combine="concat": [z ; plain mean ; head-averaged softmax(q_h . k_hj / sqrt(dh)) weights
    of the raw values], written here with numpy; at the start (W_q zero) it is mean k-NN."""
    import numpy as np

    torch.manual_seed(3)
    z, values = torch.randn(5, 12), torch.randn(5, 7, 10)
    keep = torch.rand(5, 7) > 0.3
    keep[:, 0] = True
    att = MemoryAttention(MemoryAttentionConfig(12, 10, dim=8, heads=2, combine="concat")).eval()
    assert att.out_dim == 12 + 2 * 10
    start = att(z, values, keep)
    kn = keep.numpy()
    mean = np.stack([values[b].numpy()[kn[b]].mean(0) for b in range(5)])
    np.testing.assert_allclose(start.detach().numpy(), np.c_[z, mean, mean], rtol=1e-5, atol=1e-6)
    nn.init.normal_(att.q.weight)
    got = att(z, values, keep).detach().numpy()
    wq, wk = att.q.weight.detach().numpy(), att.k.weight.detach().numpy()
    for b in range(5):
        v = values[b].numpy()[kn[b]]
        q, k = (wq @ z[b].numpy()).reshape(2, 4), (v @ wk.T).reshape(-1, 2, 4)
        logits = np.einsum("hd,khd->hk", q, k) / 2.0
        w = np.exp(logits - logits.max(1, keepdims=True))
        w = (w / w.sum(1, keepdims=True)).mean(0)
        np.testing.assert_allclose(got[b, 22:], w @ v, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[b, 12:22], v.mean(0), rtol=1e-5, atol=1e-6)


def test_retriever_exclude_and_near_duplicates():
    keys = _unit(500, 16, seed=6)
    values = torch.arange(500, dtype=torch.float32)[:, None].repeat(1, 3)
    z = keys[[10, 20]]  # two memory items as queries: each finds itself first
    r = Retriever(keys, values, k=4)(z)
    assert r.indices[:, 0].tolist() == [10, 20]
    assert torch.equal(r.values[:, :, 0].long(), r.indices)
    r = Retriever(keys, values, k=4)(z, exclude=torch.tensor([[10], [20]]))
    assert 10 not in r.indices[0].tolist() and 20 not in r.indices[1].tolist()
    r = Retriever(keys, values, k=4, near_duplicate=0.999)(z)
    assert r.keep[:, 0].tolist() == [False, False] and bool(r.keep[:, 1:].all())
    with pytest.raises(ValueError, match="k=600 exceeds the memory's 500 rows"):
        Retriever(keys, values, k=600)


def test_reco_config_switches_search_and_fusion_modalities(tmp_path):
    import numpy as np

    from reco.memory import EncoderInfo, Memory, MemoryWriter, ModalityInfo

    rng = np.random.default_rng(0)
    mods = {m: ModalityInfo(16, "float32", EncoderInfo("e")) for m in ("image", "text")}
    img = rng.standard_normal((200, 16)).astype(np.float32)
    txt = rng.standard_normal((200, 16)).astype(np.float32)
    with MemoryWriter(tmp_path / "m", mods) as w:
        w.add({"image": img, "text": txt})
    mem = Memory.open(tmp_path / "m")
    q = torch.from_numpy(img[:3])
    for search, fusion in (
        ("image", "text"),
        ("image", "image"),
        ("text", "text"),
        ("text", "image"),
    ):
        model = RECO(
            RECOConfig(
                k=5, image_search=search, image_fusion=fusion, fusion=FusionConfig(dim=16, heads=2)
            )
        )
        r = model.retrievers(mem)["image"](q)
        keys = torch.from_numpy(img if search == "image" else txt)
        vals = torch.from_numpy(img if fusion == "image" else txt)
        assert torch.equal(r.indices, torch.topk(q @ keys.T, 5).indices)
        torch.testing.assert_close(r.values, vals[r.indices])
        out = model.refine("image", q, model.retrievers(mem)["image"])
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))


def test_bad_configs():
    with pytest.raises(ValueError, match="not divisible by heads"):
        FusionTransformer(FusionConfig(dim=30, heads=4))
    with pytest.raises(ValueError, match="drop_retrieved"):
        MemoryAttention(MemoryAttentionConfig(8, 8, heads=1, drop_retrieved=1.0))
    with pytest.raises(ValueError, match="self_token"):
        att = MemoryAttention(MemoryAttentionConfig(8, 8, heads=1, self_token=True))
        att.fused_forward(torch.randn(1, 8), torch.randn(5, 8), torch.randn(5, 8), 2)
    with pytest.raises(ValueError, match="combine must be 'residual' or 'concat', got 'sum'"):
        MemoryAttention(MemoryAttentionConfig(8, 8, heads=1, combine="sum"))
    with pytest.raises(ValueError, match="self_token applies to combine='residual' only"):
        MemoryAttention(MemoryAttentionConfig(8, 8, heads=1, self_token=True, combine="concat"))


@pytest.mark.parametrize(
    ("make", "field", "value"),
    [
        (lambda v: FusionConfig(dim=32, heads=v), "heads", 0),
        (lambda v: FusionConfig(dim=32, heads=v), "heads", -2),
        (lambda v: FusionConfig(dim=v, heads=1), "dim", 0),
        (lambda v: FusionConfig(dim=32, heads=4, mlp_ratio=v), "mlp_ratio", float("nan")),
        (lambda v: FusionConfig(dim=32, heads=4, mlp_ratio=v), "mlp_ratio", 0.0),
        (lambda v: FusionConfig(dim=32, heads=4, dropout=v), "dropout", float("nan")),
        (lambda v: FusionConfig(dim=32, heads=4, dropout=v), "dropout", 1.0),
        (lambda v: MemoryAttentionConfig(8, 8, heads=v), "heads", 0),
        (lambda v: MemoryAttentionConfig(8, 8, heads=v), "heads", -2),
        (lambda v: MemoryAttentionConfig(8, 8, dim=v, heads=1), "dim", 0),
        (lambda v: MemoryAttentionConfig(v, 8, heads=1), "query_dim", 0),
        (lambda v: MemoryAttentionConfig(8, v, heads=1), "value_dim", -3),
        (lambda v: MemoryAttentionConfig(8, 8, heads=1, drop_retrieved=v), "drop_retrieved", -0.1),
        (
            lambda v: MemoryAttentionConfig(8, 8, heads=1, drop_retrieved=v),
            "drop_retrieved",
            float("nan"),
        ),
        (lambda v: RECOConfig(k=v), "k", 0),
        (lambda v: RECOConfig(near_duplicate=v), "near_duplicate", float("nan")),
    ],
)
def test_out_of_range_config_values_name_the_field(make, field, value):
    """ValueError naming the field (not a ZeroDivisionError, nor a model that trains to NaN)."""
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got {value}"):
        make(value).validate()
    with pytest.raises(TypeError, match=rf"^{field} must be"):
        make("3").validate()


@pytest.mark.parametrize(
    "aggregator, head",
    [("none", "linear"), ("none", "mlp"), ("mean_knn", "linear"), ("attention", "mlp")],
)
def test_build_model_is_the_one_factory(aggregator, head):
    """build_model draws the same parameters as building the parts by hand (aggregator first)."""
    from reco.models import ClassifierConfig, LinearHead, MLPHead, RetrievalClassifier, build_model

    torch.manual_seed(0)
    model = build_model(ClassifierConfig(16, 8, 5, aggregator, head, attention_dim=8, heads=2))
    torch.manual_seed(0)
    agg = {
        "none": lambda: None,
        "mean_knn": MeanKNN,
        "attention": lambda: MemoryAttention(MemoryAttentionConfig(16, 8, 8, 2)),
    }[aggregator]()
    feat = 16 + 8 if aggregator == "mean_knn" else 16
    parts = LinearHead(feat, 5) if head == "linear" else MLPHead(feat, 5)
    expected = RetrievalClassifier(agg, parts)
    got, want = model.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert isinstance(build_model(RECOConfig(k=3)), RECO)
    with pytest.raises(ValueError, match="aggregator"):
        build_model(ClassifierConfig(16, 8, 5, "max"))
    with pytest.raises(TypeError, match="ClassifierConfig"):
        build_model({"head": "linear"})
