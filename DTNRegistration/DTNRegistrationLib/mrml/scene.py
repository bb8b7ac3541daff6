"""Scenes and module logics: Slicer's own inside the application, or a headless equivalent (slicer-core).

Also the bookkeeping that lets an operation leave a scene exactly as it found it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import slicer

# Attributes and node references this module sets start with it, so that its nodes can be told apart.
ROLE_PREFIX = "DTNRegistration."


@dataclass
class SceneContext:
    """A scene with the module logics this module uses (Slicer's own inside the app, or headless ones)."""

    scene: Any
    volumes_logic: Any = None
    segmentations_logic: Any = None
    transforms_logic: Any = None
    application_logic: Any = None
    keep_alive: list = field(default_factory=list, repr=False)


def app_context(
    scene: Any = None, *, volumes_logic: Any = None, segmentations_logic: Any = None, transforms_logic: Any = None
) -> SceneContext:
    """A scene and its module logics: those given, the rest the running application's (the one place that asks
    Slicer for them). Outside the application (slicer-core) what is not given stays None."""
    modules = getattr(slicer, "modules", None)

    def module_logic(given: Any, name: str) -> Any:
        if given is not None or modules is None or not hasattr(modules, name):
            return given
        return getattr(modules, name).logic()

    app = getattr(slicer, "app", None)
    return SceneContext(
        scene=scene if scene is not None else slicer.mrmlScene,
        volumes_logic=module_logic(volumes_logic, "volumes"),
        segmentations_logic=module_logic(segmentations_logic, "segmentations"),
        transforms_logic=module_logic(transforms_logic, "transforms"),
        application_logic=app.applicationLogic() if hasattr(app, "applicationLogic") else None,
    )


def create_headless_scene(cache_dir: str | os.PathLike | None = None) -> SceneContext:
    """A scene that behaves like Slicer's, without the application (slicer-core).

    A cache manager and a data I/O manager (needed to read .mrb), an application logic with a colour logic
    registered as "Colors" (volume loading needs it), and the Volumes, Transforms, Segmentations and
    SubjectHierarchy logics, each registered with the application logic under its module name.
    """
    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    # Without a given folder, a temporary one that is deleted with the context (not one left per scene).
    owned = tempfile.TemporaryDirectory(prefix="dtnreg-cache-") if cache_dir is None else None
    cache.SetRemoteCacheDirectory(str(cache_dir) if owned is None else owned.name)
    scene.SetCacheManager(cache)
    io_manager = slicer.vtkDataIOManager()
    io_manager.SetCacheManager(cache)
    scene.SetDataIOManager(io_manager)
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    app.SetColorLogic(colors)
    app.SetModuleLogic("Colors", colors)
    logics = {}
    for name, cls in (
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Transforms", slicer.vtkSlicerTransformLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
    ):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    return SceneContext(
        scene=scene,
        volumes_logic=logics["Volumes"],
        segmentations_logic=logics["Segmentations"],
        transforms_logic=logics["Transforms"],
        application_logic=app,
        keep_alive=[cache, io_manager, colors, logics["SubjectHierarchy"], owned],
    )


def nodes_of(scene, class_name: str) -> list:
    """The scene's nodes of a class (subclasses included)."""
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def node_ids(scene) -> set[str]:
    """The IDs of every node in the scene: take them before an operation to undo what it adds."""
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def remove_nodes_added_since(scene, ids_before: set[str]) -> None:
    """Remove the nodes that are not in ``ids_before`` (with the display, storage and colour nodes they brought)."""
    added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    for node in reversed(added):  # newest first
        if node.GetID() not in ids_before and scene.IsNodePresent(node):
            scene.RemoveNode(node)
