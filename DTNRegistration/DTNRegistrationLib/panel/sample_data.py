"""The bundled sample pair in Slicer's Sample Data module, and the panel's default volumes (no Slicer import).

``register_samples`` takes Slicer's ``SampleDataLogic`` class and passes only what every version from 5.6 to 5.12
accepts: ``loadFileType=`` with one type per file (5.6 knows only this name; 5.8 and later keep it as an alias of
``loadFileTypes=``), and the category's title only where ``registerCustomSampleDataCategory`` exists (5.12+).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CATEGORY = "DTNRegistration"
MOVING_NODE = "DTN moving head"
FIXED_NODE = "DTN fixed ICBM 2009a"


@dataclass(frozen=True)
class SampleFile:
    file_name: str
    node_name: str
    file_type: str  # Slicer's reader: "VolumeFile", "SegmentationFile"


@dataclass(frozen=True)
class Sample:
    name: str
    thumbnail: str
    files: tuple[SampleFile, ...]


SAMPLES = (
    Sample(
        "DTN moving: ITK head",
        "DTNSampleMoving.png",
        (
            SampleFile("moving_itk_head_brain.nii.gz", MOVING_NODE, "VolumeFile"),
            SampleFile("moving_itk_head_tissue.seg.nrrd", "DTN moving head tissue", "SegmentationFile"),
        ),
    ),
    Sample(
        "DTN fixed: ICBM 2009a",
        "DTNSampleFixed.png",
        (
            SampleFile("fixed_icbm2009a_t1_2mm.nii.gz", FIXED_NODE, "VolumeFile"),
            SampleFile("fixed_icbm2009a_tissue_2mm.seg.nrrd", "DTN fixed ICBM 2009a tissue", "SegmentationFile"),
        ),
    ),
)


def register_samples(
    logic_class, samples_dir: str | os.PathLike, icons_dir: str | os.PathLike, title: str = "DTN Registration"
) -> list[str]:
    """Register the bundled samples (local files, no download) with ``SampleDataLogic``; returns their names."""
    samples_dir, icons_dir = Path(samples_dir), Path(icons_dir)
    if hasattr(logic_class, "registerCustomSampleDataCategory"):  # Slicer 5.12 and later: a titled category
        logic_class.registerCustomSampleDataCategory(CATEGORY, title)
    registered = []
    for sample in SAMPLES:
        files = [entry for entry in sample.files if (samples_dir / entry.file_name).is_file()]
        if not files:
            continue
        logic_class.registerCustomSampleDataSource(
            category=CATEGORY,
            sampleName=sample.name,
            uris=[(samples_dir / entry.file_name).as_uri() for entry in files],
            fileNames=[entry.file_name for entry in files],
            nodeNames=[entry.node_name for entry in files],
            thumbnailFileName=str(icons_dir / sample.thumbnail),
            loadFileType=[entry.file_type for entry in files],
        )
        registered.append(sample.name)
    return registered


def default_volumes(volumes: list) -> tuple[object | None, object | None]:
    """The panel's first selection ``(moving, fixed)`` among the scene's intensity volumes (nodes, scene order).

    The sample pair by its node names, whatever order it was loaded in. Otherwise no moving volume (the first
    volume is as likely to be either), and the first volume as the fixed one, as Slicer's templates do.
    """

    def named(name: str):
        return next((node for node in volumes if _base_name(node.GetName()) == name), None)

    moving, fixed = named(MOVING_NODE), named(FIXED_NODE)
    if fixed is None:
        fixed = next((node for node in volumes if node is not moving), None)
    return moving, fixed


def _base_name(name: str) -> str:
    """A node name without the "_1", "_2" Slicer appends when the same sample is loaded again."""
    stem, _, number = name.rpartition("_")
    return stem if stem and number.isdigit() else name


__all__ = ["CATEGORY", "FIXED_NODE", "MOVING_NODE", "SAMPLES", "default_volumes", "register_samples"]
