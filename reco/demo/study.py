"""`reco study`: the demo's claims over datasets x imbalance ratios x seeds, every choice made on
validation, with paired intervals and a verdict the code computes.

Each unit (one dataset, ratio and seed of experiment 1; one dataset and seed of experiment 2) is
saved as JSON, atomically, when it finishes: an interrupted study resumes at the next unit.
Encoder features are computed once per dataset (the demo's feature cache) and shared by every
unit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config import to_dict
from ..memory.files import atomic_write
from .longtail import METHODS
from .run import BUCKETS, Demo, DemoConfig, _machine, _stats, zeroshot_summary
from .select import paired_interval

BASELINES = ("linear", "mlp", "mean_knn")
INTERVAL = "paired t interval over seeds (95%, t with n - 1 degrees of freedom)"
# The claims (in accuracy fractions): few-shot interval of MemoryAttention minus each baseline
# not below 0; many-shot mean within 1 point of linear's; RECO's unseen-class accuracy at least
# the small CLIP's plus 10 points.
MANY_SHOT_TOLERANCE = 0.01
UNSEEN_GAIN = 0.10


@dataclass
class StudyConfig:
    datasets: tuple[str, ...] = ("fashion-mnist", "mnist")
    imbalances: tuple[float, ...] = (10.0, 50.0, 200.0)
    seed: int = 0
    seeds: int = 5
    out: str = "reco-study"
    cache: str | None = None  # encoder features (default: <out>/cache)
    # Everything else as `reco demo` (noise, k, search, models); its dataset, seeds, imbalance
    # and out are the study's.
    demo: DemoConfig = field(default_factory=DemoConfig)

    def validate(self) -> None:
        if not self.datasets:
            raise ValueError("datasets must name at least one dataset")
        if not self.imbalances or any(r < 1 for r in self.imbalances):
            raise ValueError(f"imbalances must be >= 1, got {self.imbalances}")
        if self.seeds < 2:
            raise ValueError(f"seeds must be >= 2 (a paired interval needs two), got {self.seeds}")
        for d in self.datasets:
            dataclasses.replace(self.demo, dataset=d).validate()


def study_config(*, quick: bool = False, **fields: object) -> StudyConfig:
    """The config `reco study` runs: the demo's settings (quick: `reco demo --quick`'s reduced
    data and steps, validation read every 50 steps) with one noise level and no ablations."""
    from .run import demo_config

    demo = demo_config(quick=quick, seeds=1)
    demo.noise_sweep = (demo.noise,)
    demo.zeroshot.ablations = False
    if quick:
        demo.search.eval_every = 50
        demo.search.patience = 3
    return StudyConfig(demo=demo, **fields)


# The config fields a kind of unit does not read: changing them keeps that kind's saved units.
# Which datasets, ratios and seeds a study has only picks its units (each unit's path names
# its own), so a study can grow in place.
_SELECTS = (("datasets",), ("imbalances",), ("seed",), ("seeds",), ("out",), ("cache",))
_UNREAD = {
    "lt": (("demo", "zeroshot"),),
    "zs": (
        ("demo", "longtail"),
        ("demo", "val_per_class"),
        ("demo", "imbalance"),
        ("demo", "noise_sweep"),
        ("demo", "explain"),
    ),
}
KINDS = {"lt": "long-tail", "zs": "zero-shot"}


def _fingerprints(config: dict) -> dict[str, str]:
    """{kind: hash of the config fields its units read}, from to_dict(StudyConfig)."""
    out = {}
    for kind, unread in _UNREAD.items():
        d = json.loads(json.dumps(config))
        for path in (*_SELECTS, *unread):
            parent = d
            for key in path[:-1]:
                parent = parent.get(key, {})
            parent.pop(path[-1], None)
        out[kind] = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    return out


def _save(path: Path, obj: dict) -> None:
    data = json.dumps(obj, indent=1, default=str).encode()
    atomic_write(path, lambda f: f.write(data))


class Study:
    def __init__(self, cfg: StudyConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.units = self.out / "runs"
        self.cache = cfg.cache or str(self.out / "cache")

    def _check_resume(self) -> None:
        """A folder's saved units must be of this config: a kind of unit (long-tail or
        zero-shot) whose fields changed is refused while units of it are saved; the units of a
        kind whose fields did not change are kept."""
        path = self.out / "study-config.json"
        config = to_dict(self.cfg)
        want = _fingerprints(config)
        if path.exists():
            have = json.loads(path.read_text())
            have = have.get("fingerprints") or _fingerprints(have["config"])
            for kind, name in KINDS.items():
                saved = sorted(self.units.glob(f"*/{kind}-*.json"))
                if have.get(kind) != want[kind] and saved:
                    raise ValueError(
                        f"{self.out} holds {name} runs of another config ({path}; "
                        f"{len(saved)} runs such as {saved[0]}): remove them "
                        f"(runs/*/{kind}-*.json) to run them again, or use another --out"
                    )
        _save(path, {"fingerprints": want, "config": config})

    def run(self, only: str | None = None) -> dict | None:
        """Runs the units not saved yet (only: those of "longtail" or "zeroshot"), then writes
        the report; None (and no report) while units are left. Several processes may run one
        study folder at once: a unit two of them finish is written twice, identically."""
        if only not in (None, "longtail", "zeroshot"):
            raise ValueError(f"only must be 'longtail' or 'zeroshot', got {only!r}")
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_resume()
        t0 = time.perf_counter()
        seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
        n_lt, n_zs = len(cfg.imbalances) * len(seeds), len(seeds)
        bar = tqdm(total=len(cfg.datasets) * (n_lt + n_zs), desc="study", unit="run")
        device, ran = None, 0
        for ds in cfg.datasets:
            demo = None
            todo = [("lt", r, s) for r in cfg.imbalances for s in seeds]
            todo += [("zs", None, s) for s in seeds]
            for kind, ratio, s in todo:
                path = self._unit_path(ds, kind, ratio, s)
                skip = only is not None and kind != {"longtail": "lt", "zeroshot": "zs"}[only]
                if skip or path.exists():
                    bar.update(1)
                    continue
                if demo is None:  # features once per dataset, and only where a unit is left
                    dcfg = dataclasses.replace(
                        cfg.demo, dataset=ds, out=str(self.out / ds), cache=self.cache
                    )
                    demo = Demo(dcfg)
                    demo.encode_all = True
                    demo.load()
                    device = demo.device
                bar.set_postfix_str(f"{ds} {kind} ratio {ratio} seed {s}")
                u0 = time.perf_counter()
                if kind == "lt":
                    one = demo.longtail_seed(s, ratio, [cfg.demo.noise], fused=False)
                    one.pop("explain")
                else:
                    one = demo.zeroshot_seed(s, ablations=False)
                one["seconds"] = time.perf_counter() - u0
                _save(path, one)
                ran += 1
                bar.update(1)
        bar.close()
        if ran:  # one entry per session that ran units (several may run at once)
            wall = json.loads(p.read_text()) if (p := self.out / "wall.json").exists() else {}
            now = time.time()
            start = now - (time.perf_counter() - t0)
            wall[f"{os.getpid()}-{len(wall)}"] = {"start": start, "end": now}
            _save(self.out / "wall.json", wall)
        left = self.missing()
        if left:
            return None
        report = self.summarise(device)
        from .report import write_study_report

        write_study_report(report, self.out)
        return report

    def missing(self) -> list[Path]:
        cfg, seeds = self.cfg, range(self.cfg.seed, self.cfg.seed + self.cfg.seeds)
        paths = [
            self._unit_path(d, "lt", r, s)
            for d in cfg.datasets
            for r in cfg.imbalances
            for s in seeds
        ]
        paths += [self._unit_path(d, "zs", None, s) for d in cfg.datasets for s in seeds]
        return [p for p in paths if not p.exists()]

    def _unit_path(self, ds: str, kind: str, ratio: float | None, seed: int) -> Path:
        name = f"lt-ratio{ratio:g}-seed{seed}.json" if kind == "lt" else f"zs-seed{seed}.json"
        return self.units / ds / name

    def _units(self, ds: str, kind: str, ratio: float | None, seeds: list[str]) -> dict:
        out = {}
        for s in seeds:
            path = self._unit_path(ds, kind, ratio, int(s))
            if path.exists():
                out[s] = json.loads(path.read_text())
        return out

    def summarise(self, device=None) -> dict:
        """The report from the saved units. Where some are missing (a study cut short: `reco
        study --summarise`), each setting is summarised over the seeds it has, settings with
        none are left out, and the report says "partial" and lists what is missing."""
        import torch

        cfg = self.cfg
        seeds = [str(s) for s in range(cfg.seed, cfg.seed + cfg.seeds)]
        noise = f"{cfg.demo.noise:g}"
        settings: dict = {}
        zeroshot: dict = {}
        unit_seconds = 0.0
        for ds in cfg.datasets:
            for ratio in cfg.imbalances:
                units = self._units(ds, "lt", ratio, seeds)
                if not units:
                    continue
                first = next(iter(units))
                unit_seconds += sum(u["seconds"] for u in units.values())
                runs = {s: u["runs"] for s, u in units.items()}
                settings[f"{ds}/{ratio:g}"] = {
                    "dataset": ds,
                    "imbalance": ratio,
                    "profile": units[first]["profile"],
                    "split": units[first]["split"],
                    "runs": runs,
                    "selection": {s: u["selection"] for s, u in units.items()},
                    "table": longtail_table(runs, noise),
                    "differences": differences(runs, noise),
                }
            units = self._units(ds, "zs", None, seeds)
            if not units:
                continue
            unit_seconds += sum(u["seconds"] for u in units.values())
            runs = {s: u["res"] for s, u in units.items()}
            first = next(iter(units))
            zeroshot[ds] = zeroshot_summary(runs, cfg.demo.k, int(first), None) | {
                "setup": units[first]["setup"],
                "selection": {s: u["selection"] for s, u in units.items()},
                "gains": zeroshot_gains(runs, cfg.demo.k),
            }
        claims = check_claims(settings, zeroshot, cfg.demo.k)
        missing = self.missing()
        wall = json.loads(p.read_text()) if (p := self.out / "wall.json").exists() else {}
        head = _headline(settings)
        return {
            "config": to_dict(cfg),
            "machine": _machine(device or torch.device("cpu")),
            "interval": INTERVAL,
            "study": {
                "settings": settings,
                "zeroshot": zeroshot,
                "claims": claims,
                "verdict": verdict(claims),
                "complete": not missing,
                "missing": [str(m.relative_to(self.units)) for m in missing],
            },
            # The demo's layout, for readers of its report.json: the headline setting.
            "longtail": {
                "setting": head,
                "profile": settings[head]["profile"],
                "runs": settings[head]["runs"],
                "table": settings[head]["table"],
            },
            "zeroshot": zeroshot.get(cfg.datasets[0]),
            "timings_s": {"total": _wall(wall), "units": unit_seconds},
            "levels": _levels(self.out / "study_levels.json"),
        }


def _levels(path: Path) -> dict | None:
    """What benchmarks/study_levels.py wrote into the study folder, if it ran: one unit run
    twice at the default CPU kernel level and at other levels, each run's largest accuracy
    difference to the first."""
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    runs = [{"level": r["level"], "max_abs_diff": r["max_abs_diff_to_first"]} for r in d["runs"]]
    return {"setting": d["setting"], "runs": runs}


def _wall(sessions: dict) -> float:
    """Wall time from the first session's start to the last one's end (a bare number: one
    session's length)."""
    spans = [v for v in sessions.values() if isinstance(v, dict)]
    whole = max(v["end"] for v in spans) - min(v["start"] for v in spans) if spans else 0.0
    return float(max([whole, *(v for v in sessions.values() if not isinstance(v, dict))]))


def _headline(settings: dict) -> str:
    """The setting the demo runs by default where the study has it (fashion-mnist, ratio 200),
    else the first."""
    return "fashion-mnist/200" if "fashion-mnist/200" in settings else next(iter(settings))


def longtail_table(runs: dict, noise: str) -> dict:
    """{method: {bucket: {mean, std}}} over seeds."""
    return {
        m: {b: _stats([r[noise][m][b] for r in runs.values()]) for b in BUCKETS} for m in METHODS
    }


def _num(x: float | None) -> float:
    """A bucket without test images has no accuracy (NaN; null in JSON)."""
    return math.nan if x is None else float(x)


def differences(runs: dict, noise: str) -> dict:
    """{baseline: {bucket: paired interval}} of MemoryAttention minus each baseline, paired by
    seed (the same split, memory and test set)."""
    out = {}
    for b in BASELINES:
        out[b] = {
            bucket: paired_interval(
                [
                    _num(r[noise]["attention"][bucket]) - _num(r[noise][b][bucket])
                    for r in runs.values()
                ]
            )
            for bucket in BUCKETS
        }
    return out


def zeroshot_gains(runs: dict, k: int) -> dict:
    """Paired intervals, on unseen classes: each RECO row minus the small CLIP, and each RECO
    row minus its own control (the memory without the unseen classes)."""
    main = f"RECO search=uni fusion=cross k={k}"
    paper = f"RECO paper-faithful (standard layer init) k={k}"
    control = {
        main: "RECO, memory without unseen classes",
        paper: f"RECO, memory without unseen classes ({paper})",
    }
    out = {}
    for row, ctl in control.items():
        if not all(row in r for r in runs.values()):
            continue
        out[row] = {
            "minus small CLIP": paired_interval(
                [r[row]["unseen"] - r["small CLIP"]["unseen"] for r in runs.values()]
            ),
            "minus control": paired_interval(
                [r[row]["unseen"] - r[ctl]["unseen"] for r in runs.values()]
            ),
        }
    return out


def check_claims(settings: dict, zeroshot: dict, k: int) -> list[dict]:
    """Every claim on every setting: {claim, setting, value, holds}. Few-shot: the interval's
    lower end (MemoryAttention minus the baseline) >= 0; many-shot: the mean difference to
    linear >= -1 point; unseen: RECO's mean gain over the small CLIP >= 10 points (the
    headline RECO row, uni-modal search with cross-modal fusion)."""
    out = []
    for name, st in settings.items():
        for b in BASELINES:
            iv = st["differences"][b]["few"]
            out.append(
                {
                    "claim": f"few-shot: MemoryAttention - {b} interval not below 0",
                    "setting": name,
                    "value": iv,
                    # No class has fewer than 20 training images at this ratio: nothing to test.
                    # (With one seed there is no interval: nothing to test either.)
                    "holds": None if _missing(iv["lo"]) else bool(iv["lo"] >= 0),
                }
            )
        iv = st["differences"]["linear"]["many"]
        out.append(
            {
                "claim": "many-shot: MemoryAttention within 1 point of linear",
                "setting": name,
                "value": iv,
                "holds": bool(iv["mean"] >= -MANY_SHOT_TOLERANCE),
            }
        )
    main = f"RECO search=uni fusion=cross k={k}"
    for ds, zs in zeroshot.items():
        iv = zs["gains"][main]["minus small CLIP"]
        out.append(
            {
                "claim": "unseen classes: RECO >= small CLIP + 10 points",
                "setting": ds,
                "value": iv,
                "holds": bool(iv["mean"] >= UNSEEN_GAIN),
            }
        )
    return out


def verdict(claims: list[dict]) -> str:
    """'holds' when every claim that applies (holds is not None) holds, else 'fails'."""
    tested = [c for c in claims if c["holds"] is not None]
    return "holds" if tested and all(c["holds"] for c in tested) else "fails"


def _missing(x: float | None) -> bool:
    return x is None or math.isnan(x)


def load_report(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def recheck(report: dict) -> list[dict]:
    """The claims recomputed from a report's per-seed results alone (its own differences,
    intervals and claims are not read): what a test of a committed report checks."""
    k = report["config"]["demo"]["k"]
    noise = f"{report['config']['demo']['noise']:g}"
    st = report["study"]
    settings = {
        name: {"differences": differences(s["runs"], noise)} for name, s in st["settings"].items()
    }
    zeroshot = {ds: {"gains": zeroshot_gains(z["runs"], k)} for ds, z in st["zeroshot"].items()}
    return check_claims(settings, zeroshot, k)


__all__ = [
    "Study",
    "StudyConfig",
    "check_claims",
    "differences",
    "load_report",
    "recheck",
    "study_config",
    "verdict",
]
