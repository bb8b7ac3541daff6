"""The registration of two volume nodes, split into prepare, compute and build.

``prepare`` (main thread: read the nodes, validate), ``compute`` (the engine only, no MRML: in this process, or in
a child process through :class:`~.runner.RegistrationRunner`, as the Slicer module does) and ``build`` (main
thread: create the nodes), so that a cancelled or failed computation leaves the scene exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import SimpleITK as sitk  # noqa: N813

from ..options import RegistrationOptions
from .geometry import volume_to_image
from .job import OutputNodes, RegistrationJob
from .nodes import build_result_nodes
from .runner import RegistrationRunner
from .scene import SceneContext, app_context
from .segmentations import mask_to_image, segmentation_to_labels


class RegistrationLogic:
    """Registration of two volume nodes with the DTN engine, results as MRML nodes.

    Usable without the Slicer application: give it a :class:`SceneContext` (e.g. from
    :func:`create_headless_scene`); inside Slicer it defaults to the application's scene and logics.
    Inputs are never modified.
    """

    def __init__(
        self,
        scene=None,
        *,
        volumes_logic=None,
        segmentations_logic=None,
        transforms_logic=None,
        context: SceneContext | None = None,
    ) -> None:
        self.context = context or app_context(
            scene,
            volumes_logic=volumes_logic,
            segmentations_logic=segmentations_logic,
            transforms_logic=transforms_logic,
        )
        self.last_result = None

    @property
    def scene(self):
        return self.context.scene

    # -- prepare (main thread) -------------------------------------------------------------------------------
    def prepare(
        self,
        moving_node,
        fixed_node,
        *,
        alpha: float | None = None,
        device: str = "auto",
        model: str | None = None,
        refine: int | None = None,
        preset: str | None = None,
        refine_similarity: str | None = None,
        affine: bool = True,
        mask_node=None,
        moving_exclusion_node=None,
        moving_segmentation_node=None,
        outputs: OutputNodes | None = None,
    ) -> RegistrationJob:
        """Validate the selection and read the inputs into SimpleITK images (copies).

        ``moving_exclusion_node``: a label map or segmentation of what the fixed volume lacks (a lesion, a resection
        cavity); the engine gets its complement as the moving mask, so that region does not drive the deformation.
        """
        if moving_node is None:
            raise ValueError("Select a moving volume.")
        if fixed_node is None:
            raise ValueError("Select a fixed volume.")
        if moving_node is fixed_node or moving_node.GetID() == fixed_node.GetID():
            raise ValueError(f"'{moving_node.GetName()}' is selected as both the moving and the fixed volume.")
        for what, node in (("moving volume", moving_node), ("fixed volume", fixed_node)):
            if node.GetScene() is not None and node.GetScene() is not self.scene:
                raise ValueError(f"{what} '{node.GetName()}' belongs to another scene")
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise ValueError(f"{what} '{node.GetName()}' is a label map; select an intensity image")
        options = RegistrationOptions(
            alpha=alpha,
            device=device,
            model=model,
            refine=refine,
            preset=preset,
            refine_similarity=refine_similarity,
            affine=affine,
        )
        moving = volume_to_image(moving_node, "moving volume")
        fixed = volume_to_image(fixed_node, "fixed volume")
        _check_3d(moving, moving_node, "moving volume")
        _check_3d(fixed, fixed_node, "fixed volume")
        _check_outputs(outputs, [moving_node, fixed_node, mask_node, moving_exclusion_node, moving_segmentation_node])

        job = RegistrationJob(
            moving=moving,
            fixed=fixed,
            options=options,
            moving_name=moving_node.GetName(),
            fixed_name=fixed_node.GetName(),
            node_ids={"moving": moving_node.GetID(), "fixed": fixed_node.GetID()},
        )
        if mask_node is not None:
            job.mask = mask_to_image(mask_node, fixed_node, fixed, self.context)
            job.node_ids["mask"] = mask_node.GetID()
        if moving_exclusion_node is not None:
            excluded = mask_to_image(moving_exclusion_node, moving_node, moving, self.context, "moving volume")
            job.moving_mask = sitk.Cast(excluded == 0, sitk.sitkUInt8)
            job.node_ids["moving_exclusion"] = moving_exclusion_node.GetID()
        if moving_segmentation_node is not None:
            if not moving_segmentation_node.IsA("vtkMRMLSegmentationNode"):
                raise ValueError(f"'{moving_segmentation_node.GetName()}' is not a segmentation")
            job.moving_labels, job.segments = segmentation_to_labels(
                moving_segmentation_node, moving_node, moving, self.context
            )
            job.segmentation_name = moving_segmentation_node.GetName()
            job.node_ids["segmentation"] = moving_segmentation_node.GetID()
        return job

    # -- compute (any thread, no MRML) -----------------------------------------------------------------------
    @staticmethod
    def compute(
        job: RegistrationJob,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ):
        """Run the engine on a prepared job; raises ``registration.Cancelled`` when cancelled."""
        # Imported here: torch is loaded only when a registration runs.
        from ..core import registration

        return registration.register(
            job.moving,
            job.fixed,
            moving_labels=job.moving_labels,
            mask=job.mask,
            moving_mask=job.moving_mask,
            model=job.options.model,
            progress=progress,
            cancel=cancel,
            **job.options.register_keywords(),
        )

    # -- build (main thread) ---------------------------------------------------------------------------------
    def build(self, job: RegistrationJob, result, outputs: OutputNodes | None = None) -> dict[str, Any]:
        """Create the result nodes (only after a successful computation)."""
        return build_result_nodes(
            self.context,
            job,
            result,
            outputs,
            fixed_node=self._input_node(job, "fixed"),
            moving_node=self._input_node(job, "moving"),
        )

    def _input_node(self, job: RegistrationJob, role: str):
        """The job's input node of a role, or None where the job does not name one."""
        node_id = job.node_ids.get(role)
        return self.scene.GetNodeByID(node_id) if node_id else None

    def process(
        self,
        moving_node,
        fixed_node,
        *,
        progress: Callable[[float, str], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        **selection,
    ) -> dict[str, Any]:
        """Prepare, compute and build in one call (blocking); returns the created/updated nodes by role.

        ``selection``: the keyword arguments of :meth:`prepare` (alpha, device, model, refine, affine, mask_node,
        moving_segmentation_node, outputs). The engine's ``RegistrationResult`` is kept as ``self.last_result``.
        Cancelling raises ``registration.Cancelled``; a failure raises; in both cases the scene is left as it was.
        """
        job = self.prepare(moving_node, fixed_node, **selection)
        result = self.compute(job, progress=progress, cancel=cancel)
        nodes = self.build(job, result, selection.get("outputs"))
        self.last_result = result
        return nodes

    def process_in_child(
        self,
        moving_node,
        fixed_node,
        *,
        timeout: float | None = None,
        runner_options: dict | None = None,
        **selection,
    ) -> dict[str, Any]:
        """As :meth:`process`, with the engine in a child process (the Slicer module's path), blocking.

        ``runner_options``: keyword arguments of :class:`~.runner.RegistrationRunner` (``python``, ``env``, ...).
        On ``timeout`` (seconds) the child is cancelled and ``Cancelled`` raised. Errors as for :meth:`process`.
        """
        job = self.prepare(moving_node, fixed_node, **selection)
        runner = RegistrationRunner(job, **(runner_options or {}))
        runner.start()
        state = runner.wait(timeout)
        if state.error is not None:
            raise state.error
        nodes = self.build(job, state.result, selection.get("outputs"))
        self.last_result = state.result
        return nodes


def _check_3d(image: sitk.Image, node, what: str) -> None:
    size = image.GetSize()
    if min(size) < 2:
        raise ValueError(f"{what} '{node.GetName()}' is a 2-D image (size {size}); DTN registers 3-D volumes")
    if min(size) < 4:
        raise ValueError(f"{what} '{node.GetName()}' (size {size}) is too thin: at least 4 voxels along every axis")


def _check_outputs(outputs: OutputNodes | None, inputs: list) -> None:
    """Outputs must not be inputs, and each must be of the class its role needs."""
    if outputs is None:
        return
    input_ids = {node.GetID() for node in inputs if node is not None}
    for name, node in outputs.items():
        if node is None:
            continue
        if node.GetID() in input_ids:
            raise ValueError(f"output {name} '{node.GetName()}' is one of the inputs; inputs are never overwritten")
        wanted = OutputNodes._classes[name]
        is_labelmap_as_volume = wanted == "vtkMRMLScalarVolumeNode" and node.IsA("vtkMRMLLabelMapVolumeNode")
        if not node.IsA(wanted) or is_labelmap_as_volume:
            raise ValueError(f"output {name} '{node.GetName()}' is a {node.GetClassName()}; a {wanted} is needed")


def status_line(result) -> str:
    """One line for the user: folding count and percentage, device, time; then the engine's warnings, if any."""
    metrics = result.metrics
    line = (
        f"Folding voxels (det J <= 0): {int(metrics.get('folding_count', 0))} "
        f"({float(metrics.get('folding_percent', 0.0)):.3f} %), device: {result.device}, "
        f"time: {float(result.timings.get('total', 0.0)):.1f} s"
    )
    return "".join([line] + [f"\nWarning: {warning}" for warning in metrics.get("warnings") or []])
