"""Clinical geometry, end to end at the images' own resolution: thick slices, a slab, 0.5 mm heads, a neck and
shoulders, a resection cavity (docs/benchmarks.md, section 5).

    ../shared/data/fetch.sh /tmp/dtn-devdata
    python scripts/benchmark_clinical.py /tmp/dtn-devdata [--only slab]

Every case runs `dtnreg register` as a fresh process (timed from start to its last file, peak memory from the
kernel) on files made here from the development images; Dice (CSF, GM, WM or brain mask) from the written label
map, folding, coverage and warnings from report.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_cross_contrast import remap_intensity  # noqa: E402
from benchmark_registration import _one_mm, _squeeze, known_deformation, timed_process  # noqa: E402
from make_samples import tissue_from_probabilities  # noqa: E402

from DTNRegistrationLib.core import coverage, imaging, metrics  # noqa: E402
from DTNRegistrationLib.evaluate.benchmark import machine  # noqa: E402


def resample(image: sitk.Image, spacing, interpolator=sitk.sitkLinear, profile: bool = False) -> sitk.Image:
    """``image`` on a grid of ``spacing`` over the same extent; ``profile``: slice-averaged as an acquisition."""
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetDirection(image.GetDirection())
    shift = (np.array(spacing) - np.array(image.GetSpacing())) / 2
    grid.SetOrigin(tuple(np.array(image.GetOrigin()) + np.reshape(image.GetDirection(), (3, 3)) @ shift))
    if profile:  # the slice profile: a Gaussian of the new spacing's FWHM, beyond the old one
        sigmas = [max(0.01, (new - old) / 2.355) for old, new in zip(image.GetSpacing(), spacing)]
        image = sitk.SmoothingRecursiveGaussian(image, sigmas)
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, 0, image.GetPixelID())


def with_neck(head: sitk.Image, labels: sitk.Image, neck_mm: float = 120.0, side_mm: float = 60.0):
    """The head on an LPS grid extended ``neck_mm`` downwards and ``side_mm`` to each side, with a neck (an
    elliptic cylinder) and shoulders (a slab at the bottom) of the head's median soft-tissue intensity."""
    head, labels = sitk.DICOMOrient(head, "LPS"), sitk.DICOMOrient(labels, "LPS")
    spacing = np.array(head.GetSpacing())
    below, side = int(round(neck_mm / spacing[2])), int(round(side_mm / spacing[0]))
    image = sitk.ConstantPad(head, [side, 0, below], [side, 0, 0], 0.0)
    labels = sitk.ConstantPad(labels, [side, 0, below], [side, 0, 0], 0)
    array = sitk.GetArrayFromImage(image)
    head_fg = sitk.GetArrayViewFromImage(imaging.foreground_mask(image)) > 0
    bottom = int(np.flatnonzero(head_fg.any(axis=(1, 2)))[0])  # the head's lowest slice: the neck joins it there
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij")
    cy, cx = array.shape[1] * 0.55, array.shape[2] / 2
    neck = ((yy - cy) * spacing[1] / 55.0) ** 2 + ((xx - cx) * spacing[0] / 60.0) ** 2 <= 1
    shoulders = (zz * spacing[2] < 50.0) & (np.abs(yy - cy) * spacing[1] < 90.0)
    body = (zz < bottom + int(20 / spacing[2])) & (neck | shoulders) & (array == 0)
    tissue = float(np.median(sitk.GetArrayViewFromImage(head)[sitk.GetArrayViewFromImage(head) > 0]))
    array[body] = tissue * (1 + np.random.default_rng(5).normal(0, 0.05, int(body.sum())))
    out = sitk.GetImageFromArray(array.astype(np.float32))
    out.CopyInformation(image)
    return out, labels


def cavity(image: sitk.Image, labels: sitk.Image, centre_mm, radius_mm: float = 12.5):
    """A resection cavity: a ball of CSF-like (dark in T1) intensity, and the mask that leaves it out."""
    array = sitk.GetArrayFromImage(image)
    index = image.TransformPhysicalPointToContinuousIndex(centre_mm)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij")
    s = image.GetSpacing()
    ball = ((xx - index[0]) * s[0]) ** 2 + ((yy - index[1]) * s[1]) ** 2 + ((zz - index[2]) * s[2]) ** 2 <= radius_mm**2
    csf = float(np.median(array[sitk.GetArrayViewFromImage(labels) == 1]))
    array[ball] = csf
    out, mask = sitk.GetImageFromArray(array), sitk.GetImageFromArray((~ball).astype(np.uint8))
    out.CopyInformation(image)
    mask.CopyInformation(image)
    return out, mask


def prepare(src: Path, out: Path) -> list[dict]:
    t1 = sitk.ReadImage(str(src / "icbm2009a_t1.nii.gz"), sitk.sitkFloat32)
    tissue = tissue_from_probabilities(
        t1, sitk.ReadImage(str(src / "icbm2009a_gm.nii.gz")), sitk.ReadImage(str(src / "icbm2009a_wm.nii.gz"))
    )
    deformed, deformed_tissue = known_deformation(t1, tissue, 103)
    flair, _ = known_deformation(remap_intensity(t1, tissue, "FLAIR", 18), tissue, 103)
    files = {"icbm": t1, "icbm_tissue": tissue, "deformed": deformed, "deformed_tissue": deformed_tissue}
    files["flair_thick"] = resample(flair, (0.5, 0.5, 5.0), profile=True)
    files["flair_thick_tissue"] = resample(deformed_tissue, (0.5, 0.5, 5.0), sitk.sitkNearestNeighbor)
    z = t1.GetSize()[2]
    slab = slice(z // 2 - 20, z // 2 + 20)  # 40 mm across the middle of the brain
    files["slab"], files["slab_tissue"] = deformed[:, :, slab], deformed_tissue[:, :, slab]
    files["cavity"], files["cavity_mask"] = cavity(deformed, deformed_tissue, (-30.0, -35.0, 30.0))
    robex = _squeeze(sitk.ReadImage(str(src / "robex_head_t1.nii.gz"), sitk.sitkFloat32))
    robex_brain = sitk.Cast(_squeeze(sitk.ReadImage(str(src / "robex_head_brainmask.nii.gz"))) > 0, sitk.sitkUInt8)
    grid = _one_mm(robex)
    files["robex_head"] = sitk.Resample(robex, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    files["robex_brain"] = sitk.Resample(robex_brain, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    itk = sitk.ReadImage(str(src / "itk_head_t1.nii.gz"), sitk.sitkFloat32)
    itk_brain = sitk.Cast(sitk.ReadImage(str(src / "itk_head_brain.nii.gz")) > 0, sitk.sitkUInt8)
    files["itk_head"], files["itk_brain"] = itk, itk_brain
    files["itk_neck"], files["itk_neck_brain"] = with_neck(itk, itk_brain)
    files["robex_neck"], files["robex_neck_brain"] = with_neck(files["robex_head"], files["robex_brain"])
    pydeface = sitk.ReadImage(str(src / "pydeface_meanhead_t1.nii.gz"), sitk.sitkFloat32)
    files["pydeface_05"] = resample(pydeface, (0.5, 0.5, 0.5))
    for name, image in files.items():
        sitk.WriteImage(image, str(out / f"{name}.nii.gz"))
    p = {name: str(out / f"{name}.nii.gz") for name in files}

    def case(name, moving, fixed, labels=None, extra=(), region=None):
        return {"name": name, "moving": p[moving], "fixed": p[fixed], "labels": labels, "extra": list(extra),
                "region": p[region] if region else None}  # fmt: skip

    tissue, icbm = ("deformed_tissue", "icbm_tissue"), "ICBM T1 deformed"
    return [
        case("FLAIR-like 0.5x0.5x5 mm -> ICBM T1 1 mm", "flair_thick", "icbm", ("flair_thick_tissue", "icbm_tissue")),
        case("ICBM T1 1 mm -> FLAIR-like 0.5x0.5x5 mm", "icbm", "flair_thick", ("icbm_tissue", "flair_thick_tissue")),
        case(f"{icbm}, whole (control)", "deformed", "icbm", tissue),
        case(f"{icbm}, 40 mm axial slab", "slab", "icbm", ("slab_tissue", "icbm_tissue")),
        case(f"{icbm} + 25 mm cavity, no moving mask", "cavity", "icbm", tissue, region="cavity_mask"),
        case(f"{icbm} + 25 mm cavity, --moving-mask", "cavity", "icbm", tissue,
             ["--moving-mask", p["cavity_mask"]], region="cavity_mask"),
        case("ITK head -> ROBEX head 1 mm (control)", "itk_head", "robex_head", ("itk_brain", "robex_brain")),
        case("ITK head + neck, shoulders -> ROBEX head", "itk_neck", "robex_head", ("itk_neck_brain", "robex_brain")),
        case("ITK head -> ROBEX head + neck, shoulders", "itk_head", "robex_neck", ("itk_brain", "robex_neck_brain")),
        case("ROBEX head 1 mm -> pydeface head 0.5 mm (352x500x500)", "robex_head", "pydeface_05"),
        case("pydeface head 0.5 mm -> ROBEX head 1 mm", "pydeface_05", "robex_head"),
    ]  # fmt: skip


def run(case: dict, out: Path) -> dict:
    command = [sys.executable, "-m", "DTNRegistrationLib.cli", "register", "--quiet", "--device", "cpu"]
    command += ["--moving", case["moving"], "--fixed", case["fixed"], "--output-dir", str(out), *case["extra"]]
    if case["labels"]:
        command += ["--moving-labels", str(Path(case["moving"]).parent / f"{case['labels'][0]}.nii.gz")]
    seconds, peak_mb = timed_process(command)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))["metrics"]
    row = {"seconds": seconds, "peak_mb": peak_mb, **{k: report.get(k) for k in ("folding_count", "jacobian_min")}}
    row.update(coverage=report.get("moving_coverage_percent"), warnings=report.get("warnings"))
    if case["region"]:  # det J and folding where the map sends the fixed brain into the cavity, mask or not
        field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
        jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
        brain = sitk.ReadImage(case["fixed"]) > 0
        row["excluded"] = coverage.excluded_region(sitk.ReadImage(case["region"]), field, brain, jacobian)
    if case["labels"]:
        fixed_labels = sitk.ReadImage(str(Path(case["moving"]).parent / f"{case['labels'][1]}.nii.gz"))
        moving_labels = sitk.ReadImage(str(Path(case["moving"]).parent / f"{case['labels'][0]}.nii.gz"))
        before = sitk.Resample(moving_labels, fixed_labels, sitk.Transform(), sitk.sitkNearestNeighbor)
        warped = sitk.ReadImage(str(out / "warped_labels.nii.gz"))
        target = sitk.GetArrayFromImage(fixed_labels)
        keep = _inside_moving_slices(fixed_labels, moving_labels) if "slab" in case["name"] else 1
        row["dice_before"] = metrics.mean_dice(sitk.GetArrayFromImage(before) * keep, target * keep)
        row["dice"] = metrics.mean_dice(sitk.GetArrayFromImage(warped) * keep, target * keep)
    return row


def _inside_moving_slices(fixed: sitk.Image, moving: sitk.Image, margin_mm: float = 5.0) -> np.ndarray:
    """1 on the fixed voxels within the moving image's superior-inferior extent, ``margin_mm`` in from its ends."""
    corners = [moving.TransformIndexToPhysicalPoint((0, 0, k)) for k in (0, moving.GetSize()[2] - 1)]
    low, high = sorted(c[2] for c in corners)
    z = np.array([fixed.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(fixed.GetSize()[2])])
    inside = (z > low + margin_mm) & (z < high - margin_mm)
    return inside[:, None, None].astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devdata", type=Path, nargs="?", default=Path("/tmp/dtn-devdata"))
    parser.add_argument("--only", help="only the cases whose name contains this")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dtnreg-clinical-") as tmp:
        cases = prepare(args.devdata, Path(tmp))
        for i, case in enumerate(c for c in cases if not args.only or args.only in c["name"]):
            rows.append({"case": case["name"], **run(case, Path(tmp) / f"out{i}")})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"`dtnreg register` (fast preset, default options), {machine()}\n")
    print("| case | s | peak MB | Dice before | Dice | folding voxels | coverage % | warning |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dice = (f"{r['dice_before']:.3f}", f"{r['dice']:.3f}") if "dice" in r else ("–", "–")
        warn = "yes" if r["warnings"] else ""
        print(f"| {r['case']} | {r['seconds']:.0f} | {r['peak_mb']:.0f} | {dice[0]} | {dice[1]} | {r['folding_count']} "
              f"| {r['coverage']:.0f} | {warn} |")  # fmt: skip
    for r in rows:
        if r.get("excluded"):
            print(f"\n{r['case']}: over the left-out region {json.dumps(r['excluded'])}")


if __name__ == "__main__":
    main()
