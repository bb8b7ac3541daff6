"""Regenerate the README's screenshot from a real run of the module's logic on the bundled sample pair.

    python scripts/make_screenshot.py                                # the registry's default model
    python scripts/make_screenshot.py --model /tmp/w.safetensors --refine 20 --output shot.png

Headless (slicer-core, no OpenGL): the samples are loaded into a scene as the module's Sample Data entries load
them (volumes; the moving tissue label map as a segmentation, its segments then named and coloured),
``mrml.RegistrationLogic.process_in_child`` registers them as the module does (the engine in a child process,
polled; the result nodes built from its files), and the result nodes are drawn by ``mrml.render_slice`` on
one axial slice (radiological: patient right on the left, anterior up). Segmentations and transform grids are
drawn by OpenGL displayable managers, which do not render headless, so the propagated segmentation and the
folding voxels are shown through label maps of them, and the deformation grid (the transform node's
displacement less the affine initialisation) is drawn with matplotlib over the fixed slice in a 5th panel.
"Before" is the moving image after the affine initialisation alone; fixed green, moving magenta.
About 15 s on 2 CPU cores without refinement, about 25 s with the default fast preset.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from DTNRegistrationLib import mrml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "DTNRegistration" / "Resources" / "Samples"
OUTPUT = ROOT / "Resources" / "Screenshots" / "DTNRegistration-result.png"
TISSUE = {
    1: ("CSF", (0.35, 0.70, 0.90)),
    2: ("Grey matter", (0.90, 0.60, 0.00)),
    3: ("White matter", (0.95, 0.92, 0.75)),
}
SIZE = 320  # pixels of each rendered slice view (square)
SLICE_S = 12.0  # mm (RAS S) of the axial slice in the fixed (MNI) space: the lateral ventricles and cortex


def load_samples(context):
    """Moving volume, its tissue segmentation (named and coloured) and the fixed volume, as Sample Data loads them."""
    volumes = context.volumes_logic
    moving = volumes.AddArchetypeVolume(str(SAMPLES / "moving_itk_head_brain.nii.gz"), "DTN moving head")
    fixed = volumes.AddArchetypeVolume(str(SAMPLES / "fixed_icbm2009a_t1_2mm.nii.gz"), "DTN fixed ICBM 2009a")
    tissue = str(SAMPLES / "moving_itk_head_tissue.nii.gz")
    segmentation = context.segmentations_logic.LoadSegmentationFromFile(tissue, True, "DTN moving head tissue")
    for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        segment = segmentation.GetSegmentation().GetNthSegment(index)
        name, color = TISSUE[int(segment.GetLabelValue())]
        segment.SetName(name)
        segment.SetColor(*color)
    return moving, fixed, segmentation


def label_node(context, labels: sitk.Image, name: str, segments):
    """A label map node of ``labels`` coloured by ``segments`` (how segmentations are shown headless)."""
    node = mrml.add_volume_node(context, sitk.Cast(labels, sitk.sitkUInt16), name, labelmap=True)
    node.GetDisplayNode().SetAndObserveColorNodeID(mrml.label_color_table(context.scene, name, segments).GetID())
    return node


def view_extent(node):
    """The fixed volume's R and A bounds, and the matplotlib extent of a square axial view of it.

    As ``FitSliceToVolume`` frames it: centred on the volume, the field of view its larger in-plane side.
    """
    bounds = np.zeros(6)
    node.GetRASBounds(bounds)
    centre = (bounds[0::2] + bounds[1::2]) / 2
    half = max(bounds[1] - bounds[0], bounds[3] - bounds[2]) / 2
    extent = (centre[0] + half, centre[0] - half, centre[1] - half, centre[1] + half)  # R decreases to the right
    inner = bounds[:4] + max(node.GetSpacing()) * np.array([1, -1, 1, -1])  # voxel centres: where u is defined
    return inner, extent


def grid_lines(transform_node, affine: sitk.Transform, slice_s: float, bounds, step: float = 10.0):
    """A regular grid over the fixed volume in the view's plane, each point x moved to A^-1(x + u(x)).

    u: the transform node's displacement (LPS), A: the affine initialisation; what is left is the network's part.
    """
    field = sitk.DisplacementFieldTransform(mrml.grid_transform_to_displacement(transform_node))
    inverse = affine.GetInverse()
    r_range, a_range = bounds[:2], bounds[2:]
    lines = []
    for constant, other, r_is_constant in ((r_range, a_range, True), (a_range, r_range, False)):
        for value in np.arange(constant[0] + step / 2, constant[1], step):
            points = [(value, t) if r_is_constant else (t, value) for t in np.linspace(*other, 120)]
            moved = [inverse.TransformPoint(field.TransformPoint((-r, -a, slice_s))) for r, a in points]
            lines.append(np.array([(-x, -y) for x, y, _z in moved]))  # LPS -> RAS
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="shipped model name or weights file (default: the default)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"PNG to write (default: {OUTPUT})")
    parser.add_argument("--refine", type=int, default=None, help="test-time refinement steps (default: the engine's)")
    args = parser.parse_args()

    context = mrml.create_headless_scene()
    moving, fixed, segmentation = load_samples(context)
    logic = mrml.RegistrationLogic(context=context)
    # The module's path: the engine in a child process (mrml.RegistrationRunner), the nodes built from its files.
    nodes = logic.process_in_child(
        moving, fixed, model=args.model, refine=args.refine, moving_segmentation_node=segmentation
    )
    result = logic.last_result

    fixed_image = mrml.volume_to_image(fixed)
    before = sitk.Resample(mrml.volume_to_image(moving), fixed_image, result.affine, sitk.sitkLinear, 0.0)
    affine_only = mrml.add_volume_node(context, before, "DTN moving head, affine only")
    folding = mrml.segmentation_labels_on(nodes["folding"], fixed_image)
    folding_node = label_node(context, folding, "folding", mrml.segments_of(nodes["folding"]))
    bounds, extent = view_extent(fixed)

    def render(background, **options):
        rgba = mrml.render_slice(context, background, offset=SLICE_S, size=(SIZE, SIZE), **options) / 255.0
        return rgba[..., :3] * rgba[..., 3:]  # over black, as Slicer shows it

    # Before/after: fixed green, moving magenta, grey where they agree (then the fixed volume grey again).
    grey = fixed.GetDisplayNode().GetColorNodeID()
    for node, colour in ((fixed, "Green"), (affine_only, "Magenta"), (nodes["warped"], "Magenta")):
        node.GetDisplayNode().SetAndObserveColorNodeID(f"vtkMRMLColorTableNode{colour}")
    overlays = [render(fixed, foreground=node) for node in (affine_only, nodes["warped"])]
    fixed.GetDisplayNode().SetAndObserveColorNodeID(grey)
    panels = [
        ("Fixed (green) + moving, affine only", overlays[0]),
        ("Fixed (green) + warped moving (DTN)", overlays[1]),
        ("Propagated tissue segmentation", render(fixed, label=nodes["labelmap"])),
        ("det J (0 blue, 1 white, 2 orange), folding red", render(nodes["jacobian"], label=folding_node)),
        ("Deformation grid (non-linear part)", render(fixed)),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (title, rgb) in zip(axes, panels):
        ax.imshow(rgb, extent=extent)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    for line in grid_lines(nodes["transform"], result.affine, SLICE_S, bounds):
        axes[-1].plot(line[:, 0], line[:, 1], color="tab:orange", lw=0.6)
    axes[-1].set_xlim(extent[0], extent[1])
    axes[-1].set_ylim(extent[2], extent[3])
    status = mrml.status_line(result)
    fig.suptitle(
        f"DTN Registration, headless render of the result nodes ({result.model['name']}): {status}", fontsize=9
    )
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100)
    print(f"{status}\nwrote {args.output}")


if __name__ == "__main__":
    main()
