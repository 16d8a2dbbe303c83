"""Benchmark: how close is ``prepare_dataset`` to the cost of just decoding its PNGs?

Generates (once) a synthetic dataset with full-size frames (image_scale 1.0: depth 1280x720,
thermal 1080x1440), then times, each run in a fresh subprocess so that peak memory is separate:

  decode   the floor: PIL open + load + convert("RGB") of every PNG that preparation decodes,
           on a thread pool of the size prepare uses;
  prepare  ``prepare_dataset(work, image_size=...)`` end to end (CSV reading, matching,
           decoding, cropping, resizing, padding).

Prints images/s for both (best and median of the repeats), their ratio and peak RSS
(``ru_maxrss``) of each subprocess. Best-of-N is the figure to compare on a shared machine.

    .venv/bin/python bench/prepare.py                       # temp dir, 8 patients, 5 repeats
    .venv/bin/python bench/prepare.py --work /tmp/dfu-bench --patients 8 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STAMP = "bench_dataset.json"


def _pool_size() -> int:
    # The same default as dfu_ml.data.prepare._crop_all.
    return min(4, os.cpu_count() or 1)


def ensure_dataset(work: Path, patients: int, seed: int) -> dict:
    """Generate the full-size dataset unless ``work`` already holds the same one."""
    from dfu_ml.data.synthetic import generate_synthetic_dataset

    wanted = {"patients": patients, "seed": seed, "image_scale": 1.0}
    stamp = work / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("params") == wanted:
        return json.loads(stamp.read_text())
    start = time.perf_counter()
    summary = generate_synthetic_dataset(work, patients=patients, seed=seed, image_scale=1.0)
    info = {"params": wanted, "summary": summary, "generate_s": time.perf_counter() - start}
    stamp.write_text(json.dumps(info, indent=1))
    return info


def files_prepare_decodes(work: Path) -> list[Path]:
    """The unique image files prepare_dataset decodes, found with the library's own matching."""
    from dfu_ml.data import schema
    from dfu_ml.data.matching import deduplicate_visits, match_image_sets
    from dfu_ml.data.reading import read_boxes, read_clinical

    visits, _ = deduplicate_visits(read_clinical(work / schema.CLINICAL_CSV))
    sets, _ = match_image_sets(
        visits,
        read_boxes(work / schema.DEPTH_BOX_CSV, "D"),
        read_boxes(work / schema.THERMAL_BOX_CSV, "T"),
    )
    paths: dict[Path, None] = {}
    for row in sets.itertuples(index=False):
        for modality in schema.IMAGE_MODALITIES:
            name = row.depth_file if schema.MODALITY_CAMERA[modality] == "D" else row.thermal_file
            if isinstance(name, str):
                paths[work / schema.MODALITY_FOLDERS[modality] / name] = None
    return list(paths)


def _rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(kind: str, work: Path, image_size: int) -> dict:
    """One measurement, run inside a fresh subprocess."""
    import numpy as np  # noqa: F401  (imported before the baseline, as prepare needs it)
    from PIL import Image

    from dfu_ml.data.prepare import prepare_dataset

    files = files_prepare_decodes(work)
    baseline = _current_rss_mib()
    if kind == "decode":

        def decode(path: Path):
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB").size

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=_pool_size()) as pool:
            sizes = list(pool.map(decode, files))
        seconds = time.perf_counter() - start
        assert len(sizes) == len(files)
    elif kind == "prepare":
        start = time.perf_counter()
        dataset = prepare_dataset(work, image_size=image_size)
        seconds = time.perf_counter() - start
        assert dataset.meta["report"]["images_missing"] == 0
    else:
        raise ValueError(kind)
    return {
        "kind": kind,
        "images": len(files),
        "seconds": seconds,
        "images_per_s": len(files) / seconds,
        "peak_rss_mib": _rss_mib(),
        "rss_after_imports_mib": baseline,
    }


def _run_child(kind: str, work: Path, image_size: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--measure",
        kind,
        "--work",
        str(work),
        "--image-size",
        str(image_size),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"measurement {kind} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _warm_page_cache(files: list[Path]) -> int:
    return sum(len(p.read_bytes()) for p in files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, help="dataset folder (default: a temp folder)")
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5, help="runs of each measurement")
    parser.add_argument("--measure", choices=("decode", "prepare"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        print(json.dumps(measure(args.measure, args.work, args.image_size)))
        return 0

    with tempfile.TemporaryDirectory(prefix="dfu-bench-") as scratch:
        work = args.work or Path(scratch) / "data"
        work.mkdir(parents=True, exist_ok=True)
        info = ensure_dataset(work, args.patients, args.seed)
        files = files_prepare_decodes(work)
        size_mb = _warm_page_cache(files) / 1e6
        print(
            f"dataset: {work} ({args.patients} patients, seed {args.seed}, full-size frames; "
            f"generated in {info['generate_s']:.1f} s)"
        )
        print(
            f"  {info['summary']['depth_boxes']} image sets, {len(files)} PNGs that prepare "
            f"decodes ({size_mb:.0f} MB on disk), thread pool {_pool_size()}, "
            f"image_size {args.image_size}"
        )
        print(
            f"  python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} before"
        )
        runs = {"decode": [], "prepare": []}
        for _ in range(args.repeat):  # interleaved, so both see the same machine state
            for kind in runs:
                runs[kind].append(_run_child(kind, work, args.image_size))
        print(
            f"{'':9}{'best s':>8}{'median s':>10}{'images/s best':>15}{'images/s median':>17}"
            f"{'peak RSS MiB':>14}{'RSS before work':>17}"
        )
        best, median = {}, {}
        for kind, results in runs.items():
            seconds = [r["seconds"] for r in results]
            best[kind], median[kind] = min(seconds), statistics.median(seconds)
            print(
                f"{kind:9}{best[kind]:8.2f}{median[kind]:10.2f}{len(files) / best[kind]:15.1f}"
                f"{len(files) / median[kind]:17.1f}"
                f"{max(r['peak_rss_mib'] for r in results):14.0f}"
                f"{max(r['rss_after_imports_mib'] for r in results):17.0f}"
            )
        print(
            f"prepare / decode time ratio: best {best['prepare'] / best['decode']:.2f}x, median "
            f"{median['prepare'] / median['decode']:.2f}x (load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
