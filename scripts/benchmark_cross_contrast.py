"""Cross-contrast registration (T2-, FLAIR- and PD-like against T1) and same-contrast checks, at 2 mm.

    ../shared/data/fetch.sh /tmp/dtn-devdata && pip install antspyx
    python scripts/benchmark_cross_contrast.py /tmp/dtn-devdata [--methods affine ncc ngf mind auto syn]

Pairs from the development images (docs/cross-contrast.md says how they are made):
- known answer: the ICBM 2009a T1 brain's own intensities mapped piecewise linearly to T2-, FLAIR- and PD-like
  contrasts (so every edge is where the T1's is), with a bias field and noise, under two known smooth
  diffeomorphisms (mean displacement 3.2 and 3.7 mm), registered onto the ICBM T1; the same for the T1 itself;
- different subjects: the ITK T1 brain and a T2- or FLAIR-like ICBM made from its grey and white matter
  probability maps (a partial-volume model of its own, as another sequence would have), both ways round;
  and the ITK and ICBM T1 brains both ways round (same contrast).
Dice on tissue classes (CSF, GM, WM) warped with each method's own map.

Methods: ``affine`` (the engine's affine initialisation alone), ``ncc`` / ``ngf`` / ``mind`` / ``auto``
(`register` with the default preset and that refinement similarity; ``ngf@accurate``: with the accurate
preset), ``syn`` (ANTs SyN, Mattes mutual
information, antspyx defaults). Each in this process, one torch thread, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_registration import known_deformation  # noqa: E402
from make_samples import tissue_from_probabilities, to_2mm  # noqa: E402

from DTNRegistrationLib.core import imaging, metrics, registration  # noqa: E402
from DTNRegistrationLib.evaluate.baselines import PairImages, parse_method  # noqa: E402
from DTNRegistrationLib.evaluate.benchmark import machine  # noqa: E402

# Relative intensities of CSF, grey and white matter in each contrast (T1 of the ICBM template: dark, mid, bright).
CONTRASTS = {"T2": (1.0, 0.45, 0.25), "FLAIR": (0.08, 0.65, 0.45), "PD": (0.85, 0.75, 0.55)}
# Known deformations (synth.random_deformation, as benchmark_registration.py): 3.2 and 3.7 mm mean displacement.
DEFORMATION_SEEDS = (103, 110)


def remap_tissue_model(t1: sitk.Image, gm: sitk.Image, wm: sitk.Image, contrast: str, seed: int) -> sitk.Image:
    """The ICBM brain in another contrast from its tissue probabilities (a partial-volume model of its own, as a
    scanner's other sequence would have), with a smooth bias field and noise."""
    brain = sitk.GetArrayFromImage(t1) > 0
    g = sitk.GetArrayFromImage(gm).astype(np.float32) / 255.0
    w = sitk.GetArrayFromImage(wm).astype(np.float32) / 255.0
    csf = np.clip(1.0 - g - w, 0.0, 1.0)
    c, gi, wi = CONTRASTS[contrast]
    return _finish((c * csf + gi * g + wi * w) * brain, brain, t1, seed)


def remap_intensity(t1: sitk.Image, tissue: sitk.Image, contrast: str, seed: int) -> sitk.Image:
    """The T1 image's own intensities mapped piecewise linearly through (0 -> 0, median of CSF, GM, WM -> the
    contrast's values): another contrast whose edges are exactly the T1's, so the true correspondence is known."""
    array = sitk.GetArrayFromImage(t1).astype(np.float32)
    labels = sitk.GetArrayFromImage(tissue)
    anchors = [float(np.median(array[labels == k])) for k in (1, 2, 3)]
    order = np.argsort(anchors)
    xs = [0.0] + [anchors[i] for i in order] + [float(array.max())]
    targets = [CONTRASTS[contrast][i] for i in order]
    image = np.interp(array, xs, [0.0] + targets + [targets[-1]]).astype(np.float32)
    return _finish(image, array > 0, t1, seed)


def _finish(image: np.ndarray, brain: np.ndarray, reference: sitk.Image, seed: int) -> sitk.Image:
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in image.shape], indexing="ij")
    bias = 1.0 + 0.1 * sum(rng.uniform(-1, 1) * a for a in axes)
    image = image * bias + rng.normal(0.0, 0.01, image.shape) * brain
    out = sitk.GetImageFromArray((np.clip(image, 0, None) * 1000).astype(np.float32))
    out.CopyInformation(reference)
    return out


def prepare_pairs(src: Path) -> list[dict]:
    t1 = sitk.ReadImage(str(src / "icbm2009a_t1.nii.gz"), sitk.sitkFloat32)
    gm, wm = sitk.ReadImage(str(src / "icbm2009a_gm.nii.gz")), sitk.ReadImage(str(src / "icbm2009a_wm.nii.gz"))
    tissue = tissue_from_probabilities(t1, gm, wm)
    img = {"ICBM T1": t1}
    lab = {"ICBM T1": tissue}
    for i, contrast in enumerate(CONTRASTS):
        img[f"ICBM {contrast} model"] = remap_tissue_model(t1, gm, wm, contrast, seed=7 + i)
        lab[f"ICBM {contrast} model"] = tissue
        remapped = remap_intensity(t1, tissue, contrast, seed=17 + i)
        for seed in DEFORMATION_SEEDS:
            img[f"ICBM {contrast} deformed {seed}"], lab[f"ICBM {contrast} deformed {seed}"] = known_deformation(
                remapped, tissue, seed
            )
    for seed in DEFORMATION_SEEDS:
        img[f"ICBM T1 deformed {seed}"], lab[f"ICBM T1 deformed {seed}"] = known_deformation(t1, tissue, seed)
    small = {name: to_2mm(image, sitk.sitkLinear) for name, image in img.items()}
    small_labels = {name: to_2mm(labels, sitk.sitkNearestNeighbor) for name, labels in lab.items()}
    head = imaging.read_image(src / "itk_head_t1.nii.gz")  # 2 x 2 x 3 mm already: kept on its own grid
    brain = sitk.ReadImage(str(src / "itk_head_brain.nii.gz")) > 0
    kmeans = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "itk_head_kmeans.nii.gz")))
    table = np.zeros(256, np.uint8)
    table[[4, 5, 6]] = [1, 2, 3]  # k-means classes inside the brain: CSF, GM, WM
    itk_tissue = sitk.GetImageFromArray(np.where(sitk.GetArrayFromImage(brain), table[kmeans], 0).astype(np.uint8))
    itk_tissue.CopyInformation(head)
    small["ITK T1"], small_labels["ITK T1"] = sitk.Mask(head, brain), itk_tissue

    def pair(moving, fixed, kind):
        return {"name": f"{moving} -> {fixed}", "kind": kind, "moving": small[moving], "fixed": small[fixed],
                "moving_labels": small_labels[moving], "fixed_labels": small_labels[fixed]}  # fmt: skip

    known = [
        pair(f"ICBM {contrast} deformed {seed}", "ICBM T1", "same, known" if contrast == "T1" else "cross, known")
        for seed in DEFORMATION_SEEDS
        for contrast in (*CONTRASTS, "T1")
    ]
    return known + [
        pair("ITK T1", "ICBM T2 model", "cross"),
        pair("ICBM T2 model", "ITK T1", "cross"),
        pair("ITK T1", "ICBM FLAIR model", "cross"),
        pair("ITK T1", "ICBM T1", "same"),
        pair("ICBM T1", "ITK T1", "same"),
    ]


def head_pairs(src: Path) -> list[dict]:
    """Same-contrast pairs with skull or without, for auto's threshold: (name, moving, fixed) at 2 mm."""
    robex = to_2mm(imaging.read_image(src / "robex_head_t1.nii.gz"), sitk.sitkLinear)
    robex_mask = to_2mm(imaging.read_labels(src / "robex_head_brainmask.nii.gz"), sitk.sitkNearestNeighbor)
    icbm = to_2mm(imaging.read_image(src / "icbm2009a_t1.nii.gz"), sitk.sitkLinear)
    pydeface = to_2mm(imaging.read_image(src / "pydeface_meanhead_t1.nii.gz"), sitk.sitkLinear)
    itk = imaging.read_image(src / "itk_head_t1.nii.gz")
    itk_brain = sitk.Mask(itk, sitk.ReadImage(str(src / "itk_head_brain.nii.gz")) > 0)
    robex_brain = sitk.Mask(robex, robex_mask > 0)
    return [
        ("ROBEX brain -> ICBM", robex_brain, icbm),
        ("ICBM -> ROBEX brain", icbm, robex_brain),
        ("ITK brain -> ROBEX brain", itk_brain, robex_brain),
        ("ITK head -> ROBEX head", itk, robex),
        ("pydeface head -> ROBEX head", pydeface, robex),
        ("ROBEX head -> pydeface head", robex, pydeface),
        ("ITK head -> pydeface head", itk, pydeface),
    ]


def auto_check(src: Path) -> None:
    """What auto decides, and the rank correlation it decides on, for every pair (no refinement)."""
    pairs = [(p["name"], p["moving"], p["fixed"]) for p in prepare_pairs(src)] + head_pairs(src)
    print("| pair | auto's choice |\n|---|---|")
    for name, moving, fixed in pairs:
        result = registration.register(moving, fixed, refine=0, device="cpu", inverse=False)
        print(f"| {name} | {result.metrics['refine_similarity']} |", flush=True)


def run(method: str, pair: dict, args) -> dict:
    start = time.perf_counter()
    note = ""
    if method in ("affine", "syn"):
        images = PairImages(pair["name"], pair["moving"], pair["fixed"], pair["moving_labels"], pair["fixed_labels"])
        warped_labels = parse_method(method).run(images).warped_labels
    else:
        similarity, _, preset = method.partition("@")  # e.g. ngf@accurate
        result = registration.register(
            pair["moving"],
            pair["fixed"],
            moving_labels=pair["moving_labels"],
            refine_similarity=similarity,
            preset=preset or args.preset,
            device="cpu",
            inverse=False,
        )
        warped_labels, note = result.warped_labels, f"{result.metrics['refine_similarity']}, {result.metrics['start']}"
    dice = metrics.mean_dice(
        sitk.GetArrayFromImage(warped_labels), sitk.GetArrayFromImage(pair["fixed_labels"]), labels=[1, 2, 3]
    )
    return {"dice": dice, "seconds": time.perf_counter() - start, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devdata", type=Path, nargs="?", default=Path("/tmp/dtn-devdata"))
    parser.add_argument("--methods", nargs="+", default=["affine", "ncc", "ngf", "mind", "auto", "syn"])
    parser.add_argument("--preset", default=None, help="refinement preset (default: the engine's)")
    parser.add_argument("--only", help="only the pairs whose name contains this")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--auto-check", action="store_true", help="only auto's decision on these and head pairs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.auto_check:
        return auto_check(args.devdata)
    rows = []
    for pair in prepare_pairs(args.devdata):
        if args.only and args.only not in pair["name"]:
            continue
        before = metrics.mean_dice(
            sitk.GetArrayFromImage(
                sitk.Resample(pair["moving_labels"], pair["fixed_labels"], sitk.Transform(), sitk.sitkNearestNeighbor)
            ),
            sitk.GetArrayFromImage(pair["fixed_labels"]),
            labels=[1, 2, 3],
        )
        row = {"pair": pair["name"], "kind": pair["kind"], "before": before}
        for method in args.methods:
            row[method] = run(method, pair, args)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"Mean Dice (CSF, GM, WM) at 2 mm; {machine()}, one torch thread\n")
    print("| pair | kind | no registration | " + " | ".join(args.methods) + " |")
    print("|---|---|---|" + "---|" * len(args.methods))
    for row in rows:
        cells = [f"{row[m]['dice']:.3f}" for m in args.methods]
        print(f"| {row['pair']} | {row['kind']} | {row['before']:.3f} | " + " | ".join(cells) + " |")
    print("\nSeconds per pair (median): " + ", ".join(
        f"{m} {np.median([r[m]['seconds'] for r in rows]):.1f}" for m in args.methods))  # fmt: skip
    for row in rows:
        notes = {m: row[m]["note"] for m in args.methods if row[m]["note"]}
        print(f"- {row['pair']}: " + "; ".join(f"{m}: {n}" for m, n in notes.items()))


if __name__ == "__main__":
    main()
