# ruff: noqa: N815, UP045
# (N815: Slicer's camelCase parameter names. UP045: the parameter node wrapper needs typing.Optional and
# typing.Union, it does not recognise `X | None`; annotations are evaluated, so no `from __future__`.)
"""DTN Registration: Slicer glue over the DTNRegistrationLib engine (Module, Widget, Logic, Test).

The engine (``DTNRegistrationLib``) knows nothing of Slicer; ``DTNRegistrationLib.mrml`` turns nodes into
images and results into nodes and holds the Logic's real work, so that it runs (and is tested) headless with
slicer-core. This file adds the GUI: a parameter node saved with the scene, a worker thread for the engine
(MRML is touched only on the main thread, polled by a QTimer), progress and Cancel, dependency installation.
"""

import logging
import os
import struct
import subprocess
import threading
import time
import traceback
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLGridTransformNode,
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
MODELS_DIR = MODULE_DIR / "Resources" / "Models"
TORCH_REQUIREMENT = ">=2.1"
# Packages Slicer bundles: an installation must never replace them (they are pinned while pip runs).
BUNDLED_PACKAGES = ("SimpleITK", "numpy", "scipy", "vtk")
DEVICES = ["auto", "cuda", "cpu"]
DEFAULT_ALPHA = 0.1
ALPHA_RANGE = (0.01, 1.0)
PAPER = (
    "Y. Zhang, Y. Pei, H. Zha. Learning Dual Transformer Network for Diffeomorphic Registration. "
    "MICCAI 2021, LNCS 12904, pp. 129-138. https://doi.org/10.1007/978-3-030-87202-1_13"
)


#
# DTNRegistration
#


class DTNRegistration(ScriptedLoadableModule):
    """Module description (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DTN Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DTNRegistration developers"]
        self.parent.helpText = _(
            """
Deformable (diffeomorphic) registration of brain MRI with a Dual Transformer Network (DTN).
<p>A 3D U-Net encodes the moving and the fixed image separately and together; two transformers relate the
two images globally (one across the separate images, one over their concatenation); a decoder predicts a
stationary velocity field v, integrated by scaling and squaring into the deformation exp(v), which is
invertible (diffeomorphic). Test-time refinement (25 steps by default) then optimises the velocity on this pair
(local normalised cross-correlation + alpha times the velocity's smoothness).</p>
<p><b>Inputs</b>: a moving and a fixed volume (any orientation; an affine initialisation runs first),
optionally a segmentation of the moving volume to propagate and a mask of the fixed volume.
<b>Smoothness (alpha)</b>: larger gives smoother deformations and fewer folding voxels.
<b>Device</b>: a CUDA GPU makes registration fast; the CPU works everywhere.</p>
<p><b>Outputs</b>: a grid transform (moving to fixed; put the moving volume or its segmentations under it),
the warped volume (shown over the fixed one), the Jacobian determinant (with a colour table), the folding
voxels (det J &lt;= 0, red overlay) and the propagated segmentation, which can be exported as .seg.nrrd or
a label map.</p>
<p>Method: """
            + PAPER
            + """</p>
<p>Also available as a command line: <code>dtnreg register --moving M --fixed F --output-dir D</code>.</p>
"""
        )
        self.parent.acknowledgementText = _(
            """
This extension implements the method of Zhang, Pei and Zha (Peking University), "Learning Dual Transformer
Network for Diffeomorphic Registration", MICCAI 2021. It uses 3D Slicer, PyTorch (through the PyTorch
extension), SimpleITK and safetensors.
"""
        )
        # The bundled sample pair in the Sample Data module, once the application has started; and a fix-up of
        # this module's grid transforms in every scene loaded from then on.
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", observeSceneImports)


def observeSceneImports():
    """Grid transforms read from file come back with cubic interpolation: make this module's linear again."""

    def onEndImport(caller, event):
        transforms = slicer.util.getNodesByClass("vtkMRMLGridTransformNode")
        if any(node.GetAttribute("DTNRegistration.alpha") is not None for node in transforms):
            from DTNRegistrationLib import mrml

            mrml.restore_linear_interpolation(slicer.mrmlScene)

    slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndImportEvent, onEndImport)


def registerSampleData():
    """Add the bundled sample pair (local files, no download) to the Sample Data module."""
    import SampleData

    samples = MODULE_DIR / "Resources" / "Samples"
    icons = MODULE_DIR / "Resources" / "Icons"
    sources = [
        (
            "DTN moving: ITK head",
            "DTNSampleMoving.png",
            [("moving_itk_head_brain.nii.gz", "DTN moving head", "VolumeFile")],
            [("moving_itk_head_tissue.seg.nrrd", "DTN moving head tissue", "SegmentationFile")],
        ),
        (
            "DTN fixed: ICBM 2009a",
            "DTNSampleFixed.png",
            [("fixed_icbm2009a_t1_2mm.nii.gz", "DTN fixed ICBM 2009a", "VolumeFile")],
            [("fixed_icbm2009a_tissue_2mm.seg.nrrd", "DTN fixed ICBM 2009a tissue", "SegmentationFile")],
        ),
    ]
    SampleData.SampleDataLogic.registerCustomSampleDataCategory("DTNRegistration", title=_("DTN Registration"))
    for sampleName, thumbnail, images, labels in sources:
        files = [entry for entry in images + labels if (samples / entry[0]).is_file()]
        if not files:
            continue
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="DTNRegistration",
            sampleName=sampleName,
            uris=[(samples / name).as_uri() for name, _node, _type in files],
            fileNames=[name for name, _node, _type in files],
            nodeNames=[node for _name, node, _type in files],
            loadFileTypes=[kind for _name, _node, kind in files],
            thumbnailFileName=str(icons / thumbnail),
        )


#
# Parameter node
#


@parameterNodeWrapper
class DTNRegistrationParameterNode:
    """The module's state, saved with the scene.

    movingVolume, fixedVolume: the images to register (moving onto fixed).
    movingSegmentation: optional segmentation of the moving volume, propagated onto the fixed one.
    alpha: smoothness weight; device: auto, cuda or cpu; model: shipped model name or weights file ("" default).
    refineSteps: test-time refinement steps; affine: affine initialisation; mask: optional fixed-image mask.
    output*: nodes to overwrite; None creates new ones named after the inputs.
    """

    movingVolume: vtkMRMLScalarVolumeNode
    fixedVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: Optional[vtkMRMLSegmentationNode]
    alpha: Annotated[float, WithinRange(*ALPHA_RANGE)] = DEFAULT_ALPHA
    device: Annotated[str, Choice(DEVICES)] = "auto"
    model: str = ""
    refineSteps: Annotated[int, WithinRange(0, 1000)] = 25
    affine: bool = True
    mask: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    outputTransform: Optional[vtkMRMLGridTransformNode]
    outputWarpedVolume: Optional[vtkMRMLScalarVolumeNode]
    outputJacobian: Optional[vtkMRMLScalarVolumeNode]
    outputFolding: Optional[vtkMRMLSegmentationNode]
    outputSegmentation: Optional[vtkMRMLSegmentationNode]


#
# Worker: the engine off the GUI thread
#


class RegistrationWorker:
    """Runs ``compute(job, progress=..., cancel=...)`` in a Python thread; the GUI polls it with a QTimer.

    The thread never touches MRML or Qt: it only reads the prepared job (SimpleITK images) and stores the
    latest progress, the result or the error, which the main thread picks up.
    """

    def __init__(self, job, compute) -> None:
        self.job = job
        self._compute = compute
        self._lock = threading.Lock()
        self._progress = (0.0, _("Starting..."))
        self._cancel = threading.Event()
        self.result = None
        self.error: Optional[BaseException] = None
        self.errorDetails = ""
        self.startTime = time.time()
        self._thread = threading.Thread(target=self._run, name="DTNRegistration", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._compute(self.job, progress=self._onProgress, cancel=self._cancel.is_set)
        except BaseException as err:  # handed to the main thread, which reports it
            self.error = err
            self.errorDetails = traceback.format_exc()

    def _onProgress(self, fraction: float, message: str) -> None:
        with self._lock:
            self._progress = (float(fraction), str(message))

    @property
    def progress(self) -> tuple[float, str]:
        with self._lock:
            return self._progress

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    def isDone(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> bool:
        self._thread.join(timeout)
        return self.isDone()


#
# DTNRegistrationWidget
#


class DTNRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module's panel. No network or pip work happens here until the user clicks Register."""

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._worker: Optional[RegistrationWorker] = None
        self._workerOutputs = None
        self._discardWorkerResult = False
        self._lastSegmentation = None
        self._pollTimer = None
        self._devices = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DTNRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DTNRegistrationLogic()

        self.ui.progressBar.setVisible(False)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.alphaDefaultButton.connect("clicked()", self.onAlphaDefault)
        self.ui.modelBrowseButton.connect("clicked()", self.onBrowseModel)
        self.ui.modelLineEdit.connect("editingFinished()", self.updateModelInfo)
        self.ui.exportSegmentationButton.connect("clicked()", self.onExportSegmentation)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateExportButton)

        completer = qt.QCompleter(self.logic.shippedModelNames())
        self.ui.modelLineEdit.setCompleter(completer)

        self.initializeParameterNode()
        # Device detection reads `nvidia-smi` and package metadata (no torch import, no network): after the
        # panel is shown, not in the constructor.
        qt.QTimer.singleShot(0, self.updateDeviceInfo)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._worker is not None:
            self._discardWorkerResult = True
            self._worker.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)

    def onSceneStartClose(self, caller, event) -> None:
        if self._worker is not None:  # the scene goes away: whatever the engine returns is dropped
            self._discardWorkerResult = True
            self._worker.cancel()
        self._lastSegmentation = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if not node.fixedVolume or not node.movingVolume:
            volumes = [
                v
                for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not v.IsA("vtkMRMLLabelMapVolumeNode")
            ]
            if not node.fixedVolume and volumes:
                node.fixedVolume = volumes[0]
            if not node.movingVolume and len(volumes) > 1:
                node.movingVolume = volumes[1]
        raw = node.parameterNode
        if raw.GetAttribute("DTNRegistration.alphaFromModel") != "1":
            raw.SetAttribute("DTNRegistration.alphaFromModel", "1")
            node.alpha = self.logic.modelAlpha(node.model)
        self.updateModelInfo()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)
            self._decorateDeviceItems()
            self._updateGuiState()

    # -- GUI state ---------------------------------------------------------------------------------------------

    def _updateGuiState(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = self._worker is not None
        if running:
            return
        if not node or not node.movingVolume or not node.fixedVolume:
            self.ui.registerButton.enabled = False
            self.ui.registerButton.toolTip = _("Select a moving and a fixed volume.")
        elif node.movingVolume == node.fixedVolume:
            self.ui.registerButton.enabled = False
            self.ui.registerButton.toolTip = _("The moving and the fixed volume must be different volumes.")
        else:
            self.ui.registerButton.enabled = True
            self.ui.registerButton.toolTip = _("Register the moving volume onto the fixed volume.")
        self.updateExportButton()

    def _setRunning(self, running: bool) -> None:
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.registrationCollapsibleButton,
            self.ui.advancedCollapsibleButton,
            self.ui.outputsCollapsibleButton,
        ):
            widget.enabled = not running
        self.ui.progressBar.setVisible(running)
        if running:
            self.ui.progressBar.value = 0
            self.ui.registerButton.text = _("Cancel")
            self.ui.registerButton.toolTip = _("Stop the registration; nothing is added to the scene.")
            self.ui.registerButton.enabled = True
        else:
            self.ui.registerButton.text = _("Register")
            self._updateGuiState()

    def _setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c62828;" if error else "")

    def updateDeviceInfo(self) -> None:
        self._devices = self.logic.detectDevices()
        self.ui.deviceInfoLabel.text = self._devices["summary"]
        self._decorateDeviceItems()

    def _decorateDeviceItems(self) -> None:
        """Name the detected GPU in the device choices (the items keep their order: auto, cuda, cpu)."""
        devices = self._devices
        combo = self.ui.deviceComboBox
        if devices is None or combo.count != len(DEVICES):
            return
        gpu = devices["gpus"][0] if devices["gpus"] else None
        usable = devices["cudaUsable"]
        combo.setItemText(0, _("Automatic ({device})").format(device=gpu if (gpu and usable) else _("CPU")))
        combo.setItemText(1, _("CUDA GPU: {gpu}").format(gpu=gpu) if gpu else _("CUDA GPU (none found)"))
        combo.setItemText(2, _("CPU"))

    def updateModelInfo(self) -> None:
        node = self._parameterNode
        if not node:
            return
        info = self.logic.modelInfo(node.model)
        self.ui.modelInfoLabel.text = info["description"]
        low, high = info.get("alphaRange", ALPHA_RANGE)
        self.ui.alphaSliderWidget.minimum = max(ALPHA_RANGE[0], low)
        self.ui.alphaSliderWidget.maximum = min(ALPHA_RANGE[1], high)

    def updateExportButton(self, *args) -> None:
        self.ui.exportSegmentationButton.enabled = self._segmentationToExport() is not None and self._worker is None

    def _segmentationToExport(self):
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        if (
            node is None
            and self._lastSegmentation is not None
            and slicer.mrmlScene.IsNodePresent(self._lastSegmentation)
        ):
            node = self._lastSegmentation
        return node

    # -- actions -------------------------------------------------------------------------------------------------

    def onAlphaDefault(self) -> None:
        self._parameterNode.alpha = self.logic.modelAlpha(self._parameterNode.model)

    def onBrowseModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Choose a DTN weights file"), str(MODELS_DIR), _("Weights (*.safetensors)")
        )
        if path:
            self._parameterNode.model = path
            self.updateModelInfo()
            self.onAlphaDefault()

    def onRegisterButton(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self.ui.registerButton.text = _("Cancelling...")
            self.ui.registerButton.enabled = False
            self._setStatus(_("Cancelling: the current step finishes first..."))
            return
        node = self._parameterNode
        try:
            if not self.logic.ensureDependencies(interactive=True):
                self._setStatus(_("Registration needs PyTorch and the packages listed in requirements.txt."), True)
                return
            outputs = self.logic.outputNodes(node)
            job = self.logic.prepare(
                node.movingVolume,
                node.fixedVolume,
                alpha=node.alpha,
                device=node.device,
                model=node.model or None,
                refine=node.refineSteps,
                affine=node.affine,
                mask_node=node.mask,
                moving_segmentation_node=node.movingSegmentation,
                outputs=outputs,
            )
        except (ValueError, RuntimeError, ImportError, OSError, subprocess.CalledProcessError) as err:
            self._setStatus(str(err), error=True)
            slicer.util.errorDisplay(str(err), windowTitle=_("DTN Registration"))
            return
        self._workerOutputs = outputs
        self._discardWorkerResult = False
        self._worker = RegistrationWorker(job, self.logic.compute)
        self._setRunning(True)
        self._setStatus(_("Starting..."))
        self._worker.start()
        self._pollTimer.start()

    def onPollWorker(self) -> None:
        """Main thread: show progress; when the worker is done, build the nodes or report what happened."""
        worker = self._worker
        if worker is None:
            self._pollTimer.stop()
            return
        fraction, message = worker.progress
        elapsed = time.time() - worker.startTime
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))
        if not worker.cancelRequested:
            self._setStatus(f"{message} ({elapsed:.0f} s)")
        if not worker.isDone():
            return
        self._pollTimer.stop()
        self._worker = None
        self._setRunning(False)
        if self._discardWorkerResult:
            return
        if worker.cancelRequested or self.logic.isCancelled(worker.error):
            self._setStatus(_("Registration cancelled: nothing was added to the scene and the inputs are unchanged."))
            return
        if worker.error is not None:
            logging.error(worker.errorDetails)
            text = _("Registration failed: {error}").format(error=worker.error)
            self._setStatus(text + " " + _("The scene was not changed."), error=True)
            slicer.util.errorDisplay(text, windowTitle=_("DTN Registration"), detailedText=worker.errorDetails)
            return
        try:
            outputs = self.logic.outputNodes(self._parameterNode) if self._parameterNode else self._workerOutputs
            nodes = self.logic.build(worker.job, worker.result, outputs)
        except Exception as err:
            logging.error(traceback.format_exc())
            self._setStatus(_("Could not create the result nodes: {error}").format(error=err), error=True)
            slicer.util.errorDisplay(str(err), windowTitle=_("DTN Registration"), detailedText=traceback.format_exc())
            return
        self.showResults(nodes, worker.result, time.time() - worker.startTime)

    def showResults(self, nodes: dict, result, elapsed: float) -> None:
        """Fixed in the background, warped in the foreground, folding overlay on; a status line."""
        fixed = slicer.mrmlScene.GetNodeByID(nodes["warped"].GetNodeReferenceID("DTNRegistration.fixed") or "")
        slicer.util.setSliceViewerLayers(background=fixed, foreground=nodes["warped"], foregroundOpacity=0.5, fit=True)
        self._lastSegmentation = nodes.get("segmentation")
        self.ui.progressBar.setVisible(False)
        status = self.logic.statusLine(result)
        status += " " + _("(model {name}, alpha {alpha:g}, {elapsed:.1f} s in Slicer)").format(
            name=result.model.get("name", "?"), alpha=result.alpha, elapsed=elapsed
        )
        self._setStatus(status)
        self.updateExportButton()

    def onExportSegmentation(self) -> None:
        segmentation = self._segmentationToExport()
        if segmentation is None:
            return
        directory = slicer.app.defaultScenePath if hasattr(slicer.app, "defaultScenePath") else ""
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(),
            _("Export propagated segmentation"),
            os.path.join(directory, segmentation.GetName() + ".seg.nrrd"),
            _("Segmentation (*.seg.nrrd);;Label map (*.nrrd *.nii.gz *.mha)"),
        )
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.exportSegmentation(segmentation, path, self._parameterNode.fixedVolume)
            self._setStatus(_("Exported to {path}").format(path=written))


#
# DTNRegistrationLogic
#


class DTNRegistrationLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: dependencies, device detection, model metadata, and the engine's MRML logic.

    The registration itself lives in ``DTNRegistrationLib.mrml.RegistrationLogic`` (GUI-free, also usable
    headless with slicer-core); this class hands it the scene and module logics, defaulting to Slicer's own.
    """

    def __init__(self, scene=None, volumesLogic=None, segmentationsLogic=None, transformsLogic=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self._volumesLogic = volumesLogic
        self._segmentationsLogic = segmentationsLogic
        self._transformsLogic = transformsLogic
        self._engine = None

    def getParameterNode(self):
        return DTNRegistrationParameterNode(super().getParameterNode())

    # -- the engine's MRML logic -----------------------------------------------------------------------------------

    @property
    def engine(self):
        """``DTNRegistrationLib.mrml.RegistrationLogic`` on this logic's scene (imported on first use)."""
        if self._engine is None:
            from DTNRegistrationLib import mrml

            modules = getattr(slicer, "modules", None)

            def moduleLogic(given, name):
                if given is not None or modules is None or not hasattr(modules, name):
                    return given
                return getattr(modules, name).logic()

            context = mrml.SceneContext(
                scene=self._scene if self._scene is not None else slicer.mrmlScene,
                volumes_logic=moduleLogic(self._volumesLogic, "volumes"),
                segmentations_logic=moduleLogic(self._segmentationsLogic, "segmentations"),
                transforms_logic=moduleLogic(self._transformsLogic, "transforms"),
            )
            self._engine = mrml.RegistrationLogic(context=context)
        return self._engine

    def prepare(self, movingVolume, fixedVolume, **options):
        """Main thread: validate the selection and read the inputs (see ``mrml.RegistrationLogic.prepare``)."""
        return self.engine.prepare(movingVolume, fixedVolume, **options)

    def compute(self, job, progress=None, cancel=None):
        """Any thread: run the engine on a prepared job (no MRML)."""
        from DTNRegistrationLib import mrml

        return mrml.RegistrationLogic.compute(job, progress=progress, cancel=cancel)

    def build(self, job, result, outputs=None) -> dict:
        """Main thread: create the result nodes."""
        return self.engine.build(job, result, outputs)

    def process(self, movingVolume, fixedVolume, **options) -> dict:
        """Blocking registration (scripts, tests): the created nodes by role; see ``mrml.RegistrationLogic``."""
        return self.engine.process(movingVolume, fixedVolume, **options)

    @staticmethod
    def isCancelled(error) -> bool:
        return error is not None and type(error).__name__ == "Cancelled"

    @staticmethod
    def outputNodes(parameterNode):
        from DTNRegistrationLib import mrml

        def present(node):
            return node if node is not None and slicer.mrmlScene.IsNodePresent(node) else None

        return mrml.OutputNodes(
            transform=present(parameterNode.outputTransform),
            warped=present(parameterNode.outputWarpedVolume),
            jacobian=present(parameterNode.outputJacobian),
            folding=present(parameterNode.outputFolding),
            segmentation=present(parameterNode.outputSegmentation),
        )

    @staticmethod
    def statusLine(result) -> str:
        from DTNRegistrationLib import mrml

        return mrml.status_line(result)

    @staticmethod
    def exportSegmentation(segmentationNode, path: str, referenceVolume=None) -> Path:
        """Write a segmentation as .seg.nrrd, or as a label map on the reference volume's grid."""
        from DTNRegistrationLib import mrml

        reference = mrml.volume_to_image(referenceVolume) if referenceVolume is not None else None
        return mrml.export_segmentation(segmentationNode, path, reference)

    # -- dependencies ------------------------------------------------------------------------------------------------

    @staticmethod
    def torchInstalled() -> bool:
        from DTNRegistrationLib import environment

        return environment.torch_installed()

    @staticmethod
    def missingRequirements() -> list[str]:
        """Requirement lines of requirements.txt that are not installed (or at an unsuitable version)."""
        from DTNRegistrationLib import environment

        return environment.missing_requirements(REQUIREMENTS_FILE)

    def ensureTorch(self, interactive: bool = True) -> bool:
        """PyTorch through the PyTorch extension (its CUDA build where a GPU is found); False if unavailable."""
        if self.torchInstalled():
            return True
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(
                _(
                    "DTN Registration needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
                    "restart Slicer, and click Register again (PyTorch is then installed for you, with CUDA "
                    "where a GPU is found)."
                ),
                windowTitle=_("DTN Registration"),
            )
            return False
        if interactive and not slicer.util.confirmOkCancelDisplay(
            _(
                "DTN Registration needs PyTorch, which is not installed yet. Install it now? "
                "(About 200 MB for the CPU build and several GB for the CUDA build, chosen from the GPU found; "
                "this can take minutes.)"
            ),
            windowTitle=_("DTN Registration"),
        ):
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            slicer.util.errorDisplay(_("PyTorch was not installed."), windowTitle=_("DTN Registration"))
            return False
        return True

    def ensurePythonPackages(self, interactive: bool = True) -> bool:
        """The engine's other packages (requirements.txt), never replacing Slicer's SimpleITK, numpy, scipy."""
        if not self.missingRequirements():
            return True
        from DTNRegistrationLib import environment

        constraints = environment.write_pinning_constraints(BUNDLED_PACKAGES)
        try:
            slicerPackaging = getattr(slicer, "packaging", None)
            if slicerPackaging is not None and hasattr(slicerPackaging, "pip_ensure"):  # Slicer >= 5.12
                requirements = slicerPackaging.load_requirements(str(REQUIREMENTS_FILE))
                slicerPackaging.pip_ensure(
                    requirements,
                    constraints=constraints,
                    prompt_install=interactive,
                    requester="DTN Registration",
                )
            else:
                missing = self.missingRequirements()
                if interactive and not slicer.util.confirmOkCancelDisplay(
                    _("DTN Registration needs these Python packages: {packages}. Install them now?").format(
                        packages=", ".join(missing)
                    ),
                    windowTitle=_("DTN Registration"),
                ):
                    return False
                slicer.util.pip_install(missing + ["-c", constraints])
        except RuntimeError as err:  # the user declined
            logging.info(f"DTN Registration: packages not installed ({err})")
            return False
        finally:
            os.remove(constraints)
        still = self.missingRequirements()
        if still:
            slicer.util.errorDisplay(
                _("These packages could not be installed: {packages}").format(packages=", ".join(still)),
                windowTitle=_("DTN Registration"),
            )
            return False
        return True

    def ensureDependencies(self, interactive: bool = True) -> bool:
        return self.ensureTorch(interactive) and self.ensurePythonPackages(interactive)

    # -- devices ---------------------------------------------------------------------------------------------------

    @staticmethod
    def detectDevices() -> dict:
        """GPUs and whether PyTorch can use them, without importing torch (nvidia-smi and package metadata).

        Returns ``gpus`` (names), ``torch`` (version or None), ``cudaUsable`` and a one-line ``summary``.
        """
        from DTNRegistrationLib import environment

        devices = environment.detect_devices()
        gpus, torchVersion, cudaUsable = devices.gpus, devices.torch_version, devices.cuda_usable
        if gpus and cudaUsable:
            summary = _("GPU: {gpu} (PyTorch {version})").format(gpu=", ".join(gpus), version=torchVersion)
        elif gpus and torchVersion is None:
            summary = _("GPU: {gpu}. PyTorch is not installed yet: it is installed (with CUDA) at the first run.")
            summary = summary.format(gpu=", ".join(gpus))
        elif gpus:
            summary = _(
                "GPU: {gpu}, but the installed PyTorch {version} cannot use it: reinstall PyTorch with CUDA in the "
                "PyTorch Utils module. Running on the CPU."
            ).format(gpu=", ".join(gpus), version=torchVersion)
        else:
            summary = _("No CUDA GPU found: registration runs on the CPU (slower, same results).")
        return {"gpus": gpus, "torch": torchVersion, "cudaUsable": cudaUsable, "summary": summary}

    # -- models ----------------------------------------------------------------------------------------------------

    @staticmethod
    def registry() -> dict:
        from DTNRegistrationLib import environment

        return environment.read_model_registry(MODELS_DIR)

    def shippedModelNames(self) -> list[str]:
        return sorted(self.registry().get("models", {}))

    def modelAlpha(self, model: str = "") -> float:
        """The model's default alpha, kept inside the range the alpha slider accepts."""
        alpha = float(self.modelInfo(model).get("alpha", DEFAULT_ALPHA))
        return min(max(alpha, ALPHA_RANGE[0]), ALPHA_RANGE[1])

    def modelInfo(self, model: str = "") -> dict:
        """What the GUI shows about a model: ``alpha`` (default), ``alphaRange``, ``description``."""
        registry = self.registry()
        name = model or registry.get("default")
        info = {"alpha": DEFAULT_ALPHA, "alphaRange": ALPHA_RANGE, "description": ""}
        if not name:
            info["description"] = _("No shipped model is registered; choose a weights file (.safetensors).")
            return info
        entry = registry.get("models", {}).get(name)
        path = MODELS_DIR / entry["file"] if entry else Path(name)
        if not path.is_file():
            info["description"] = _("Model '{name}' not found (shipped: {names}).").format(
                name=name, names=", ".join(self.shippedModelNames()) or _("none")
            )
            return info
        from DTNRegistrationLib import environment

        try:
            config, extra = environment.weights_config(path)
        except (OSError, ValueError, struct.error) as err:
            info["description"] = _("Cannot read {path}: {error}").format(path=path, error=err)
            return info
        info["alpha"] = float(config.get("alpha", DEFAULT_ALPHA))
        if config.get("alpha_conditioned", True):  # one network for a range of alphas
            info["alphaRange"] = tuple(float(a) for a in config.get("alpha_range", ALPHA_RANGE))
            low, high = info["alphaRange"]
            trained = _("any alpha in {low:g}-{high:g}").format(low=low, high=high)
        else:
            info["alphaRange"] = (info["alpha"], info["alpha"])
            trained = _("trained at alpha {alpha:g}").format(alpha=info["alpha"])
        info["description"] = _("{name}: {variant}, {trained}, {spacing:g} mm grid{sha}").format(
            name=name if entry else path.name,
            variant=config.get("variant", "dtn").upper(),
            trained=trained,
            spacing=float(extra.get("spacing_mm", 2.0)),
            sha=f", sha256 {entry['sha256'][:12]}" if entry and entry.get("sha256") else "",
        )
        return info


#
# DTNRegistrationTest
#


class DTNRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test run inside Slicer (Developer Tools > Reload and Test, or ctest in an extension build)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GeometryRoundTrip()
        self.setUp()
        self.test_RegisterAndCancel()
        self.setUp()
        self.test_WidgetRunsOffTheGuiThread()

    # -- helpers ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _phantomVolumes():
        """Two small volumes with oblique, left-handed IJK-to-RAS and a two-segment segmentation."""
        import numpy as np
        import SimpleITK as sitk  # noqa: N813

        from DTNRegistrationLib import mrml

        def volume(size, angle, flip, origin, shift, name):
            c, s = np.cos(angle), np.sin(angle)
            matrix = np.eye(4)
            matrix[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([1.1, 1.0, 1.2]) @ np.diag(flip)
            matrix[:3, 3] = origin
            k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
            ras = np.stack([i, j, k], -1) @ matrix[:3, :3].T + matrix[:3, 3] + shift
            head = np.exp(-((ras[..., 0] / 13.0) ** 2 + (ras[..., 1] / 15.0) ** 2 + (ras[..., 2] / 12.0) ** 2))
            image = mrml.set_image_geometry(sitk.GetImageFromArray((100 * head).astype(np.float32)), matrix)
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            mrml.update_volume_from_image(node, image)
            node.CreateDefaultDisplayNodes()
            return node, image

        fixed, _ = volume((32, 30, 28), 0.3, (-1, 1, 1), (15.0, -16.0, -17.0), (0, 0, 0), "fixed")
        moving, movingImage = volume((30, 32, 30), -0.2, (1, 1, -1), (-16.0, -15.0, 17.0), (1.5, -1.0, 0.5), "moving")
        array = sitk.GetArrayFromImage(movingImage)
        labels = sitk.GetImageFromArray((array > 30).astype(np.uint16) + (array > 70))
        labels.CopyInformation(movingImage)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "moving segmentation")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(moving)
        mrml.add_segments_from_labels(
            segmentation,
            labels,
            [
                mrml.SegmentInfo(1, "Head", (0.2, 0.8, 0.2), "head"),
                mrml.SegmentInfo(2, "Core", (0.9, 0.9, 0.1), "core"),
            ],
        )
        return moving, fixed, segmentation

    @staticmethod
    def _tinyModel() -> str:
        """A small randomly initialised DTN as a weights file: exercises the pipeline without shipped weights."""
        import torch

        from DTNRegistrationLib import models, network

        cfg = network.DTNConfig(
            enc_channels=(4, 8, 8, 16), q_s=16, q_c=16, dec_channels=(16, 8, 8, 8), heads=2, pos_grid=(2, 2, 2)
        )
        torch.manual_seed(0)
        path = os.path.join(slicer.app.temporaryPath, "DTNRegistrationTest-tiny.safetensors")
        models.save_weights(network.build_model(cfg), path, {"spacing_mm": 2.0})
        return path

    def _needTorch(self):
        if not DTNRegistrationLogic.torchInstalled() or DTNRegistrationLogic.missingRequirements():
            self.skipTest("PyTorch or the packages of requirements.txt are not installed")

    # -- tests -----------------------------------------------------------------------------------------------------

    def test_GeometryRoundTrip(self):
        import numpy as np

        from DTNRegistrationLib import mrml

        self.delayDisplay("Volume node <-> SimpleITK image through IJK-to-RAS")
        moving, fixed, _ = self._phantomVolumes()
        image = mrml.volume_to_image(fixed)
        matrix = vtk.vtkMatrix4x4()
        fixed.GetIJKToRASMatrix(matrix)
        for ijk in [(0, 0, 0), (5, 7, 9), (31, 29, 27)]:
            ras = [sum(matrix.GetElement(r, c) * v for c, v in enumerate([*ijk, 1.0])) for r in range(3)]
            lps = image.TransformIndexToPhysicalPoint(ijk)
            np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-9)
        copy = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
        mrml.update_volume_from_image(copy, image)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(fixed))
        self.delayDisplay("Geometry test passed")

    def test_RegisterAndCancel(self):
        import numpy as np
        import SimpleITK as sitk  # noqa: N813

        self._needTorch()
        from DTNRegistrationLib import mrml, registration

        self.delayDisplay("Registering two small volumes (CPU, tiny model)")
        moving, fixed, segmentation = self._phantomVolumes()
        model = self._tinyModel()
        logic = DTNRegistrationLogic()
        movingBefore = np.array(slicer.util.arrayFromVolume(moving))
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(registration.Cancelled):
            logic.process(moving, fixed, model=model, device="cpu", cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        with self.assertRaises(ValueError):
            logic.process(moving, moving, model=model, device="cpu")
        nodes = logic.process(moving, fixed, model=model, device="cpu", refine=2, moving_segmentation_node=segmentation)
        for role in ("transform", "warped", "jacobian", "folding", "segmentation", "labelmap"):
            self.assertIn(role, nodes)
        result = logic.engine.last_result
        np.testing.assert_array_equal(
            slicer.util.arrayFromVolume(nodes["warped"]), sitk.GetArrayFromImage(result.warped)
        )
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), movingBefore)
        resampled = slicer.modules.volumes.logic().ResampleVolumeToReferenceVolume(moving, fixed)
        self.assertIsNotNone(resampled)
        path = os.path.join(slicer.app.temporaryPath, "DTNRegistrationTest.seg.nrrd")
        logic.exportSegmentation(nodes["segmentation"], path)
        self.assertTrue(os.path.getsize(path) > 0)
        self.assertIn("Folding voxels", mrml.status_line(result))
        self.delayDisplay("Register test passed")

    def test_WidgetRunsOffTheGuiThread(self):
        self._needTorch()
        self.delayDisplay("Register through the module panel (worker thread + progress + Cancel)")
        moving, fixed, segmentation = self._phantomVolumes()
        slicer.util.selectModule("DTNRegistration")
        widget = slicer.modules.DTNRegistrationWidget
        parameters = widget._parameterNode
        parameters.movingVolume = moving
        parameters.fixedVolume = fixed
        parameters.movingSegmentation = segmentation
        parameters.model = self._tinyModel()
        parameters.device = "cpu"
        parameters.refineSteps = 50

        count = slicer.mrmlScene.GetNumberOfNodes()
        widget.onRegisterButton()
        self.assertEqual(widget.ui.registerButton.text, "Cancel")
        widget.onRegisterButton()  # cancel
        self._waitForWorker(widget)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count, "a cancelled run must not add nodes")
        self.assertIn("cancelled", widget.ui.statusLabel.text)

        parameters.refineSteps = 2
        widget.onRegisterButton()
        self._waitForWorker(widget)
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.assertIn("Folding voxels", widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.registerButton.text, "Register")
        self.delayDisplay("Widget test passed")

    def _waitForWorker(self, widget, timeout: float = 300.0):
        start = time.time()
        while widget._worker is not None:
            slicer.app.processEvents()
            time.sleep(0.05)
            self.assertLess(time.time() - start, timeout, "registration did not finish in time")
