"""What the truncation check costs when reading a 1 mm brain-sized volume, per format (a Markdown table).

    python scripts/benchmark_file_checks.py [--repeats 7] >> docs/benchmarks.md

The volume: the bundled ICBM 2009a sample (2 mm) resampled to the 1 mm MNI grid (182 x 218 x 182), stored as
float32, and as int16 with scanner-like noise in the head (compresses less). Each figure is the median over
--repeats runs, files in the page cache: `sitk.ReadImage` alone, `file_checks.data_problem` alone, and
`imaging.read_image` (check + read + validation) as every input is read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DTNRegistrationLib.cli.commands import SAMPLE
from DTNRegistrationLib.core import imaging
from DTNRegistrationLib.core.file_checks import data_problem
from DTNRegistrationLib.evaluate.benchmark import machine

FORMATS = ((".nii", False), (".nii.gz", True), (".nrrd", True), (".mha", True), (".nrrd", False), (".mha", False))


def volumes() -> dict[str, sitk.Image]:
    template = sitk.ReadImage(str(SAMPLE["fixed"]), sitk.sitkFloat32)
    grid = sitk.Image([182, 218, 182], sitk.sitkFloat32)
    grid.SetSpacing((1.0, 1.0, 1.0))
    grid.SetOrigin(template.GetOrigin())
    grid.SetDirection(template.GetDirection())
    float32 = sitk.Resample(template, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    array = sitk.GetArrayFromImage(float32)
    noise = np.random.default_rng(0).normal(0.0, 5.0, array.shape) * (array > 0)
    int16 = sitk.GetImageFromArray((array * 10.0 + noise).astype(np.int16))
    int16.CopyInformation(float32)
    return {"float32": float32, "int16 + noise": int16}


def median_ms(function, path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(path)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"\nMachine: {machine()}; SimpleITK {sitk.Version_VersionString()}; median of {args.repeats} runs.\n")
    print("| volume | file | MB | sitk.ReadImage ms | check ms | read_image ms (with the check) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, image in volumes().items():
            for extension, compressed in FORMATS:
                path = Path(folder) / f"volume{extension}"
                sitk.WriteImage(image, str(path), compressed)
                assert data_problem(path) is None
                read = median_ms(lambda p: sitk.ReadImage(str(p)), path, args.repeats)
                check = median_ms(data_problem, path, args.repeats)
                full = median_ms(imaging.read_image, path, args.repeats)
                kind = f"{extension} {'compressed' if compressed else 'raw'}"
                size = path.stat().st_size / 1e6
                print(f"| {name} | {kind} | {size:.1f} | {read:.0f} | {check:.1f} | {full:.0f} |")


if __name__ == "__main__":
    main()
