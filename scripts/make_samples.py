"""Make the small bundled sample pair in DTNRegistration/Resources/Samples from the development images.

Run `../shared/data/fetch.sh /tmp/dtn-devdata` first (it downloads the nilearn wheel and the Debian
insighttoolkit5-examples package), then `python scripts/make_samples.py /tmp/dtn-devdata`.
Fixed: ICBM 2009a symmetric T1 (brain-extracted) at 2 mm, RAS, with a 3-class tissue map (1 CSF, 2 grey matter,
3 white matter) from its probability maps. Moving: the ITK example head (T1 masked to its brain, 2x2x3 mm, LSA) with its
k-means tissue classes mapped to the same labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

OUT = Path(__file__).resolve().parents[1] / "DTNRegistration" / "Resources" / "Samples"
TISSUE_SEGMENTS = {  # label value: segment name and colour (RGB 0-1)
    1: ("CSF", (0.44, 0.71, 0.89)),
    2: ("Grey matter", (0.85, 0.55, 0.47)),
    3: ("White matter", (0.96, 0.93, 0.80)),
}


def tissue_from_probabilities(t1: sitk.Image, gm: sitk.Image, wm: sitk.Image) -> sitk.Image:
    brain = sitk.GetArrayFromImage(t1) > 0
    g, w = sitk.GetArrayFromImage(gm).astype(float), sitk.GetArrayFromImage(wm).astype(float)
    labels = np.where(brain, 1, 0).astype(np.uint8)
    labels[brain & (g >= 128) & (g >= w)] = 2
    labels[brain & (w >= 128) & (w > g)] = 3
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(t1)
    return out


def to_2mm(image: sitk.Image, interpolator) -> sitk.Image:
    size = [int(round(n * s / 2.0)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    ref = sitk.Image(size, image.GetPixelID())
    ref.SetSpacing((2.0, 2.0, 2.0))
    ref.SetOrigin(image.GetOrigin())
    ref.SetDirection(image.GetDirection())
    source = image if interpolator == sitk.sitkNearestNeighbor else sitk.SmoothingRecursiveGaussian(image, 0.8)
    return sitk.Resample(source, ref, sitk.Transform(), interpolator, 0, image.GetPixelID())


def main(src: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    t1 = sitk.ReadImage(str(src / "icbm2009a_t1.nii.gz"))
    tissue = tissue_from_probabilities(
        t1, sitk.ReadImage(str(src / "icbm2009a_gm.nii.gz")), sitk.ReadImage(str(src / "icbm2009a_wm.nii.gz"))
    )
    fixed = sitk.Cast(
        sitk.RescaleIntensity(to_2mm(sitk.Cast(t1, sitk.sitkFloat32), sitk.sitkLinear), 0, 255), sitk.sitkUInt8
    )
    sitk.WriteImage(fixed, str(OUT / "fixed_icbm2009a_t1_2mm.nii.gz"), True)
    sitk.WriteImage(to_2mm(tissue, sitk.sitkNearestNeighbor), str(OUT / "fixed_icbm2009a_tissue_2mm.nii.gz"), True)

    head = sitk.ReadImage(str(src / "itk_head_t1.nii.gz"))
    kmeans = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "itk_head_kmeans.nii.gz")))
    # the "skull-stripped" file holds class numbers, not intensities: use it as the brain mask of the T1
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "itk_head_brain.nii.gz"))) > 0
    moving = sitk.GetImageFromArray(np.where(brain, sitk.GetArrayFromImage(head), 0).astype(np.uint8))
    moving.CopyInformation(head)
    mapping = np.zeros(256, np.uint8)
    mapping[[4, 5, 6]] = [1, 2, 3]  # k-means classes inside the brain, darkest to brightest: CSF, GM, WM
    labels = np.where(brain, mapping[kmeans], 0).astype(np.uint8)
    moving_labels = sitk.GetImageFromArray(labels)
    moving_labels.CopyInformation(moving)
    sitk.WriteImage(moving, str(OUT / "moving_itk_head_brain.nii.gz"), True)
    sitk.WriteImage(moving_labels, str(OUT / "moving_itk_head_tissue.nii.gz"), True)
    write_named_segmentations()
    for path in sorted(OUT.glob("*.nii.gz")) + sorted(OUT.glob("*.seg.nrrd")):
        print(path.name, path.stat().st_size)


def write_named_segmentations() -> None:
    """The tissue maps as .seg.nrrd with named, coloured segments, for Slicer's Sample Data (needs slicer-core).

    A label map loaded as a segmentation in Slicer gets numbered segments; these carry the tissue names, which
    the propagated segmentation then keeps.
    """
    from DTNRegistrationLib import mrml

    context = mrml.create_headless_scene()
    for stem in ("fixed_icbm2009a_tissue_2mm", "moving_itk_head_tissue"):
        labels = sitk.ReadImage(str(OUT / f"{stem}.nii.gz"))
        node = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", stem)
        segments = [
            mrml.SegmentInfo(label, name, color, name.lower().replace(" ", "_"))
            for label, (name, color) in TISSUE_SEGMENTS.items()
        ]
        mrml.add_segments_from_labels(node, labels, segments)
        mrml.export_segmentation(node, OUT / f"{stem}.seg.nrrd")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dtn-devdata"))
