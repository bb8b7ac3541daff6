"""End-to-end speed, memory and Dice at 1 mm: `dtnreg register` (presets) against PICSL greedy and ANTs SyN, one run.

    ../shared/data/fetch.sh /tmp/dtn-devdata && pip install antspyx picsl_greedy
    python scripts/benchmark_registration.py /tmp/dtn-devdata [--methods fast accurate refine25 greedy syn]

Every method runs as a fresh process on the same files, timed from process start to its last file written, with the
process's peak memory (max RSS) from the kernel: `dtnreg register` for DTN, and this script's `--peer` mode for the
classical peers (greedy: affine NMI from a centre-of-mass start, deformable NCC 2x2x2, 100x50x10, all threads;
SyN: `ants.registration(type_of_transform="SyN")` defaults), each writing its warped image and labels.
Dice on tissue classes (CSF, GM, WM) or brain masks, computed here from the written label maps for every method.
Pairs: the three of earlier benchmarks, two known deformations of the ICBM brain (a smooth random diffeomorphism
and an intensity change: the answer is known), ICBM onto the ITK brain's own 2 x 2 x 3 mm grid, and the ITK head
with skull onto the ROBEX head in scanner space (brain masks). The development subjects were seen in training
(the model card says how): this measures speed honestly and accuracy only indicatively.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_samples import tissue_from_probabilities  # noqa: E402

from DTNRegistrationLib.core import metrics, spatial  # noqa: E402
from DTNRegistrationLib.evaluate.benchmark import machine  # noqa: E402
from DTNRegistrationLib.train import synth  # noqa: E402

DTN_METHODS = {  # name: extra `dtnreg register` options
    "fast": [],
    "accurate": ["--preset", "accurate"],
    "refine25": ["--refine", "25"],  # the default before presets: 25 steps on the 2 mm grid
    "refine0": ["--refine", "0"],  # the network alone
}
PEERS = ("greedy", "syn")


# ---------------------------------------------------------------------------------------------- pairs


def prepare_pairs(src: Path, out: Path) -> list[dict]:
    """Brain-extracted images, heads and label maps, written as NIfTI files under ``out``."""
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
    files["itk_head"] = head
    files["itk_brain"] = sitk.Cast(brain, sitk.sitkUInt8)
    robex = sitk.ReadImage(str(src / "robex_head_t1.nii.gz"), sitk.sitkFloat32)
    robex_mask = sitk.ReadImage(str(src / "robex_head_brainmask.nii.gz"))
    robex, robex_mask = _squeeze(robex), sitk.Cast(_squeeze(robex_mask) > 0, sitk.sitkUInt8)
    files["robex"] = sitk.Mask(robex, robex_mask)
    files["robex_brain"] = robex_mask
    grid = _one_mm(robex)
    files["robex_1mm"] = sitk.Resample(files["robex"], grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    files["robex_1mm_brain"] = sitk.Resample(robex_mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    files["robex_head_1mm"] = sitk.Resample(robex, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    for i, seed in enumerate((101, 202)):
        files[f"icbm_deformed{i}"], files[f"icbm_deformed{i}_tissue"] = known_deformation(t1, tissue, seed)
    for name, image in files.items():
        sitk.WriteImage(image, str(out / f"{name}.nii.gz"))
    path = {name: out / f"{name}.nii.gz" for name in files}

    def pair(name, moving, fixed, moving_labels, fixed_labels):
        return {"name": name, "moving": path[moving], "fixed": path[fixed],
                "moving_labels": path[moving_labels], "fixed_labels": path[fixed_labels]}  # fmt: skip

    return [
        pair("ITK brain -> ICBM (tissue)", "itk", "icbm", "itk_tissue", "icbm_tissue"),
        pair("ROBEX brain -> ICBM (brain mask)", "robex", "icbm", "robex_brain", "icbm_brain"),
        pair("ICBM -> ROBEX brain 1 mm (brain mask)", "icbm", "robex_1mm", "icbm_brain", "robex_1mm_brain"),
        pair("ICBM deformed A -> ICBM (tissue, known)", "icbm_deformed0", "icbm", "icbm_deformed0_tissue", "icbm_tissue"),  # noqa: E501
        pair("ICBM deformed B -> ICBM (tissue, known)", "icbm_deformed1", "icbm", "icbm_deformed1_tissue", "icbm_tissue"),  # noqa: E501
        pair("ICBM -> ITK brain 2x2x3 mm (tissue)", "icbm", "itk", "icbm_tissue", "itk_tissue"),
        pair("ITK head -> ROBEX head 1 mm (brain mask)", "itk_head", "robex_head_1mm", "itk_brain", "robex_1mm_brain"),
    ]  # fmt: skip


def known_deformation(image: sitk.Image, labels: sitk.Image, seed: int) -> tuple[sitk.Image, sitk.Image]:
    """``image`` and ``labels`` under one smooth random diffeomorphism (displacements of a few mm), with a gamma
    change of the intensities: a pair whose true correspondence is known."""
    import torch

    array = torch.from_numpy(sitk.GetArrayFromImage(image))[None, None]
    label_array = torch.from_numpy(sitk.GetArrayFromImage(labels).astype(np.int64))[None, None]
    shape = tuple(array.shape[2:])
    u = spatial.resize_field(spatial.integrate(known_velocity(shape, seed)), shape)
    warped = spatial.warp(array, u).clamp_min(0)
    warped = (warped / warped.max()) ** float(np.exp(0.2 * (seed % 3 - 1))) * 100.0
    out, out_labels = (
        sitk.GetImageFromArray(warped[0, 0].numpy()),
        sitk.GetImageFromArray(spatial.warp(label_array, u, mode="nearest")[0, 0].numpy().astype(np.uint8)),
    )
    out.CopyInformation(image)
    out_labels.CopyInformation(labels)
    return out, out_labels


def known_velocity(shape: tuple[int, int, int], seed: int):
    """The velocity (voxels of the half-resolution grid of ``shape``) whose exponential, brought onto ``shape``, is
    ``known_deformation``'s displacement: what ``synth.random_deformation`` draws, kept so the truth can be used."""
    half = tuple(max(2, n // 2) for n in shape)
    return synth.random_velocity(synth.make_generator(seed), 1, half, 6.0 * half[0] / shape[0], 24 / 2)


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


# ---------------------------------------------------------------------------------------------- running


# A small launcher between this process and the measured one: a process's peak-memory record starts from its
# parent's at fork (Linux keeps the high-water mark across exec), and this parent holds the prepared volumes.
LAUNCHER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); code = subprocess.call(sys.argv[1:]); "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0); sys.exit(code)"
)


def timed_process(command: list[str]) -> tuple[float, float]:
    """Wall time (s) and peak resident memory (MB) of ``command``, measured by a fresh launcher."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *command], check=True, stdout=subprocess.PIPE, text=True)
    seconds, peak_mb = (float(x) for x in done.stdout.split()[-2:])
    return seconds, peak_mb


def run_method(method: str, pair: dict, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if method in DTN_METHODS:
        command = [sys.executable, "-m", "DTNRegistrationLib.cli", "register", "--quiet", "--output-dir", str(out)]
        command += ["--model", args.model] if args.model else []
        command += ["--device", args.device] + DTN_METHODS[method]
        for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
            command += [f"--{key.replace('_', '-')}", str(pair[key])]
    else:
        described = json.dumps({k: str(v) for k, v in pair.items()})
        command = [sys.executable, __file__, "--peer", method, "--pair", described, "--out", str(out)]
    seconds, peak_mb = timed_process(command)
    row = {"seconds": seconds, "peak_mb": peak_mb, "dice": label_dice(out / "warped_labels.nii.gz", pair)}
    report = out / "report.json"
    if report.is_file():
        doc = json.loads(report.read_text())
        row["stages"] = doc["timings_s"]
        row["folding_percent"] = doc["metrics"]["folding_percent"]
    return row


def label_dice(warped_labels: Path, pair: dict) -> float:
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(warped_labels))).round().astype(int)
    return metrics.mean_dice(warped, sitk.GetArrayFromImage(sitk.ReadImage(str(pair["fixed_labels"]))))


def run_peer(name: str, pair: dict, out: Path) -> None:
    """``--peer`` mode: one classical registration, writing its warped image and labels (timed by the caller)."""
    from DTNRegistrationLib.evaluate.baselines import PairImages, parse_method

    images = PairImages(
        pair["name"],
        sitk.ReadImage(pair["moving"], sitk.sitkFloat32),
        sitk.ReadImage(pair["fixed"], sitk.sitkFloat32),
        sitk.ReadImage(pair["moving_labels"]),
        sitk.ReadImage(pair["fixed_labels"]),
    )
    result = parse_method(name).run(images)
    sitk.WriteImage(result.warped, str(out / "warped.nii.gz"))
    sitk.WriteImage(result.warped_labels, str(out / "warped_labels.nii.gz"))


def dice_before(pair: dict) -> float:
    fixed = sitk.ReadImage(str(pair["fixed_labels"]))
    moving = sitk.Resample(
        sitk.ReadImage(str(pair["moving_labels"])), fixed, sitk.Transform(), sitk.sitkNearestNeighbor
    )
    return metrics.mean_dice(sitk.GetArrayFromImage(moving), sitk.GetArrayFromImage(fixed))


# ---------------------------------------------------------------------------------------------- tables


def print_tables(rows: list[dict], methods: list[str], args) -> None:
    print(f"# End-to-end registration: {machine()}, median of {args.repeats} run(s), device {args.device}\n")
    print("Seconds from process start to the last file written / peak memory (MB) / mean Dice.\n")
    print("| pair | Dice before | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for row in rows:
        cells = [f"{row[m]['seconds']:.1f} s / {row[m]['peak_mb']:.0f} / {row[m]['dice']:.3f}" for m in methods]
        print(f"| {row['pair']} | {row['dice_before']:.3f} | " + " | ".join(cells) + " |")
    print("| **median** | | " + " | ".join(_medians(rows, m) for m in methods) + " |")
    for m in (m for m in methods if m in DTN_METHODS):
        for peer in (p for p in PEERS if p in methods):
            ratio = statistics.median(row[peer]["seconds"] / row[m]["seconds"] for row in rows)
            print(f"\n{peer} / {m} time (median over pairs): {ratio:.1f}x", end="")
    print("\n")
    stage_methods = [m for m in methods if m in DTN_METHODS]
    stages = ["affine", "preprocess", "network", "refine", "outputs", "labels"]
    print("Stages of `dtnreg register` (median over pairs, s; the rest of the wall time: start-up, reading, writing)\n")
    print("| method | " + " | ".join(stages) + " | register() total | wall | folding % (max) |")
    print("|---|" + "---|" * (len(stages) + 3))
    for m in stage_methods:
        cells = [f"{statistics.median(r[m].get('stages', {}).get(s, 0.0) for r in rows):.2f}" for s in stages]
        total = statistics.median(r[m]["stages"]["total"] for r in rows)
        fold = max(r[m].get("folding_percent", 0.0) for r in rows)
        print(f"| {m} | " + " | ".join(cells) + f" | {total:.2f} | {_median(rows, m, 'seconds'):.2f} | {fold:.4f} |")


def _median(rows: list[dict], method: str, key: str) -> float:
    return statistics.median(row[method][key] for row in rows)


def _medians(rows: list[dict], method: str) -> str:
    mean_dice = statistics.fmean(row[method]["dice"] for row in rows)
    return f"{_median(rows, method, 'seconds'):.1f} s / {_median(rows, method, 'peak_mb'):.0f} / {mean_dice:.3f} (mean)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devdata", type=Path, nargs="?", default=Path("/tmp/dtn-devdata"))
    parser.add_argument("--methods", nargs="+", default=["fast", "accurate", "refine25", "greedy", "syn"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", help="weights file or shipped model name (default: the default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", help="run only the pairs whose name contains this")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return run_peer(args.peer, json.loads(args.pair), args.out)
    unknown = set(args.methods) - set(DTN_METHODS) - set(PEERS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="dtnreg-bench-") as tmp:
        tmp = Path(tmp)
        pairs = [p for p in prepare_pairs(args.devdata, tmp) if not args.only or args.only in p["name"]]
        rows = []
        for i, pair in enumerate(pairs):
            row = {"pair": pair["name"], "dice_before": dice_before(pair)}
            for method in args.methods:
                runs = [run_method(method, pair, tmp / f"{method}{i}_{r}", args) for r in range(args.repeats)]
                row[method] = {**runs[-1], **{k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_mb")}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print_tables(rows, args.methods, args)


if __name__ == "__main__":
    main()
