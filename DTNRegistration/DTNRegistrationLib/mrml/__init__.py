"""Slicer glue of the engine: MRML nodes <-> SimpleITK images, and a registration result -> MRML nodes.

The only part of the engine that imports ``slicer``. It runs the same inside the Slicer application and
headless with ``slicer-core`` (``pip install slicer-core``): everything it needs from Slicer is handed to it as
a :class:`SceneContext` (a scene and the module logics), which defaults to Slicer's own inside the application.

* ``scene``: the scene and module logics (Slicer's, or headless ones), and undoing what an operation added;
* ``geometry``: volume nodes <-> SimpleITK images (IJK-to-RAS, RAS/LPS; the one place where they meet);
* ``grid_transform``: displacement fields <-> grid transform nodes;
* ``segmentations``: segmentations <-> label maps, masks;
* ``colors``: the colour tables of det J and of propagated label maps;
* ``job``: what passes between prepare, compute and build;
* ``nodes``: a registration result -> MRML nodes;
* ``logic``: :class:`RegistrationLogic` (validate, prepare, compute, build);
* ``runner``: :class:`RegistrationRunner`, the engine in a child process, polled from the main thread;
* ``placement``: a moving-space node shown through the result, its linear transforms kept;
* ``render``: a slice view as an image, without OpenGL;
* ``export``: a segmentation to a file, a scene to a .mrb bundle.

Everything is re-exported here: ``from DTNRegistrationLib import mrml; mrml.volume_to_image(...)``.
"""

from .colors import JACOBIAN_COLOR_NODE_NAME, JACOBIAN_WINDOW, jacobian_color_table, label_color_table
from .export import (
    LABELMAP_EXTENSIONS,
    SEGMENTATION_EXTENSIONS,
    export_segmentation,
    save_result_scene,
    write_mrb,
    write_scene_from_files,
)
from .geometry import (
    LPS_TO_RAS,
    image_from_oriented_image,
    image_ijk_to_ras,
    node_ijk_to_world,
    numpy_from_image_data,
    oriented_image_from_image,
    set_image_geometry,
    update_volume_from_image,
    volume_to_image,
)
from .grid_transform import displacement_to_grid_transform, grid_transform_to_displacement, restore_linear_interpolation
from .job import OutputNodes, RegistrationJob
from .logic import RegistrationLogic, status_line
from .nodes import FOLDING_COLOR, FOLDING_SEGMENT_ID, FOLDING_SEGMENT_NAME, add_volume_node, build_result_nodes
from .placement import place_under_transform
from .render import render_slice, render_slice_image
from .runner import RegistrationRunner, RunnerState, child_python
from .scene import ROLE_PREFIX, SceneContext, app_context, create_headless_scene
from .segmentations import (
    SegmentInfo,
    add_segments_from_labels,
    default_segments,
    mask_to_image,
    segmentation_labels_on,
    segmentation_to_labels,
    segments_of,
)

# Testing/slicer_scene.py reads voxels through this name, private in the former single-file mrml.py.
_numpy_from_image_data = numpy_from_image_data

# The public names, all usable as ``mrml.X``.
__all__ = [
    "FOLDING_COLOR",
    "FOLDING_SEGMENT_ID",
    "FOLDING_SEGMENT_NAME",
    "JACOBIAN_COLOR_NODE_NAME",
    "JACOBIAN_WINDOW",
    "LABELMAP_EXTENSIONS",
    "LPS_TO_RAS",
    "ROLE_PREFIX",
    "SEGMENTATION_EXTENSIONS",
    "OutputNodes",
    "RegistrationJob",
    "RegistrationLogic",
    "RegistrationRunner",
    "RunnerState",
    "SceneContext",
    "SegmentInfo",
    "add_segments_from_labels",
    "add_volume_node",
    "app_context",
    "build_result_nodes",
    "child_python",
    "create_headless_scene",
    "default_segments",
    "displacement_to_grid_transform",
    "export_segmentation",
    "grid_transform_to_displacement",
    "image_from_oriented_image",
    "image_ijk_to_ras",
    "jacobian_color_table",
    "label_color_table",
    "mask_to_image",
    "node_ijk_to_world",
    "numpy_from_image_data",
    "oriented_image_from_image",
    "place_under_transform",
    "render_slice",
    "render_slice_image",
    "restore_linear_interpolation",
    "save_result_scene",
    "segmentation_labels_on",
    "segmentation_to_labels",
    "segments_of",
    "set_image_geometry",
    "status_line",
    "update_volume_from_image",
    "volume_to_image",
    "write_mrb",
    "write_scene_from_files",
]
