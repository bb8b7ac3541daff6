"""Colour tables of the result nodes: det J (diverging, one per scene) and the propagated label map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import slicer

from .scene import ROLE_PREFIX
from .segmentations import SegmentInfo

JACOBIAN_COLOR_NODE_NAME = "DTN Jacobian determinant"
JACOBIAN_WINDOW = (0.0, 2.0)  # det J shown from 0 (full compression) through 1 (none) to 2 (doubling)


def jacobian_color_table(scene):
    """The diverging colour table for det J (blue: compression, white: 1, orange: expansion); one per scene."""
    existing = scene.GetFirstNodeByName(JACOBIAN_COLOR_NODE_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetName(JACOBIAN_COLOR_NODE_NAME)
    table.SetHideFromEditors(False)
    table.SetAttribute(ROLE_PREFIX + "role", "jacobian-colors")
    count = 256
    table.SetNumberOfColors(count)
    low, mid, high = np.array([0.23, 0.30, 0.75]), np.array([0.95, 0.95, 0.95]), np.array([0.85, 0.33, 0.05])
    for index in range(count):
        t = index / (count - 1)
        color = low + (mid - low) * (t / 0.5) if t <= 0.5 else mid + (high - mid) * ((t - 0.5) / 0.5)
        value = JACOBIAN_WINDOW[0] + t * (JACOBIAN_WINDOW[1] - JACOBIAN_WINDOW[0])
        table.SetColor(index, f"det J {value:.3f}", *color, 1.0)
    scene.AddNode(table)
    return table


def label_color_table(scene, name: str, segments: Sequence[SegmentInfo], table=None):
    """A user colour table with the segments' names and colours at their label values (added to ``scene``).

    ``table``: a colour table made by this function before, updated in place instead of adding a new one.
    """
    if table is None or table.GetAttribute(ROLE_PREFIX + "role") != "label-colors":
        table = slicer.vtkMRMLColorTableNode()
        table.SetName(scene.GenerateUniqueName(name))
        table.SetAttribute(ROLE_PREFIX + "role", "label-colors")
        table.SetHideFromEditors(False)
    table.SetTypeToUser()
    count = max([info.label for info in segments], default=0) + 1
    table.SetNumberOfColors(count)
    table.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for value in range(1, count):  # label values no segment uses stay transparent
        table.SetColor(value, "", 0.0, 0.0, 0.0, 0.0)
    for info in segments:
        table.SetColor(info.label, info.name, *info.color, 1.0)
    if not scene.IsNodePresent(table):
        scene.AddNode(table)
    return table
