"""Same-subject pairs: how much deformation a method invents where there is none (docs/benchmarks.md, section 8).

Longitudinal follow-up is registration of one head to itself: the true map is rigid, and a Jacobian map meant to
show atrophy shows the method's own noise as well. Two cases from the ICBM T1 (1 mm): the image against itself, and
a "rescan" (the image moved rigidly by 2-3 degrees and 2.7 mm, with Gaussian noise of 3 % of its bright end). For
each method: the error of the fixed-to-moving map against the truth over the brain (mean, 99th percentile, max),
SDlogJ over the brain, and the share of brain voxels whose volume the map changes by more than 10 % (|log J| > 0.1).

A third case asks whether a real change is still found: the image with a smooth local expansion around the lateral
ventricles (Gaussian profile, sigma 12 mm, up to 8 % linear) plus the same noise. Reported: the mean log det J
within 8 and 16 mm of its centre against the truth, and SDlogJ and the share changed by more than 10 % beyond 30 mm
(where the truth is the identity).

    python scripts/benchmark_same_subject.py /tmp/dtn-devdata --methods fast accurate longitudinal greedy
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
    return noisy(moved, brain, 3), rigid


# The expansion: centre (voxel index of the 1 mm ICBM 2009a brain, near the lateral ventricles), sigma and strength.
EXPANSION_CENTRE_INDEX = (98, 130, 100)
EXPANSION_SIGMA_MM = 12.0
EXPANSION_STRENGTH = 0.08
CORE_RADII_MM = (8.0, 16.0)
FAR_MM = 30.0


def noisy(image: sitk.Image, brain: np.ndarray, seed: int) -> sitk.Image:
    """The image plus Gaussian noise of 3 % of its bright end."""
    sigma = 0.03 * float(np.percentile(sitk.GetArrayViewFromImage(image)[brain], 99))
    return image + sitk.Cast(
        sitk.AdditiveGaussianNoise(image * 0, standardDeviation=sigma, seed=seed), sitk.sitkFloat32
    )


def expansion(image: sitk.Image, brain: np.ndarray) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """The image with structures around the centre enlarged, plus noise; the true log det J of the fixed-to-moving
    map on the image's grid; each voxel's distance (mm) from the centre."""
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(EXPANSION_CENTRE_INDEX))
    points = sitk.GetArrayFromImage(
        sitk.PhysicalPointSource(
            sitk.sitkVectorFloat64, image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()
        )
    )
    offset = points - centre
    profile = np.exp(-(offset**2).sum(-1) / (2 * EXPANSION_SIGMA_MM**2))
    pull = sitk.GetImageFromArray(-EXPANSION_STRENGTH * offset * profile[..., None], isVector=True)
    pull.CopyInformation(image)
    det = metrics.physical_jacobian_determinant(sitk.GetArrayFromImage(pull), image.GetSpacing(), image.GetDirection())
    # moving(y) = image(y + w(y)) with w pulling towards the centre: the fixed-to-moving map is (Id + w)^-1
    # (the transform takes the field's pixels: hence after the determinant)
    moved = sitk.Resample(image, image, sitk.DisplacementFieldTransform(pull), sitk.sitkBSpline, 0.0)
    return noisy(moved, brain, 4), -np.log(det), np.sqrt((offset**2).sum(-1))


def displacement(method: str, moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    if method == "greedy":
        return Greedy("greedy", {}).run(PairImages("same subject", moving, fixed)).displacement
    return registration.register(moving, fixed, preset=method, inverse=False).displacement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devdata", type=Path, help="folder of ../shared/data/fetch.sh (icbm2009a_t1.nii.gz)")
    parser.add_argument("--methods", nargs="+", default=["fast", "accurate", "longitudinal", "greedy"])
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
    expanded, truth_log_det, distance = expansion(fixed, brain)
    inner = [distance < radius for radius in CORE_RADII_MM]
    far = brain & (distance > FAR_MM)
    radii = " / ".join(f"{r:.0f}" for r in CORE_RADII_MM)
    truth = " / ".join(f"{truth_log_det[region].mean():.3f}" for region in inner)
    print(
        f"\n| method | mean log det J within {radii} mm (truth {truth}) | beyond {FAR_MM:.0f} mm: SDlogJ "
        "| volume changed > 10 % | s |"
    )
    print("|---|---|---|---|---|")
    for method in args.methods:
        start = time.perf_counter()
        field = sitk.GetArrayFromImage(displacement(method, expanded, fixed))
        seconds = time.perf_counter() - start
        log_det = np.log(
            np.clip(metrics.physical_jacobian_determinant(field, fixed.GetSpacing(), fixed.GetDirection()), 1e-9, None)
        )
        found = " / ".join(f"{log_det[region].mean():.3f}" for region in inner)
        changed = 100 * float((np.abs(log_det[far]) > 0.1).mean())
        print(f"| {method} | {found} | {log_det[far].std():.3f} | {changed:.1f} % | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
