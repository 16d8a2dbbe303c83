"""Time ``dfu-kfp search`` end to end and report what sharing pre-training saved.

Runs the search as a user would (a subprocess of the ``dfu-kfp`` in this environment), with the
load average before and after, then reads the run's ``search.json`` and step log:

- the wall-clock time of the whole command;
- how many times each step ran (from the pipeline log), against what training every combination
  on its own (``dfu-kfp run`` per combination, same folds) would have run;
- the measured training seconds of the shared pre-training, and of the pre-training that running
  every combination on its own would have repeated: each repeat trains the same rows with the same
  seed, so it costs what the shared run measured.

Usage (repository root)::

    .venv/bin/python bench/search_sharing.py --out /tmp/dfu-search-bench -- --all --set cv_folds=2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from dfu_ml.search import image_combinations, parse_combination


def _task_counts(log: str) -> Counter:
    """Executed tasks per component; ``-2`` copies (the final fit) counted apart."""
    return Counter(re.findall(r"Executing task '([a-z0-9-]+)'", log))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the search's output folder")
    parser.add_argument("search_args", nargs=argparse.REMAINDER, help="after --: dfu-kfp search")
    args = parser.parse_args(argv)
    search_args = [a for a in args.search_args if a != "--"]
    command = [
        str(Path(sys.executable).with_name("dfu-kfp")),
        "search",
        "--out",
        str(args.out),
        *search_args,
    ]
    before = os.getloadavg()
    start = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - start
    after = os.getloadavg()

    summary = json.loads((args.out / "search.json").read_text())
    counts = _task_counts((args.out / "logs" / "pipeline.log").read_text())
    sharing = summary["sharing"]
    combinations = summary["combinations"]
    folds = sharing["folds"]
    fused = image_combinations(combinations)
    # Training each combination on its own, on the same folds: one forest per combination and
    # fold (the main pipeline always fits one), and each image combination pre-trains each of
    # its image modalities per fold.
    alone = {
        "clinical forest": len(combinations) * folds,
        "pre-training": folds
        * sum(1 for c in fused for m in parse_combination(c) if m != "metadata"),
        "Stage 1 + Stage 2": len(fused) * folds,
    }
    ran = {
        "clinical forest": counts["clinical-forest"],
        "pre-training": counts["pretrain-shared-encoder"],
        "Stage 1 + Stage 2": counts["fuse-combination"],
    }
    print(f"command: {' '.join(command)}")
    print(f"wall clock: {wall:.0f} s; load average (1, 5, 15 min) before {before}, after {after}")
    print(f"combinations: {len(combinations)}, folds: {folds}")
    print("\n| cross-validation step | runs (shared) | runs (each combination alone) |")
    print("|---|---|---|")
    for step in ran:
        print(f"| {step} | {ran[step]} | {alone[step]} |")
    print(
        "\n| measured training seconds (cross-validation) | shared | each combination alone |\n"
        "|---|---|---|\n"
        f"| image pre-training | {sharing['pretrain_seconds']} | "
        f"{sharing['pretrain_seconds_unshared']} |\n"
        f"| Stage 1 + Stage 2 | {sharing['fusion_seconds']} | {sharing['fusion_seconds']} |\n"
        f"| all training stages | {sharing['training_seconds']} | "
        f"{sharing['training_seconds_unshared']} |"
    )
    final = {k: v for k, v in counts.items() if k.endswith("-2")}
    print(f"\nfinal-fit steps: {dict(sorted(final.items()))}")
    print(f"final model: {summary['final_model']['choice']} -> {summary['final_model']['members']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
