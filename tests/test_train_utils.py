"""reco.train utilities: configs (YAML/TOML into checked dataclasses), checkpoints (bit-exact
resume in one safetensors file) and the cosine-with-warmup schedule."""

# The checkpoint must save and restore numpy's legacy global RNG, so the tests use it on purpose.
# ruff: noqa: NPY002

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reco.config import ConfigError, dump_config, from_dict, load_config, to_dict
from reco.train.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from reco.train.schedule import cosine_warmup_factor, cosine_with_warmup


@pytest.fixture(autouse=True)
def _keep_global_rngs():
    """These tests seed and draw from the global RNGs; put them back for the tests after."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class OptimCfg:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


@dataclass
class DataCfg:
    root: Path
    sizes: list[int] = field(default_factory=lambda: [224])
    crop: Optional[int] = None  # noqa: UP045 (the Optional[...] spelling is what is tested)
    labels: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainCfg:
    data: DataCfg
    steps: int
    name: str = "run"
    mode: Literal["linear", "fused"] = "fused"
    optim: OptimCfg = field(default_factory=OptimCfg)
    seed: int | None = 0
    layers: tuple[int, ...] = (1, 2)
    amp: bool = False


def _full_cfg() -> TrainCfg:
    return TrainCfg(
        data=DataCfg(root=Path("/data/x y"), sizes=[128, 256], crop=96, labels={"a b": 1.5}),
        steps=100,
        name='quote " and \\ and é',
        mode="linear",
        optim=OptimCfg(lr=3e-4, betas=(0.8, 0.95), weight_decay=0.05),
        seed=None,
        layers=(3, 4, 5),
        amp=True,
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".toml"])
def test_config_round_trip(tmp_path, suffix):
    cfg = _full_cfg()
    if suffix == ".toml":
        # TOML has no null: only None fields that default to None can be written (left out).
        cfg = dataclasses.replace(cfg, seed=7, data=dataclasses.replace(cfg.data, crop=None))
    path = tmp_path / f"cfg{suffix}"
    dump_config(cfg, path)
    back = load_config(path, TrainCfg)
    assert back == cfg
    assert isinstance(back.data.root, Path) and isinstance(back.layers, tuple)
    assert isinstance(back.optim.betas, tuple)
    assert to_dict(back)["data"]["root"] == "/data/x y"


def test_config_reads_hand_written_yaml_and_toml(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "steps: 10\ndata:\n  root: /d\n  sizes: [1, 2]\noptim:\n  lr: 1\n  betas: [0.5, 0.6]\n"
    )
    (tmp_path / "c.toml").write_text(
        'steps = 10\n\n[data]\nroot = "/d"\nsizes = [1, 2]\n\n[optim]\nlr = 1\nbetas = [0.5, 0.6]\n'
    )
    a, b = load_config(tmp_path / "c.yaml", TrainCfg), load_config(tmp_path / "c.toml", TrainCfg)
    assert a == b
    assert a.optim.lr == 1.0 and isinstance(a.optim.lr, float)  # int accepted for float
    assert a.optim.betas == (0.5, 0.6) and a.data.root == Path("/d") and a.data.crop is None
    assert a.mode == "fused" and a.seed == 0  # defaults


def test_config_unknown_key_names_path_and_suggests(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "steps: 1\ndata: {root: /d}\noptim: {lr: 0.1, wieght_decay: 1}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.yaml", TrainCfg)
    msg = str(e.value)
    assert "'optim.wieght_decay'" in msg and "did you mean 'optim.weight_decay'" in msg
    assert "lr, betas, weight_decay" in msg and "c.yaml" in msg


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"steps": "10"}, "steps: expected int, got '10'"),
        ({"steps": 1.5}, "steps: expected int"),
        ({"steps": True}, "steps: expected int, got True"),  # bool is not an int here
        ({"steps": 1, "optim": {"lr": False}}, "optim.lr: expected float, got False"),
        ({"steps": 1, "optim": {"lr": "1e-3"}}, "optim.lr: expected float"),
        ({"steps": 1, "amp": 1}, "amp: expected bool"),
        ({"steps": 1, "name": 3}, "name: expected str"),
        ({"steps": 1, "layers": [1, "x"]}, "layers[1]: expected int"),
        ({"steps": 1, "optim": {"betas": [0.9]}}, "optim.betas: expected 2 items"),
        ({"steps": 1, "optim": 3}, "optim: expected a mapping"),
        ({"steps": 1, "seed": "x"}, "seed: expected int | None"),
        ({"steps": 1, "data": {"root": "/d", "sizes": 3}}, "data.sizes: expected list[int]"),
        (
            {"steps": 1, "data": {"root": "/d", "labels": {"a": "b"}}},
            "data.labels.a: expected float",
        ),
        ({"steps": 1, "data": {"root": 5}}, "data.root: expected Path"),
    ],
)
def test_config_wrong_types(data, fragment):
    data = {"data": {"root": "/d"}, **data}
    with pytest.raises(ConfigError) as e:
        from_dict(TrainCfg, data)
    assert fragment in str(e.value)


def test_config_missing_and_literal():
    with pytest.raises(ConfigError, match=r"missing required key\(s\) data, steps"):
        from_dict(TrainCfg, {})
    with pytest.raises(ConfigError, match=r"missing required key\(s\) data\.root"):
        from_dict(TrainCfg, {"steps": 1, "data": {}})
    with pytest.raises(ConfigError, match=r"mode: 'slow' is not one of .*'linear', 'fused'"):
        from_dict(TrainCfg, {"steps": 1, "data": {"root": "/d"}, "mode": "slow"})


def test_config_validate_hook_and_errors_are_value_errors():
    with pytest.raises(ConfigError, match="lr must be > 0"):
        from_dict(TrainCfg, {"steps": 1, "data": {"root": "/d"}, "optim": {"lr": -1}})
    assert issubclass(ConfigError, ValueError)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml", TrainCfg)
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config(tmp_path / "c.json", TrainCfg)
    (tmp_path / "bad.toml").write_text("steps = = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: cannot parse"):
        load_config(tmp_path / "bad.toml", TrainCfg)


def test_config_toml_refuses_none_without_none_default(tmp_path):
    @dataclass
    class C:
        x: Optional[int] = 3  # noqa: UP045

    with pytest.raises(ConfigError, match="x: TOML cannot hold None"):
        dump_config(C(x=None), tmp_path / "c.toml")
    dump_config(C(x=None), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", C) == C(x=None)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _setup(init_seed: int):
    torch.manual_seed(init_seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = cosine_with_warmup(opt, warmup_steps=3, total_steps=10, min_lr_ratio=0.1)
    return model, opt, sched


def _train(model, opt, sched, x, y, steps):
    for _ in range(steps):
        # Noise from all three RNGs, so a resume that does not restore them diverges.
        noise = torch.randn_like(x) * (0.1 + 0.01 * random.random())
        noise += float(np.random.standard_normal()) * 0.01
        loss = torch.nn.functional.mse_loss(model(x + noise), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _data():
    g = torch.Generator().manual_seed(7)
    return torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)


def _seed_all(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def test_checkpoint_resume_is_bitwise_exact(tmp_path):
    x, y = _data()
    n = 6  # resume in the cosine part; the last steps run past total_steps (constant lr)

    model_a, opt_a, sched_a = _setup(0)
    _seed_all(1)
    _train(model_a, opt_a, sched_a, x, y, 2 * n)
    rng_a = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())

    model_b, opt_b, sched_b = _setup(0)
    _seed_all(1)
    _train(model_b, opt_b, sched_b, x, y, n)
    path = checkpoint_path(tmp_path, n)
    save_checkpoint(
        path,
        model=model_b,
        optimizer=opt_b,
        scheduler=sched_b,
        step=n,
        config={"lr": 1e-2, "nested": {"a": [1, 2]}},
        extra={"best": 0.5, "t": torch.arange(3)},
    )
    _seed_all(99)  # scramble the RNGs: the load must restore them

    model_c, opt_c, sched_c = _setup(123)  # a different init: everything comes from the file
    assert not torch.equal(model_c[0].weight, model_b[0].weight)
    info = load_checkpoint(path, model=model_c, optimizer=opt_c, scheduler=sched_c)
    assert info["step"] == n
    assert info["config"] == {"lr": 1e-2, "nested": {"a": [1, 2]}}
    assert info["extra"]["best"] == 0.5 and torch.equal(info["extra"]["t"], torch.arange(3))
    _train(model_c, opt_c, sched_c, x, y, n)

    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    assert sa["param_groups"] == sc["param_groups"]
    assert sa["state"].keys() == sc["state"].keys()
    for i in sa["state"]:
        assert sa["state"][i].keys() == sc["state"][i].keys()
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sc["state"][i][k]), (i, k)
    assert sched_a.state_dict() == sched_c.state_dict()
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]
    assert isinstance(opt_c.param_groups[0]["betas"], tuple)  # tuples survive the JSON
    # And the RNG streams go on identically.
    assert torch.equal(rng_a[0], torch.get_rng_state())
    assert np.array_equal(rng_a[1], np.random.get_state()[1]) and rng_a[2] == random.getstate()


def test_checkpoint_restores_rng_streams(tmp_path):
    model = torch.nn.Linear(2, 2)
    _seed_all(5)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, step=0, config={})
    expected = (torch.randn(4), np.random.standard_normal(4), [random.random() for _ in range(4)])
    _seed_all(6)
    load_checkpoint(path, model=model)
    got = (torch.randn(4), np.random.standard_normal(4), [random.random() for _ in range(4)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    _seed_all(6)
    before = torch.get_rng_state()
    load_checkpoint(path, model=model, restore_rng=False)
    assert torch.equal(before, torch.get_rng_state())


def test_checkpoint_errors(tmp_path):
    model, opt, sched = _setup(0)
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors", model=model)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"foreign\.safetensors is not a reco checkpoint"):
        load_checkpoint(foreign, model=model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match=r"garbage\.safetensors is not a reco checkpoint"):
        load_checkpoint(garbage, model=model)

    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, step=3, config={})
    wider = torch.nn.Sequential(torch.nn.Linear(6, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3))
    with pytest.raises(ValueError, match=r"model key '0.weight' has shape \(16, 6\)"):
        load_checkpoint(path, model=wider)
    deeper = torch.nn.Sequential(*model, torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"model key '3.weight' is not in the checkpoint"):
        load_checkpoint(path, model=deeper)
    shorter = torch.nn.Sequential(model[0])
    with pytest.raises(ValueError, match=r"checkpoint key '2\.(weight|bias)' is not in the model"):
        load_checkpoint(path, model=shorter)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(path, model=model, optimizer=opt)
    with pytest.raises(ValueError, match="holds no scheduler state"):
        load_checkpoint(path, model=model, scheduler=sched)
    with pytest.raises(TypeError, match="JSON-serializable"):
        save_checkpoint(path, model=model, optimizer=None, scheduler=None, step=3, config={1j})


def test_checkpoint_tied_weights_and_names(tmp_path):
    # Tied weights share memory; safetensors refuses that unless each tensor is copied.
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
    )
    model[1].weight = model[0].weight
    path = checkpoint_path(tmp_path / "sub", 12)
    assert path.name == "step-00000012.safetensors"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, step=12, config={})
    assert load_checkpoint(path, model=model)["step"] == 12


def test_latest_checkpoint_and_atomicity(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "absent") is None
    model = torch.nn.Linear(2, 2)
    for step in (5, 100, 20):
        save_checkpoint(
            checkpoint_path(tmp_path, step),
            model=model,
            optimizer=None,
            scheduler=None,
            step=step,
            config={},
        )
    # Debris a crash could leave, and files that merely look alike: all ignored.
    (tmp_path / ".step-00000999.safetensors.tmp-1-abcd").write_bytes(b"x")
    (tmp_path / "step-00000998.safetensors.tmp").write_bytes(b"x")
    (tmp_path / "step-999.safetensors").write_bytes(b"x")
    (tmp_path / "step-00000997.safetensors").mkdir()
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if "abcd" not in p.name)

    # Overwriting replaces the file in one step (a new inode via os.replace, not a rewrite in
    # place), leaving no temp file behind.
    path = checkpoint_path(tmp_path, 100)
    inode = path.stat().st_ino
    with torch.no_grad():
        model.weight.fill_(3.0)
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, step=100, config={"v": 2})
    assert path.stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == [
        ".step-00000999.safetensors.tmp-1-abcd"
    ]
    fresh = torch.nn.Linear(2, 2)
    assert load_checkpoint(path, model=fresh)["config"] == {"v": 2}
    assert torch.equal(fresh.weight, model.weight)


def test_failed_save_leaves_old_checkpoint_and_no_temp(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model=model, optimizer=None, scheduler=None, step=1, config={})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, optimizer=None, scheduler=None, step=2, config={})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


# ---------------------------------------------------------------------------------------------
# Schedule


def _closed_form(step, w, t, m):
    if step < w:
        return (step + 1) / w
    if step >= t:
        return m
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * (step - w) / (t - w)))


@pytest.mark.parametrize("w, t, m", [(4, 20, 0.0), (4, 20, 0.1), (0, 10, 0.25), (1, 3, 1.0)])
def test_cosine_warmup_factor_closed_form(w, t, m):
    if w:
        assert cosine_warmup_factor(0, w, t, m) == 1 / w
        assert cosine_warmup_factor(w - 1, w, t, m) == 1.0  # last warmup step: full lr
    assert cosine_warmup_factor(w, w, t, m) == 1.0  # cosine starts at the top
    if (t - w) % 2 == 0:
        mid = w + (t - w) // 2
        assert cosine_warmup_factor(mid, w, t, m) == pytest.approx(0.5 * (1 + m), abs=1e-12)
    assert cosine_warmup_factor(t, w, t, m) == m
    assert cosine_warmup_factor(t + 100, w, t, m) == m
    for s in range(t + 5):
        assert cosine_warmup_factor(s, w, t, m) == pytest.approx(
            _closed_form(s, w, t, m), abs=1e-12
        )


def test_cosine_with_warmup_lambda_lr_follows_factor():
    base = 0.1
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    sched = cosine_with_warmup(opt, warmup_steps=3, total_steps=12, min_lr_ratio=0.2)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [base * cosine_warmup_factor(s, 3, 12, 0.2) for s in range(15)]
    assert lrs == pytest.approx([base * _closed_form(s, 3, 12, 0.2) for s in range(15)])
    assert lrs[-1] == pytest.approx(base * 0.2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"warmup_steps": -1, "total_steps": 10}, "warmup_steps must be >= 0"),
        ({"warmup_steps": 10, "total_steps": 10}, "total_steps must be > warmup_steps"),
        ({"warmup_steps": 0, "total_steps": 0}, "total_steps must be > warmup_steps"),
        ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": 1.5}, r"min_lr_ratio must be in"),
        ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": -0.1}, r"min_lr_ratio must be in"),
        ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": math.nan}, "min_lr_ratio"),
    ],
)
def test_cosine_with_warmup_bad_arguments(kwargs, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=match):
        cosine_with_warmup(opt, **kwargs)
    with pytest.raises(ValueError, match=match):
        cosine_warmup_factor(
            0, kwargs["warmup_steps"], kwargs["total_steps"], kwargs.get("min_lr_ratio", 0.0)
        )
    with pytest.raises(ValueError, match="step must be >= 0"):
        cosine_warmup_factor(-1, 1, 10, 0.0)


def test_old_config_import_paths_warn_and_give_the_same_objects():
    import importlib
    import sys

    import reco.config
    import reco.train.config as train_config

    with pytest.warns(DeprecationWarning, match="reco.config.from_dict"):
        assert train_config.from_dict is reco.config.from_dict
    sys.modules.pop("reco.train.experiment", None)
    with pytest.warns(DeprecationWarning, match="reco.train.experiment"):
        old = importlib.import_module("reco.train.experiment")
    from reco.train.run import build

    assert old.build is build and old.ExperimentConfig is train_config.ExperimentConfig
