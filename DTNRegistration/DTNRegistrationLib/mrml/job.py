"""What passes between the steps of a run: the output nodes asked for, and the inputs read from the scene."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk  # noqa: N813

from ..options import RegistrationOptions
from .segmentations import SegmentInfo


@dataclass
class OutputNodes:
    """Existing nodes to overwrite with the results; ``None`` creates a new node (named after the inputs)."""

    transform: Any = None
    warped: Any = None
    jacobian: Any = None
    folding: Any = None
    segmentation: Any = None
    labelmap: Any = None
    create_labelmap: bool = True

    _classes = {
        "transform": "vtkMRMLGridTransformNode",
        "warped": "vtkMRMLScalarVolumeNode",
        "jacobian": "vtkMRMLScalarVolumeNode",
        "folding": "vtkMRMLSegmentationNode",
        "segmentation": "vtkMRMLSegmentationNode",
        "labelmap": "vtkMRMLLabelMapVolumeNode",
    }

    def items(self):
        return [(name, getattr(self, name)) for name in self._classes]

    def present_in(self, scene) -> OutputNodes:
        """These outputs less the nodes no longer in ``scene`` (deleted meanwhile: those are created anew)."""
        kept = {name: node if node is not None and scene.IsNodePresent(node) else None for name, node in self.items()}
        return OutputNodes(**kept, create_labelmap=self.create_labelmap)


@dataclass
class RegistrationJob:
    """Everything a registration needs, read from the scene on the main thread (no MRML in here)."""

    moving: sitk.Image
    fixed: sitk.Image
    moving_labels: sitk.Image | None = None
    mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None  # 0 where the moving volume is left out of the similarity
    segments: list[SegmentInfo] = field(default_factory=list)
    options: RegistrationOptions = field(default_factory=RegistrationOptions)
    moving_name: str = "moving"
    fixed_name: str = "fixed"
    segmentation_name: str = "segmentation"
    node_ids: dict = field(default_factory=dict)
