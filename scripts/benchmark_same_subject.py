"""Same-subject pairs: how much deformation a method invents where there is none (docs/benchmarks.md, section 8).

Longitudinal follow-up is registration of one head to itself: the true map is rigid, and a Jacobian map meant to
show atrophy shows the method's own noise as well. Two cases from the ICBM T1 (1 mm): the image against itself, and
a "rescan" (the image moved rigidly by 2-3 degrees and 2.7 mm, with Gaussian noise of 3 % of its bright end). For
each method: the error of the fixed-to-moving map against the truth over the brain (mean, 99th percentile, max),
SDlogJ over the brain, and the share of brain voxels whose volume the map changes by more than 10 % (|log J| > 0.1).

    python scripts/benchmark_same_subject.py /tmp/dtn-devdata --methods fast accurate greedy
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DTNRegistrationLib.core import deformation, imaging, metrics, registration
from DTNRegistrationLib.evaluate.baselines import PairImages
from DTNRegistrationLib.evaluate.classical import Greedy


def rescan(image: sitk.Image, brain: np.ndarray) -> tuple[sitk.Image, sitk.Transform]:
    """The image moved rigidly, plus noise; and the true fixed-to-moving map (moving(R x) = image(x))."""
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(image.TransformContinuousIndexToPhysicalPoint([n / 2 for n in image.GetSize()]))
    rigid.SetRotation(0.03, -0.02, 0.035)
    rigid.SetTranslation((1.5, -1.0, 2.0))
    moved = sitk.Resample(image, image, rigid.GetInverse(), sitk.sitkBSpline, 0.0)
    sigma = 0.03 * float(np.percentile(sitk.GetArrayViewFromImage(image)[brain], 99))
    noise = sitk.AdditiveGaussianNoise(image * 0, standardDeviation=sigma, seed=3)
    return moved + sitk.Cast(noise, sitk.sitkFloat32), rigid


def displacement(method: str, moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    if method == "greedy":
        return Greedy("greedy", {}).run(PairImages("same subject", moving, fixed)).displacement
    return registration.register(moving, fixed, preset=method, inverse=False).displacement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devdata", type=Path, help="folder of ../shared/data/fetch.sh (icbm2009a_t1.nii.gz)")
    parser.add_argument("--methods", nargs="+", default=["fast", "accurate", "greedy"])
    args = parser.parse_args()
    fixed = sitk.ReadImage(str(args.devdata / "icbm2009a_t1.nii.gz"), sitk.sitkFloat32)
    brain = sitk.GetArrayFromImage(imaging.foreground_mask(fixed)) > 0
    moving, rigid = rescan(fixed, brain)
    cases = {
        "identical": (fixed, np.zeros(brain.shape + (3,))),
        "rescan (rigid + 3 % noise)": (moving, sitk.GetArrayFromImage(deformation.field_of(rigid, fixed))),
    }
    print("| case | method | error mm: mean / p99 / max | SDlogJ | volume changed > 10 % | s |")
    print("|---|---|---|---|---|---|")
    for case, (image, truth) in cases.items():
        for method in args.methods:
            start = time.perf_counter()
            field = sitk.GetArrayFromImage(displacement(method, image, fixed))
            seconds = time.perf_counter() - start
            error = np.linalg.norm(field - truth, axis=-1)[brain]
            jac = metrics.physical_jacobian_determinant(field, fixed.GetSpacing(), fixed.GetDirection())
            changed = 100 * float((np.abs(np.log(np.clip(jac[brain], 1e-9, None))) > 0.1).mean())
            print(
                f"| {case} | {method} | {error.mean():.3f} / {np.percentile(error, 99):.3f} / {error.max():.3f} "
                f"| {metrics.sd_log_jacobian(jac, brain):.3f} | {changed:.1f} % | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
