"""End-to-end speed and Dice at 1 mm: `dtnreg register` against ANTs SyN (antspyx) on the same pairs, one run.

    ../shared/data/fetch.sh /tmp/dtn-devdata      # the development images (see ../shared/data/README.md)
    python scripts/benchmark_registration.py /tmp/dtn-devdata [--refine N ...] > docs/registration-benchmark.md

Pairs (every fixed image on a 1 mm grid): the ITK example brain -> ICBM 2009a (tissue labels CSF, GM, WM),
the ROBEX brain -> ICBM 2009a and ICBM 2009a -> the ROBEX brain resampled to 1 mm (brain masks).
DTN is timed as the whole command (`dtnreg register` in a fresh process: start-up, reading, writing included);
SyN as reading with antspyx, `ants.registration(type_of_transform="SyN")`, warping and writing its outputs.
Each figure is the median over --repeats runs. The shipped model saw these subjects in training (see its model
card): this measures speed honestly, not generalisation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_samples import tissue_from_probabilities  # noqa: E402

from DTNRegistrationLib import metrics  # noqa: E402
from DTNRegistrationLib.benchmark import machine  # noqa: E402


def prepare_pairs(src: Path, out: Path) -> list[dict]:
    """Brain-extracted images and label maps, written as NIfTI files under ``out``."""
    t1 = sitk.ReadImage(str(src / "icbm2009a_t1.nii.gz"), sitk.sitkFloat32)
    tissue = tissue_from_probabilities(
        t1, sitk.ReadImage(str(src / "icbm2009a_gm.nii.gz")), sitk.ReadImage(str(src / "icbm2009a_wm.nii.gz"))
    )
    files = {"icbm": t1, "icbm_tissue": tissue, "icbm_brain": sitk.Cast(tissue > 0, sitk.sitkUInt8)}
    head = sitk.ReadImage(str(src / "itk_head_t1.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(src / "itk_head_brain.nii.gz")) > 0
    kmeans = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "itk_head_kmeans.nii.gz")))
    table = np.zeros(256, np.uint8)
    table[[4, 5, 6]] = [1, 2, 3]
    itk_tissue = sitk.GetImageFromArray(np.where(sitk.GetArrayFromImage(brain), table[kmeans], 0).astype(np.uint8))
    itk_tissue.CopyInformation(head)
    files["itk"] = sitk.Mask(head, brain)
    files["itk_tissue"] = itk_tissue
    robex = sitk.ReadImage(str(src / "robex_head_t1.nii.gz"), sitk.sitkFloat32)
    robex_mask = sitk.ReadImage(str(src / "robex_head_brainmask.nii.gz"))
    robex, robex_mask = _squeeze(robex), sitk.Cast(_squeeze(robex_mask) > 0, sitk.sitkUInt8)
    files["robex"] = sitk.Mask(robex, robex_mask)
    files["robex_brain"] = robex_mask
    grid = _one_mm(robex)
    files["robex_1mm"] = sitk.Resample(files["robex"], grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    files["robex_1mm_brain"] = sitk.Resample(robex_mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    for name, image in files.items():
        sitk.WriteImage(image, str(out / f"{name}.nii.gz"))
    path = {name: out / f"{name}.nii.gz" for name in files}
    return [
        {"name": "ITK brain -> ICBM (tissue)", "moving": path["itk"], "fixed": path["icbm"],
         "moving_labels": path["itk_tissue"], "fixed_labels": path["icbm_tissue"]},
        {"name": "ROBEX brain -> ICBM (brain mask)", "moving": path["robex"], "fixed": path["icbm"],
         "moving_labels": path["robex_brain"], "fixed_labels": path["icbm_brain"]},
        {"name": "ICBM -> ROBEX brain 1 mm (brain mask)", "moving": path["icbm"], "fixed": path["robex_1mm"],
         "moving_labels": path["icbm_brain"], "fixed_labels": path["robex_1mm_brain"]},
    ]  # fmt: skip


def _squeeze(image: sitk.Image) -> sitk.Image:
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        return sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    return image


def _one_mm(image: sitk.Image) -> sitk.Image:
    size = [int(round(n * s)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing((1.0, 1.0, 1.0))
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    return grid


def run_dtn(pair: dict, out: Path, refine: int, args) -> tuple[float, float]:
    command = [sys.executable, "-m", "DTNRegistrationLib.cli", "register", "--quiet", "--output-dir", str(out)]
    command += ["--refine", str(refine)] + (["--model", args.model] if args.model else [])
    command += ["--refine-similarity", args.refine_similarity] if args.refine_similarity else []
    for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
        command += [f"--{key.replace('_', '-')}", str(pair[key])]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return seconds, report["metrics"]["dice_mean"]


def run_syn(pair: dict, out: Path) -> tuple[float, float]:
    import ants

    start = time.perf_counter()
    fixed, moving = ants.image_read(str(pair["fixed"])), ants.image_read(str(pair["moving"]))
    reg = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=str(out / "syn_"))
    ants.image_write(reg["warpedmovout"], str(out / "warped.nii.gz"))
    labels = ants.apply_transforms(
        fixed, ants.image_read(str(pair["moving_labels"])), reg["fwdtransforms"], interpolator="nearestNeighbor"
    )
    ants.image_write(labels, str(out / "warped_labels.nii.gz"))
    seconds = time.perf_counter() - start
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz"))).round().astype(int)
    target = sitk.GetArrayFromImage(sitk.ReadImage(str(pair["fixed_labels"])))
    return seconds, metrics.mean_dice(warped, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devdata", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--refine", type=int, nargs="+", default=[0])
    parser.add_argument("--no-syn", action="store_true")
    parser.add_argument("--model", help="weights file or shipped model name (default: the default model)")
    parser.add_argument("--refine-similarity", choices=["l1", "mse", "ncc"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtnreg-bench-") as tmp:
        tmp = Path(tmp)
        pairs = prepare_pairs(args.devdata, tmp)
        rows = []
        for i, pair in enumerate(pairs):
            row = {"pair": pair["name"], "dice_before": _dice_identity(pair)}
            for refine in args.refine:
                runs = [run_dtn(pair, tmp / f"dtn{i}_{refine}_{r}", refine, args) for r in range(args.repeats)]
                row[f"dtn_refine{refine}"] = (statistics.median(t for t, _ in runs), runs[-1][1])
            if not args.no_syn:
                (tmp / f"syn{i}").mkdir()
                runs = [run_syn(pair, tmp / f"syn{i}") for _ in range(args.repeats)]
                row["syn"] = (statistics.median(t for t, _ in runs), runs[-1][1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    _print_table(rows, args)


def _dice_identity(pair: dict) -> float:
    fixed = sitk.ReadImage(str(pair["fixed_labels"]))
    moving = sitk.Resample(
        sitk.ReadImage(str(pair["moving_labels"])), fixed, sitk.Transform(), sitk.sitkNearestNeighbor
    )
    return metrics.mean_dice(sitk.GetArrayFromImage(moving), sitk.GetArrayFromImage(fixed))


def _print_table(rows: list[dict], args) -> None:
    methods = [k for k in rows[0] if k.startswith("dtn") or k == "syn"]
    print(f"# End-to-end registration at 1 mm: {machine()}, median of {args.repeats} runs\n")
    print("| pair | Dice before | " + " | ".join(f"{m} s | {m} Dice" for m in methods) + " |")
    print("|---|---|" + "---|---|" * len(methods))
    for row in rows:
        cells = " | ".join(f"{row[m][0]:.1f} | {row[m][1]:.3f}" for m in methods)
        print(f"| {row['pair']} | {row['dice_before']:.3f} | {cells} |")
    if "syn" in methods:
        for m in methods[:-1]:
            ratio = statistics.median(row["syn"][0] / row[m][0] for row in rows)
            print(f"\nSyN / {m} time (median over pairs): {ratio:.1f}x")


if __name__ == "__main__":
    main()
