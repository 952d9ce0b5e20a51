"""How far the study's results move with the CPU kernel level, and whether a fixed seed
reproduces: one experiment-1 run (dataset, ratio, seed) of `reco study --quick`'s settings, twice
at the default level and once at each level given, each in a fresh process (RECO_CPU_LEVEL is
read when the kernels load). Writes JSON: per run, every method's accuracies by bucket, and the
largest difference to the first run.

    python benchmarks/study_levels.py --cache /tmp/cache --out levels.json --levels avx2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ONE = """
import json, sys
from reco import _C
from reco.demo.run import Demo
from reco.demo.study import study_config
ds, ratio, seed, cache, out = sys.argv[1:6]
ratio, seed = float(ratio), int(seed)
cfg = study_config(quick=True).demo
cfg.dataset, cfg.cache, cfg.out = ds, cache, out
d = Demo(cfg)
d.encode_all = True
d.load()
one = d.longtail_seed(seed, ratio, [cfg.noise], fused=False)
print(json.dumps({"level": _C.default_cpu_level(), "runs": one["runs"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--imbalance", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--work", default="study-levels")
    ap.add_argument("--levels", nargs="+", default=["avx2"])
    ap.add_argument("--out", default="study_levels.json")
    a = ap.parse_args()
    runs = []
    for level in [None, None, *a.levels]:
        env = dict(os.environ)
        env.pop("RECO_CPU_LEVEL", None)
        if level is not None:
            env["RECO_CPU_LEVEL"] = level
        args = [a.dataset, str(a.imbalance), str(a.seed), a.cache, a.work]
        p = subprocess.run(
            [sys.executable, "-c", ONE, *args], env=env, capture_output=True, text=True, check=True
        )
        runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(runs[-1]["level"], flush=True)
    noise = next(iter(runs[0]["runs"]))
    first = runs[0]["runs"][noise]
    for r in runs:
        res = r["runs"][noise]
        r["max_abs_diff_to_first"] = max(
            abs(res[m][b] - first[m][b])
            for m in first
            for b in ("many", "medium", "few", "all")
            if first[m][b] is not None
        )
    setting = {"dataset": a.dataset, "imbalance": a.imbalance, "seed": a.seed}
    with open(a.out, "w") as f:
        json.dump({"setting": setting, "runs": runs}, f, indent=1)
    for r in runs:
        print(f"{r['level']}: largest difference to the first run {r['max_abs_diff_to_first']}")


if __name__ == "__main__":
    main()
