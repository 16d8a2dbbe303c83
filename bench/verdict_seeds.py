"""How often the default run's health verdict passes: the main job (``dfu-kfp run``, the smoke
profile on the embedded synthetic dataset) once per seed, each in a fresh process.

The seed changes the generated dataset, the folds, the resampling and every initialisation, so
the pass rate over seeds says how much a user's default run can be trusted to pass on a healthy
setup. Prints one line per seed (verdict, failed checks, mean kappa, seconds) and the pass rate.

    .venv/bin/python bench/verdict_seeds.py --seeds 0 1 2 3 4 5 6 7 8 9 --work /tmp/dfu-verdicts
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    start = time.time()
    command = [sys.executable, "-m", "pipelines.cli", "run", "--out", str(out), "--set"]
    command += [f"seed={seed}", *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = round(time.time() - start)
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["?"])[-1]
        return {"seed": seed, "passed": False, "failed": [f"run failed: {error}"], "s": seconds}
    summary = json.loads((out / "summary.json").read_text())
    failed = [c["check"] for c in summary["health"]["checks"] if not c["passed"]]
    return {
        "seed": seed,
        "passed": summary["health"]["passed"],
        "failed": failed,
        "kappa": summary["mean"]["per_row"]["quadratic_kappa"]["mean"],
        "s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--work", type=Path, default=None, help="keeps each seed's --out folder")
    parser.add_argument("--set", nargs="*", default=[], help="extra --set overrides for each run")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dfu-verdicts-"))
    rows = []
    for seed in args.seeds:
        row = run_seed(seed, work / f"seed-{seed}", args.set)
        rows.append(row)
        kappa = f"{row['kappa']:.3f}" if "kappa" in row else "-"
        verdict = "PASS" if row["passed"] else "FAIL"
        print(f"seed {seed}: {verdict} kappa {kappa} {row['s']} s {row['failed']}", flush=True)
    passed = sum(r["passed"] for r in rows)
    print(f"verdict passed in {passed} of {len(rows)} seeds ({work})")


if __name__ == "__main__":
    main()
