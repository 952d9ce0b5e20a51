"""reco.demo.select and reco.demo.study: the validation split, the declared searches, early
stopping, paired intervals, the claims, the study's resume, and the committed study report."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from scipy import stats
from torch.nn import functional as F

from reco.demo.select import SearchSpace, Selection, paired_interval, stratified_holdout

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "study" / "report.json"


def test_stratified_holdout_is_balanced_disjoint_seeded_and_checks_its_pool():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 2000)
    subset = rng.choice(2000, 300, replace=False)
    pool = np.setdiff1d(np.arange(2000), subset)
    val, rest = stratified_holdout(labels, pool, 17, seed=4)
    assert np.bincount(labels[val], minlength=5).tolist() == [17] * 5
    assert not set(val) & set(subset) and not set(val) & set(rest)
    assert sorted([*val, *rest]) == sorted(pool)
    again, _ = stratified_holdout(labels, pool, 17, seed=4)
    other, _ = stratified_holdout(labels, pool, 17, seed=5)
    assert np.array_equal(val, again) and not np.array_equal(val, other)
    few = pool[labels[pool] != 2][:50]
    with pytest.raises(ValueError, match="class 0 has"):
        stratified_holdout(labels, few, 40, seed=0)
    with pytest.raises(ValueError, match="per_class"):
        stratified_holdout(labels, pool, 0, seed=0)


def test_every_method_gets_the_same_number_of_trials_from_its_declared_grid():
    space = SearchSpace(trials=4)
    for seed in range(3):
        for method, retrieves in (("linear", False), ("mlp", False), ("attention", True)):
            trials = space.draw(method, retrieves, seed)
            grid = space.grid(retrieves)
            assert len(trials) == 4 and all(t in grid for t in trials)
            assert len({json.dumps(t, sort_keys=True) for t in trials}) == 4
            assert all(("k" in t) == retrieves for t in trials)
            assert trials == space.draw(method, retrieves, seed)
    assert len(SearchSpace(trials=50).draw("linear", False, 0)) == 6  # the whole grid
    with pytest.raises(ValueError, match="trials"):
        SearchSpace(trials=0).validate()
    with pytest.raises(ValueError, match="patience"):
        SearchSpace(patience=0).validate()


def test_selection_keeps_the_first_best_trial():
    s = Selection()
    s.add({"lr": 1}, 0.5, 100)
    s.add({"lr": 2}, 0.7, 200)
    s.add({"lr": 3}, 0.7, 300)
    assert s.as_dict()["chosen"] == {"lr": 2, "val_accuracy": 0.7, "best_step": 200}


@pytest.mark.parametrize("n", [2, 5, 9])
def test_paired_interval_is_scipys_one_sample_t_interval(n):
    d = np.random.default_rng(n).normal(0.03, 0.05, n)
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    iv = paired_interval(list(d))
    assert iv["n"] == n and math.isclose(iv["mean"], d.mean(), rel_tol=1e-12)
    assert math.isclose(iv["lo"], ref.low, rel_tol=1e-9)
    assert math.isclose(iv["hi"], ref.high, rel_tol=1e-9)
    one = paired_interval([0.2])
    assert one["mean"] == 0.2 and math.isnan(one["lo"]) and math.isnan(one["hi"])
    with pytest.raises(ValueError, match="diffs"):
        paired_interval([])


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def small_run(tmp_path):
    from reco.demo.data import MemoryItems, write_memory
    from reco.demo.longtail import LongTailData, LongTailParams, LongTailRun
    from reco.encoders import FunctionEncoder

    n, d = 400, 16
    centres = _unit(4, d, seed=9)

    def sample(m, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 4, (m,), generator=g)
        return F.normalize(centres[y] + 0.6 * torch.randn(m, d, generator=g), dim=-1), y

    mem_z, mem_y = sample(n, 1)
    items = MemoryItems(
        mem_z.numpy().astype(np.float16),
        F.one_hot(mem_y, 8).float().numpy(),
        mem_y.numpy(),
        ["a", "b", "c", "d"],
        [f"item {i}" for i in range(n)],
        np.zeros(n, np.int64),
        [f"set/{i}" for i in range(n)],
    )
    enc = FunctionEncoder("id", d, image_fn=lambda x: x).info()
    mem = write_memory(tmp_path / "m", items, enc, enc, source={})
    (tz, ty), (vz, vy), (sz, sy) = sample(96, 2), sample(60, 3), sample(80, 4)
    data = LongTailData(tz, ty, torch.bincount(ty, minlength=4), sz, sy, vz, vy)
    p = LongTailParams(k=5, steps=40, batch_size=32, attention_dim=16, heads=2)
    return LongTailRun(data, mem, p, seed=0, device=torch.device("cpu"), kmax=8)


def test_early_stopping_keeps_the_best_validation_checkpoint(small_run):
    from reco.train.tasks import LongTailTask, logit_adjustment
    from reco.train.trainer import TrainConfig, Trainer

    run = small_run
    model = run.train("linear", {"lr": 0.05}, eval_every=5)
    assert model.best_step % 5 == 0 and 5 <= model.best_step <= 40
    assert model.val_accuracy == pytest.approx(run.accuracy(model, "val"))
    # The kept weights are those a run stopped at best_step would have (batches are a
    # function of the step, the schedule of the total steps).
    from reco.demo.longtail import make_model

    torch.manual_seed(0)
    again = make_model("linear", 16, run.retriever.value_dim, 4, run.p)
    cfg = TrainConfig(
        steps=40,
        batch_size=32,
        lr=0.05,
        weight_decay=run.p.weight_decay,
        warmup_steps=4,
        seed=0,
        progress=False,
        resume=False,
    )
    adjust = logit_adjustment(run.data.counts, run.p.logit_adjust)  # as every method trains
    task = LongTailTask(run.retriever, logit_adjust=adjust)
    Trainer(again, task, run._dataset(), cfg, device="cpu").fit(model.best_step)
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_select_tries_each_trial_and_returns_the_chosen_one(small_run):
    space = SearchSpace(trials=3, lr=(0.003, 0.05), k=(2, 8), eval_every=10)
    model, sel = small_run.select("attention", space)
    record = sel.as_dict()
    assert len(record["trials"]) == 3
    best = max(t["val_accuracy"] for t in record["trials"])
    assert record["chosen"]["val_accuracy"] == best
    assert model.k == record["chosen"]["k"]
    assert small_run.accuracy(model, "val") == pytest.approx(best)
    with pytest.raises(ValueError, match="kmax"):
        small_run.select("attention", SearchSpace(trials=1, k=(9,), weight_decay=(0.0,)))


def _fake_runs(shift_few: float, shift_many: float, seeds=5, spread=0.01):
    rng = np.random.default_rng(0)
    runs = {}
    for s in range(seeds):
        base = {"many": 0.9, "medium": 0.7, "few": 0.4, "all": 0.7}
        res = {}
        for m in ("linear", "mlp", "mean_knn"):
            res[m] = {b: v + rng.normal(0, spread) for b, v in base.items()}
        res["attention"] = {
            b: res["linear"][b] + {"few": shift_few, "many": shift_many}.get(b, 0.0) for b in base
        }
        runs[str(s)] = {"0.25": res}
    return runs


def test_claims_follow_the_intervals():
    from reco.demo.study import check_claims, differences, verdict

    zs_runs = {
        str(s): {
            "small CLIP": {"unseen": 0.1},
            "RECO search=uni fusion=cross k=10": {"unseen": 0.1 + gain},
            "RECO, memory without unseen classes": {"unseen": 0.05},
        }
        for s, gain in enumerate([0.3, 0.35, 0.4])
    }
    from reco.demo.study import zeroshot_gains

    zs = {"d": {"gains": zeroshot_gains(zs_runs, 10)}}
    good = {"d/10": {"differences": differences(_fake_runs(0.05, 0.0), "0.25")}}
    claims = check_claims(good, zs, 10)
    assert len(claims) == 5 and verdict(claims) == "holds"
    few = next(c for c in claims if "few" in c["claim"])["value"]
    assert few["mean"] == pytest.approx(0.05) and few["lo"] > 0
    bad = {"d/10": {"differences": differences(_fake_runs(0.05, -0.02), "0.25")}}
    failed = [c for c in check_claims(bad, zs, 10) if not c["holds"]]
    assert [c["claim"] for c in failed] == ["many-shot: MemoryAttention within 1 point of linear"]
    # A mean above 0 whose interval reaches below 0 does not hold.
    noisy = _fake_runs(0.0, 0.0)
    for s, r in noisy.items():
        r["0.25"]["attention"]["few"] = r["0.25"]["linear"]["few"] + (0.1 if s in "024" else -0.1)
    failed = check_claims({"d/10": {"differences": differences(noisy, "0.25")}}, zs, 10)
    assert verdict(failed) == "fails"
    # A ratio without few-shot classes: those claims do not apply (neither hold nor fail).
    none = _fake_runs(0.05, 0.0)
    for r in none.values():
        for m in r["0.25"].values():
            m["few"] = math.nan
    claims = check_claims({"d/10": {"differences": differences(none, "0.25")}}, zs, 10)
    assert [c["holds"] for c in claims] == [None, None, None, True, True]
    assert verdict(claims) == "holds" and verdict(claims[:3]) == "fails"


def test_study_resumes_at_the_first_missing_unit_and_refuses_another_config(tmp_path, monkeypatch):
    from reco.demo import study as st
    from reco.demo.run import Demo

    calls = []

    def load(self):
        self.device = torch.device("cpu")

    def longtail_seed(self, s, ratio, noises, bar=None, explain=False, fused=True):
        calls.append(("lt", self.cfg.dataset, ratio, s))
        runs = _fake_runs(0.05 + 0.001 * s, 0.0, seeds=1)["0"]
        return {
            "runs": runs,
            "selection": {},
            "explain": None,
            "profile": [9, 1],
            "split": {"train": 10, "val": 4, "memory": 5},
        }

    def zeroshot_seed(self, s, ablations, bar=None):
        calls.append(("zs", self.cfg.dataset, s))
        res = {
            "small CLIP": {"seen": 0.9, "unseen": 0.1, "all": 0.5},
            "RECO search=uni fusion=cross k=10": {"seen": 0.9, "unseen": 0.5 + s / 100, "all": 0.7},
            "RECO, memory without unseen classes": {"seen": 0.9, "unseen": 0.1, "all": 0.5},
        }
        return {"res": res, "selection": {}, "setup": {}}

    monkeypatch.setattr(Demo, "load", load)
    monkeypatch.setattr(Demo, "longtail_seed", longtail_seed)
    monkeypatch.setattr(Demo, "zeroshot_seed", zeroshot_seed)
    monkeypatch.setattr("reco.demo.report._study_figures", lambda report, out: [])
    cfg = st.StudyConfig(
        datasets=("mnist", "fashion-mnist"),
        imbalances=(10.0, 50.0),
        seeds=3,
        out=str(tmp_path / "s"),
    )
    first = st.Study(cfg).run()
    assert len(calls) == 2 * (2 * 3 + 3)
    assert first["study"]["verdict"] == "holds"
    assert set(first["study"]["settings"]) == {
        "mnist/10",
        "mnist/50",
        "fashion-mnist/10",
        "fashion-mnist/50",
    }
    assert first["longtail"]["setting"] == "mnist/10"
    assert set(first["longtail"]["runs"]["0"]["0.25"]["attention"]) >= {"few", "many"}
    calls.clear()
    (tmp_path / "s" / "runs" / "mnist" / "lt-ratio50-seed1.json").unlink()
    again = st.Study(cfg).run()
    assert calls == [("lt", "mnist", 50.0, 1)]
    assert again["study"]["claims"] == first["study"]["claims"]
    saved = json.loads((tmp_path / "s" / "report.json").read_text())
    assert [c["holds"] for c in st.recheck(saved)] == [c["holds"] for c in saved["study"]["claims"]]
    # A long-tail setting changed: its runs are refused while saved; once they are removed
    # they run again and the zero-shot runs (whose fields did not change) are kept.
    other = dataclasses.replace(cfg, demo=dataclasses.replace(cfg.demo))
    other.demo.longtail = dataclasses.replace(cfg.demo.longtail, steps=7)
    with pytest.raises(ValueError, match="holds long-tail runs of another config"):
        st.Study(other).run()
    for p in (tmp_path / "s" / "runs").glob("*/lt-*.json"):
        p.unlink()
    calls.clear()
    st.Study(other).run()
    assert sorted(c[0] for c in calls) == ["lt"] * 12
    zs_changed = dataclasses.replace(other, demo=dataclasses.replace(other.demo))
    zs_changed.demo.zeroshot = dataclasses.replace(other.demo.zeroshot, pretrain=99)
    with pytest.raises(ValueError, match="holds zero-shot runs of another config"):
        st.Study(zs_changed).run()
    # More seeds grow the study in place: only the new seed's runs run. The report quotes the
    # kernel-level check where benchmarks/study_levels.py left one in the folder.
    levels = [("avx512bf16", 0.0), ("avx512bf16", 0.0), ("avx2", 0.015)]
    (tmp_path / "s" / "study_levels.json").write_text(
        json.dumps(
            {
                "setting": {"dataset": "mnist", "imbalance": 10.0, "seed": 0},
                "runs": [{"level": lv, "max_abs_diff_to_first": d} for lv, d in levels],
            }
        )
    )
    calls.clear()
    st.Study(dataclasses.replace(other, seeds=4)).run()
    assert "avx512bf16 0.0, avx2 1.5" in (tmp_path / "s" / "report.md").read_text()
    assert sorted(calls) == sorted(
        [("lt", d, r, 3) for d in ("mnist", "fashion-mnist") for r in (10.0, 50.0)]
        + [("zs", d, 3) for d in ("mnist", "fashion-mnist")]
    )
    with pytest.raises(ValueError, match="seeds must be >= 2"):
        st.StudyConfig(seeds=1).validate()


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed study report")
def test_committed_study_report_and_the_readme_agree_with_the_claims_recomputed():
    """The committed study is of 2 datasets x 3 ratios x 5 seeds (the runs it lacks, if it was
    cut short, are listed); its claims, recomputed from its per-seed accuracies alone, give the
    verdict it states; the README quotes that verdict (and says partial where it is)."""
    from reco.demo.study import recheck, verdict

    report = json.loads(COMMITTED.read_text())
    cfg = report["config"]
    assert sorted(cfg["datasets"]) == ["fashion-mnist", "mnist"]
    assert len(cfg["imbalances"]) == 3 and cfg["seeds"] == 5
    st = report["study"]
    settings = st["settings"]
    runs = sum(len(s["runs"]) for s in settings.values())
    runs += sum(len(z["runs"]) for z in st["zeroshot"].values())
    assert runs + len(st["missing"]) == 2 * (3 + 1) * 5
    assert st["complete"] == (not st["missing"])
    for s in settings.values():
        for seed_runs in s["runs"].values():
            for m in ("linear", "mlp", "mean_knn", "attention"):
                assert {"many", "medium", "few", "all"} <= set(seed_runs["0.25"][m])
    claims = recheck(report)
    stated = st["claims"]
    assert [(c["claim"], c["setting"], c["holds"]) for c in claims] == [
        (c["claim"], c["setting"], c["holds"]) for c in stated
    ]
    computed = verdict(claims)
    assert st["verdict"] == computed
    readme = (ROOT / "README.md").read_text()
    quoted = re.search(r"The study's verdict: \*\*(holds|fails)\*\*( \(partial)?", readme)
    assert quoted is not None and quoted.group(1) == computed
    assert (quoted.group(2) is not None) == (not st["complete"])


def test_study_cli_reports_bad_arguments(tmp_path, capsys):
    from reco.cli import main

    assert main(["study", "--seeds", "1", "--out", str(tmp_path / "s")]) == 2
    assert "seeds must be >= 2" in capsys.readouterr().err
    assert main(["study", "--imbalances", "0.5", "--out", str(tmp_path / "s")]) == 2
    assert "imbalances must be >= 1" in capsys.readouterr().err
    assert main(["study", "--trials", "0", "--out", str(tmp_path / "s")]) == 2
    assert "trials must be >= 1" in capsys.readouterr().err
