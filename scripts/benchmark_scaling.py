"""Time and peak memory of `dtnreg register` against the size of the fixed image, stage by stage, with a figure.

    python scripts/benchmark_scaling.py /tmp/dtn-devdata [--spacings 2 1 0.75 0.5] [--figure docs/scaling.png]

The fixed image is the pydeface mean head (a whole head with neck, 176 x 256 x 256 at about 1 mm) resampled to each
spacing, so the largest grid is a 0.5 mm whole head (about 352 x 512 x 512, 92 million voxels); the moving image is
the ROBEX head. Each run is a fresh `dtnreg register` process with the default preset; wall time from process start
to the last file written, peak resident memory from the kernel, stage times from its report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_registration import _squeeze, timed_process  # noqa: E402

from DTNRegistrationLib.evaluate.benchmark import machine  # noqa: E402

STAGES = ("affine", "preprocess", "network", "refine", "outputs", "labels")


def fixed_at(head: sitk.Image, spacing: float) -> sitk.Image:
    size = [int(round(n * s / spacing)) for n, s in zip(head.GetSize(), head.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(head.GetOrigin())
    grid.SetDirection(head.GetDirection())
    return sitk.Resample(head, grid, sitk.Transform(), sitk.sitkLinear, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devdata", type=Path, nargs="?", default=Path("/tmp/dtn-devdata"))
    parser.add_argument("--spacings", type=float, nargs="+", default=[2.0, 1.0, 0.75, 0.5])
    parser.add_argument("--figure", type=Path, help="write a time/memory figure (PNG) here")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    head = sitk.ReadImage(str(args.devdata / "pydeface_meanhead_t1.nii.gz"), sitk.sitkFloat32)
    moving = _squeeze(sitk.ReadImage(str(args.devdata / "robex_head_t1.nii.gz"), sitk.sitkFloat32))
    rows = []
    with tempfile.TemporaryDirectory(prefix="dtnreg-scaling-") as tmp:
        tmp = Path(tmp)
        sitk.WriteImage(moving, str(tmp / "moving.nii.gz"))
        for spacing in args.spacings:
            fixed = fixed_at(head, spacing)
            sitk.WriteImage(fixed, str(tmp / "fixed.nii.gz"))
            out = tmp / f"out{spacing}"
            command = [sys.executable, "-m", "DTNRegistrationLib.cli", "register", "--quiet", "--device", args.device]
            command += ["--moving", str(tmp / "moving.nii.gz"), "--fixed", str(tmp / "fixed.nii.gz")]
            seconds, peak_mb = timed_process(command + ["--output-dir", str(out)])
            stages = json.loads((out / "report.json").read_text())["timings_s"]
            voxels = fixed.GetNumberOfPixels()
            rows.append({"spacing": spacing, "size": fixed.GetSize(), "voxels": voxels, "seconds": seconds,
                         "peak_mb": peak_mb, "stages": stages})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"# Scaling with the fixed image's size: {machine()}, device {args.device}\n")
    print("| fixed grid | voxels (M) | wall s | peak MB | " + " | ".join(STAGES) + " |")
    print("|---|---|---|---|" + "---|" * len(STAGES))
    for r in rows:
        size = "x".join(map(str, r["size"]))
        cells = " | ".join(f"{r['stages'].get(s, 0.0):.2f}" for s in STAGES)
        grid = f"{size} ({r['spacing']:g} mm) | {r['voxels'] / 1e6:.1f}"
        print(f"| {grid} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {cells} |")
    if args.figure:
        plot(rows, args.figure)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    voxels = [r["voxels"] / 1e6 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(voxels, [r["seconds"] for r in rows], "o-", label="wall (process)")
    for stage in STAGES:
        left.plot(voxels, [r["stages"].get(stage, 0.0) for r in rows], ".--", label=stage)
    left.set(xlabel="fixed image voxels (millions)", ylabel="seconds", title="Time")
    left.legend(fontsize=7)
    right.plot(voxels, [r["peak_mb"] / 1024 for r in rows], "o-")
    right.set(xlabel="fixed image voxels (millions)", ylabel="GB", title="Peak memory (max RSS)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
