# ruff: noqa: N815, UP045
# (N815: Slicer's camelCase parameter names. UP045: the parameter node wrapper needs typing.Optional and
# typing.Union, it does not recognise `X | None`; annotations are evaluated, so no `from __future__`.)
"""DTN Registration: Slicer glue over the DTNRegistrationLib engine (Module, Widget, Logic, Test).

The engine runs in a child process, Slicer's own Python (``PythonSlicer``) running ``DTNRegistrationLib.cli``: a
Python thread in Slicer's process would be starved by the main thread's hold on the GIL. The main thread writes the
inputs, polls the child's progress with a QTimer and builds the result nodes (``DTNRegistrationLib.mrml``).
See docs/slicer.md.
"""

import logging
import os
import time
import unittest
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
# The parameter node's annotations need these before the engine can be imported: literal copies of
# DTNRegistrationLib.options (DEVICE_NAMES, PRESET_NAMES, SIMILARITY_NAMES, DEFAULT_ALPHA, ALPHA_RANGE), which
# Testing/test_module_ui.py checks are equal.
DEVICES = ["auto", "cuda", "cpu"]
PRESETS = ["fast", "accurate", "longitudinal"]
SIMILARITIES = ["auto", "ncc", "ngf", "mind", "l1", "mse"]
DEFAULT_ALPHA = 0.1
ALPHA_RANGE = (0.01, 1.0)
TITLE = "DTN Registration"
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
        self.parent.contributors = ["DTNRegistration developers (DTNRegistration project)"]
        self.parent.helpText = _(
            """
Deformable (diffeomorphic) registration of brain MRI with a Dual Transformer Network (DTN).
<p>A 3D U-Net encodes the moving and the fixed image separately and together; two transformers relate the
two images globally; a decoder predicts a stationary velocity field v, integrated by scaling and squaring into the
deformation exp(v), which is invertible (diffeomorphic). Test-time refinement then optimises the velocity on this
pair (local normalised cross-correlation + alpha times the velocity's smoothness), coarse to fine.</p>
<p><b>Preset</b>: <i>Fast</i> (the default) refines at 4 and 2 mm: seconds on a GPU, about 10 s for a 1 mm brain
on a laptop CPU; pick it for most work and for every interactive check. <i>Accurate</i> adds a level on a 1 mm grid
and keeps the deformation smoother (it fits image noise less): several times slower on a CPU, it aligns the anatomy
more closely; pick it for label propagation and measurements you will report. <i>Longitudinal</i> is for two scans
of the same person: a rigid alignment (no scaling, which would hide a real change of volume) and no network, and
the deformation stays near zero where the images agree, so the Jacobian map shows change, not noise (about as fast
as Fast). Advanced &gt; Custom refinement sets
a number of steps on the 2 mm grid instead (0: the network's prediction alone).</p>
<p><b>Inputs</b>: a moving and a fixed volume (any orientation; an affine initialisation runs first),
optionally a segmentation of the moving volume to propagate, a mask of the fixed volume and, under Advanced, what
the fixed volume lacks (a lesion or resection cavity in the moving volume: left out of the matching, so it does not
drive the deformation). <b>Similarity</b> (Advanced): <i>auto</i> uses local NCC for volumes of one contrast and
normalised gradient fields when the contrasts differ (a T2 or FLAIR against a T1). Volumes are registered
as they appear in the scene: a linear transform they are under is part of the input; a non-linear one must be
hardened first. <b>Smoothness (alpha)</b>: larger gives smoother deformations and fewer folding voxels.
<b>Device</b>: a CUDA GPU makes registration fast; the CPU works everywhere.</p>
<p>Registration runs in a separate process (Slicer's Python): Slicer stays responsive, <b>Cancel</b> stops it at
once, and a failure leaves the scene as it was.</p>
<p><b>Outputs</b>: a grid transform from the moving volume (as it appears in the scene) to the fixed volume, the
warped volume (shown over the fixed one), the Jacobian determinant (with a colour table), the folding voxels
(det J &lt;= 0, red overlay) and the propagated segmentation, which can be exported as .seg.nrrd or a label map.
<b>Show moving volume through the result</b> puts the moving volume under the transform; if it is under a linear
transform L, the volume stays under L and L goes under the result (moving, L, result), so L is kept. Doing this by
hand, move L, not the volume: a volume put directly under the result loses L and is misaligned.</p>
<p>Method: """
            + PAPER
            + """</p>
<p>The same engine as a command line, with Slicer's Python: from the folder holding DTNRegistrationLib
(<code>os.path.dirname(slicer.modules.dtnregistration.path)</code>), run
<code>PythonSlicer -m DTNRegistrationLib.cli register --moving M --fixed F --output-dir D</code>.</p>
"""
        )
        self.parent.acknowledgementText = _(
            """
This extension implements the method of Zhang, Pei and Zha (Peking University), "Learning Dual Transformer
Network for Diffeomorphic Registration", MICCAI 2021. It uses 3D Slicer, PyTorch (through the PyTorch
extension), SimpleITK and safetensors.
"""
        )
        # The bundled sample pair in the Sample Data module once the application has started; and a fix-up of
        # this module's grid transforms in every scene loaded from then on.
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", observeSceneImports)

    def runTest(self, msec=100, **kwargs):
        """Reload and Test: a skipped self-test (no PyTorch yet) is reported as a skip, not as an error."""
        try:
            ScriptedLoadableModule.runTest(self, msec, **kwargs)
        except unittest.SkipTest as skip:
            logging.warning(f"{TITLE} self-test skipped: {skip}")
            slicer.util.delayDisplay(_("Self-test skipped: {reason}").format(reason=skip), msec)


def registerSampleData():
    """Add the bundled sample pair (local files, no download) to the Sample Data module (Slicer 5.6 and later)."""
    import SampleData

    from DTNRegistrationLib.panel import sample_data

    resources = MODULE_DIR / "Resources"
    sample_data.register_samples(
        SampleData.SampleDataLogic, resources / "Samples", resources / "Icons", _("DTN Registration")
    )


def observeSceneImports():
    """Grid transforms read from file come back with cubic interpolation: make this module's linear again."""

    def onEndImport(caller, event):
        transforms = slicer.util.getNodesByClass("vtkMRMLGridTransformNode")
        if any(node.GetAttribute("DTNRegistration.alpha") is not None for node in transforms):
            from DTNRegistrationLib import mrml

            mrml.restore_linear_interpolation(slicer.mrmlScene)

    slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndImportEvent, onEndImport)


#
# Parameter node
#


@parameterNodeWrapper
class DTNRegistrationParameterNode:
    """The module's state, saved with the scene.

    movingVolume, fixedVolume: the images to register (moving onto fixed).
    movingSegmentation: optional segmentation of the moving volume, propagated onto the fixed one.
    alpha: smoothness weight; device: auto, cuda or cpu; model: shipped model name or weights file ("" default).
    preset: refinement schedule, fast (coarse to fine at 4 and 2 mm), accurate (adds a 1 mm level, smoother) or
    longitudinal (same subject: rigid alignment, no network, deformation only where the images differ);
    customRefinement, refineSteps: instead of the preset, this many steps on the 2 mm grid (0: the network alone);
    refineSimilarity: auto (ncc for one contrast, ngf when the contrasts differ), ncc, ngf, mind, l1 or mse;
    affine: affine initialisation; mask: optional fixed-image mask; movingExclusion: optional label map or
    segmentation of what the fixed volume lacks (a lesion, a resection cavity), left out of the similarity.
    output*: nodes to overwrite; None creates new ones named after the inputs.
    """

    movingVolume: vtkMRMLScalarVolumeNode
    fixedVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: Optional[vtkMRMLSegmentationNode]
    alpha: Annotated[float, WithinRange(*ALPHA_RANGE)] = DEFAULT_ALPHA
    device: Annotated[str, Choice(DEVICES)] = "auto"
    model: str = ""
    preset: Annotated[str, Choice(PRESETS)] = "fast"
    customRefinement: bool = False
    refineSteps: Annotated[int, WithinRange(0, 1000)] = 25
    refineSimilarity: Annotated[str, Choice(SIMILARITIES)] = "auto"
    affine: bool = True
    mask: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    movingExclusion: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    outputTransform: Optional[vtkMRMLGridTransformNode]
    outputWarpedVolume: Optional[vtkMRMLScalarVolumeNode]
    outputJacobian: Optional[vtkMRMLScalarVolumeNode]
    outputFolding: Optional[vtkMRMLSegmentationNode]
    outputSegmentation: Optional[vtkMRMLSegmentationNode]


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
        self._run = None  # (job, runner, outputs) while a registration runs
        self._discardRun = False
        self._busy = False  # installing dependencies: the panel is disabled, clicks are ignored
        self._lastNodes = {}
        self._pollTimer = None
        self._deviceTimer = None
        self._gpuQuery = None
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
        self._pollTimer.connect("timeout()", self.onPollRunner)
        self._deviceTimer = qt.QTimer()
        self._deviceTimer.setInterval(200)
        self._deviceTimer.connect("timeout()", self.onPollDevices)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.alphaDefaultButton.connect("clicked()", self.onAlphaDefault)
        self.ui.modelBrowseButton.connect("clicked()", self.onBrowseModel)
        self.ui.modelLineEdit.connect("editingFinished()", self.updateModelInfo)
        self.ui.exportSegmentationButton.connect("clicked()", self.onExportSegmentation)
        self.ui.placeMovingButton.connect("clicked()", self.onPlaceMoving)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateResultButtons)

        from DTNRegistrationLib.panel import model_info

        # The line edit owns the completer: without a Qt parent PythonQt deletes it with its Python wrapper.
        completer = qt.QCompleter(model_info.shipped_names(), self.ui.modelLineEdit)
        self.ui.modelLineEdit.setCompleter(completer)

        self.initializeParameterNode()
        # nvidia-smi runs in the background (it can take seconds); a timer picks up its answer.
        qt.QTimer.singleShot(0, self.startDeviceQuery)

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed: the child must not outlive it."""
        if self._run is not None:
            self._discardRun = True
            runner = self._run[1]
            runner.cancel()
            runner.wait(timeout=5)
        for timer in (self._pollTimer, self._deviceTimer):
            if timer is not None:
                timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGuiState)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:  # the scene goes away: whatever the engine returns is dropped
            self._discardRun = True
            self._run[1].cancel()
        self._lastNodes = {}
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        from DTNRegistrationLib.panel import model_info, sample_data

        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if not node.fixedVolume and not node.movingVolume:
            volumes = [
                volume
                for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not volume.IsA("vtkMRMLLabelMapVolumeNode")
            ]
            moving, fixed = sample_data.default_volumes(volumes)
            if fixed is not None:
                node.fixedVolume = fixed
            if moving is not None:
                node.movingVolume = moving
        raw = node.parameterNode
        if raw.GetAttribute("DTNRegistration.alphaFromModel") != "1":
            raw.SetAttribute("DTNRegistration.alphaFromModel", "1")
            node.alpha = model_info.describe(model=node.model).clamped_alpha(ALPHA_RANGE)
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
        if self._run is not None or self._busy:
            return
        node = self._parameterNode
        if not node or not node.movingVolume or not node.fixedVolume:
            enabled, tip = False, _("Select a moving and a fixed volume.")
        elif node.movingVolume == node.fixedVolume:
            enabled, tip = False, _("The moving and the fixed volume must be different volumes.")
        else:
            enabled, tip = True, _("Register the moving volume onto the fixed volume.")
        self.ui.registerButton.enabled = enabled
        self.ui.registerButton.toolTip = tip
        self.updateResultButtons()

    def _setPanelEnabled(self, enabled: bool) -> None:
        for widget in (
            self.ui.inputsCollapsibleButton,
            self.ui.registrationCollapsibleButton,
            self.ui.advancedCollapsibleButton,
            self.ui.outputsCollapsibleButton,
        ):
            widget.enabled = enabled

    def _setRunning(self, running: bool) -> None:
        self._setPanelEnabled(not running)
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

    def startDeviceQuery(self) -> None:
        from DTNRegistrationLib.panel import environment

        self._gpuQuery = environment.GpuQuery()
        self._deviceTimer.start()
        self.onPollDevices()

    def onPollDevices(self) -> None:
        from DTNRegistrationLib.panel import environment

        gpus = self._gpuQuery.poll() if self._gpuQuery is not None else None
        if gpus is None:
            return
        self._deviceTimer.stop()
        self._devices = environment.detect_devices(gpus)
        self.ui.deviceInfoLabel.text = self._devices.summary()
        self._decorateDeviceItems()

    def _decorateDeviceItems(self) -> None:
        """Name the detected GPU in the device choices (the items keep their order: auto, cuda, cpu)."""
        devices = self._devices
        combo = self.ui.deviceComboBox
        if devices is None or combo.count != len(DEVICES):
            return
        gpu = devices.gpus[0] if devices.gpus else None
        combo.setItemText(
            0, _("Automatic ({device})").format(device=gpu if (gpu and devices.cuda_usable) else _("CPU"))
        )
        combo.setItemText(1, _("CUDA GPU: {gpu}").format(gpu=gpu) if gpu else _("CUDA GPU (none found)"))
        combo.setItemText(2, _("CPU"))

    def updateModelInfo(self) -> None:
        from DTNRegistrationLib.panel import model_info

        node = self._parameterNode
        if not node:
            return
        info = model_info.describe(model=node.model)
        self.ui.modelInfoLabel.text = info.description()
        low, high = info.alpha_range
        self.ui.alphaSliderWidget.minimum = max(ALPHA_RANGE[0], low)
        self.ui.alphaSliderWidget.maximum = min(ALPHA_RANGE[1], high)

    def updateResultButtons(self, *args) -> None:
        idle = self._run is None and not self._busy
        self.ui.exportSegmentationButton.enabled = idle and self._segmentationToExport() is not None
        self.ui.placeMovingButton.enabled = idle and self._present(self._lastNodes.get("transform")) is not None

    @staticmethod
    def _present(node):
        return node if node is not None and slicer.mrmlScene.IsNodePresent(node) else None

    def _segmentationToExport(self):
        node = self._parameterNode.outputSegmentation if self._parameterNode else None
        return node or self._present(self._lastNodes.get("segmentation"))

    # -- actions -------------------------------------------------------------------------------------------------

    def onAlphaDefault(self) -> None:
        from DTNRegistrationLib.panel import model_info

        self._parameterNode.alpha = model_info.describe(model=self._parameterNode.model).clamped_alpha()

    def onBrowseModel(self) -> None:
        from DTNRegistrationLib.core.model_registry import MODELS_DIR

        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Choose a DTN weights file"), str(MODELS_DIR), _("Weights (*.safetensors)")
        )
        if path:
            self._parameterNode.model = path
            self.updateModelInfo()
            self.onAlphaDefault()

    def onRegisterButton(self) -> None:
        if self._busy:  # a click that arrived while pip ran (its output processes events)
            return
        if self._run is not None:
            self._run[1].cancel()
            self.ui.registerButton.text = _("Cancelling...")
            self.ui.registerButton.enabled = False
            self._setStatus(_("Cancelling..."))
            return
        if not self.ensureDependencies():
            return
        node = self._parameterNode
        try:
            outputs = self.logic.outputNodes(node)
            job, runner = self.logic.startRegistration(node, outputs)
        except (ValueError, RuntimeError, OSError) as err:
            self._setStatus(str(err), error=True)
            slicer.util.errorDisplay(str(err), windowTitle=TITLE)
            return
        self._run = (job, runner, outputs)
        self._discardRun = False
        self._setRunning(True)
        self._setStatus(_("Starting..."))
        self._pollTimer.start()

    def onPollRunner(self) -> None:
        """Main thread: show progress; when the child has ended, build the nodes or report what happened."""
        if self._run is None:
            self._pollTimer.stop()
            return
        job, runner, outputs = self._run
        state = runner.poll()
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, state.fraction))))
        if not state.done:
            self._setStatus(f"{state.message} ({state.elapsed_s:.0f} s)")
            return
        self._pollTimer.stop()
        self._run = None
        self._setRunning(False)
        if self._discardRun:
            return
        from DTNRegistrationLib import errors

        if isinstance(state.error, errors.Cancelled):
            self._setStatus(_("Registration cancelled: nothing was added to the scene and the inputs are unchanged."))
            return
        if state.error is not None:
            self._reportFailure(state.error, getattr(state.error, "details", ""))
            return
        try:
            nodes = self.logic.finishRegistration(job, state.result, outputs)
        except Exception as err:
            import traceback

            self._reportFailure(err, traceback.format_exc())
            return
        self.showResults(nodes, state)

    def _reportFailure(self, error: BaseException, details: str) -> None:
        """One line in the status and a message box; the details (the child's log) go to Slicer's log."""
        if details:
            logging.error(f"{TITLE}: {error}\n{details}")
        text = _("Registration failed: {error}").format(error=error)
        self._setStatus(text + " " + _("The scene was not changed."), error=True)
        slicer.util.errorDisplay(text, windowTitle=TITLE, detailedText=details or None)

    def showResults(self, nodes: dict, state) -> None:
        """Fixed in the background, warped in the foreground, folding overlay on; a status line."""
        from DTNRegistrationLib import mrml

        fixed = slicer.mrmlScene.GetNodeByID(nodes["warped"].GetNodeReferenceID("DTNRegistration.fixed") or "")
        slicer.util.setSliceViewerLayers(background=fixed, foreground=nodes["warped"], foregroundOpacity=0.5, fit=True)
        self._lastNodes = dict(nodes)
        result = state.result
        status = (
            mrml.status_line(result)
            + " "
            + _("(model {name}, alpha {alpha:g}, {elapsed:.1f} s in Slicer)").format(
                name=result.model.get("name", "?"), alpha=result.alpha, elapsed=state.elapsed_s
            )
        )
        self._setStatus(status)
        self.updateResultButtons()

    def onPlaceMoving(self) -> None:
        from DTNRegistrationLib import mrml

        transform = self._present(self._lastNodes.get("transform"))
        moving = slicer.mrmlScene.GetNodeByID(transform.GetNodeReferenceID("DTNRegistration.moving") or "")
        with slicer.util.tryWithErrorDisplay(_("Could not show the moving volume through the result.")):
            self._setStatus(mrml.place_under_transform(moving, transform))

    def onExportSegmentation(self) -> None:
        from DTNRegistrationLib import mrml

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
            fixed = self._parameterNode.fixedVolume
            reference = mrml.volume_to_image(fixed) if fixed is not None else None
            written = mrml.export_segmentation(segmentation, path, reference)
            self._setStatus(_("Exported to {path}").format(path=written))

    # -- dependencies (the Widget asks; the library installs) ------------------------------------------------------

    def ensureDependencies(self) -> bool:
        """PyTorch (new enough) and requirements.txt; asks before installing. The panel is disabled meanwhile."""
        from DTNRegistrationLib import errors
        from DTNRegistrationLib.mrml import dependencies

        needs = dependencies.needs(REQUIREMENTS_FILE)
        if needs.nothing:
            return True
        parts = []
        if needs.torch.version is None:
            parts.append(_("PyTorch (about 200 MB for the CPU build, several GB for the CUDA build)"))
        elif not needs.torch.ok:
            parts.append(
                _("a newer PyTorch: {version} is installed, {required} or newer is needed").format(
                    version=needs.torch.version, required=needs.torch.required
                )
            )
        if needs.packages:
            parts.append(", ".join(needs.packages))
        question = _("DTN Registration needs {what}. Install now? (This can take minutes.)").format(
            what=_(" and ").join(parts)
        )
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle=TITLE):
            self._setStatus(_("Registration needs PyTorch and the packages listed in requirements.txt."), error=True)
            return False
        self._busy = True
        self._setPanelEnabled(False)
        self.ui.registerButton.enabled = False
        self._setStatus(_("Installing Python packages..."))
        try:
            with slicer.util.WaitCursor():
                if not needs.torch.ok:
                    dependencies.install_torch()
                dependencies.install_packages(REQUIREMENTS_FILE)
        except errors.DependencyError as err:
            self._setStatus(str(err), error=True)
            slicer.util.errorDisplay(str(err), windowTitle=TITLE)
            return False
        finally:
            self._busy = False  # installing dependencies: the panel is disabled, clicks are ignored
            self._setPanelEnabled(True)
            self._updateGuiState()
        self._setStatus(_("Packages installed."))
        return True


#
# DTNRegistrationLogic
#


class DTNRegistrationLogic(ScriptedLoadableModuleLogic):
    """The parameter node -> a registration in a child process -> result nodes. No GUI, no dialogs.

    The work itself is ``DTNRegistrationLib.mrml`` (RegistrationLogic prepares and builds, RegistrationRunner runs
    the engine in a child process); this class hands it the scene and module logics, Slicer's own by default.
    """

    def __init__(self, scene=None, volumesLogic=None, segmentationsLogic=None, transformsLogic=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._given = (scene, volumesLogic, segmentationsLogic, transformsLogic)
        self._engine = None

    def getParameterNode(self):
        return DTNRegistrationParameterNode(super().getParameterNode())

    @property
    def engine(self):
        """``DTNRegistrationLib.mrml.RegistrationLogic`` on this logic's scene (imported on first use)."""
        if self._engine is None:
            from DTNRegistrationLib import mrml

            scene, volumes, segmentations, transforms = self._given
            context = mrml.app_context(
                scene, volumes_logic=volumes, segmentations_logic=segmentations, transforms_logic=transforms
            )
            self._engine = mrml.RegistrationLogic(context=context)
        return self._engine

    def outputNodes(self, parameterNode):
        """The output selectors' nodes that are still in the scene (None: create a new node)."""
        from DTNRegistrationLib import mrml

        selected = mrml.OutputNodes(
            transform=parameterNode.outputTransform,
            warped=parameterNode.outputWarpedVolume,
            jacobian=parameterNode.outputJacobian,
            folding=parameterNode.outputFolding,
            segmentation=parameterNode.outputSegmentation,
        )
        return selected.present_in(self.engine.scene)

    def startRegistration(self, parameterNode, outputs=None, **runnerOptions):
        """Read the selected nodes (main thread) and start the engine's child process; returns (job, runner).

        Raises ``ValueError`` for a selection that cannot be registered. Poll ``runner.poll()`` until ``done``.
        """
        from DTNRegistrationLib import mrml

        job = self.engine.prepare(
            parameterNode.movingVolume,
            parameterNode.fixedVolume,
            alpha=parameterNode.alpha,
            device=parameterNode.device,
            model=parameterNode.model or None,
            refine=parameterNode.refineSteps if parameterNode.customRefinement else None,
            preset=parameterNode.preset,
            refine_similarity=parameterNode.refineSimilarity,
            affine=parameterNode.affine,
            mask_node=parameterNode.mask,
            moving_exclusion_node=parameterNode.movingExclusion,
            moving_segmentation_node=parameterNode.movingSegmentation,
            outputs=outputs,
        )
        app = getattr(slicer, "app", None)
        runnerOptions.setdefault("temp_root", app.temporaryPath if app is not None else None)
        runner = mrml.RegistrationRunner(job, **runnerOptions)
        runner.start()
        return job, runner

    def finishRegistration(self, job, result, outputs=None) -> dict:
        """Main thread: the result nodes by role (outputs that left the scene meanwhile are created anew)."""
        outputs = outputs.present_in(self.engine.scene) if outputs is not None else None
        return self.engine.build(job, result, outputs)


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
        self.test_LogicRegistersInChildProcessAndCancels()
        self.setUp()
        self.test_WidgetRegistersAndCancels()

    # -- helpers ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _phantomVolumes():
        """Two small volumes with oblique, left-handed IJK-to-RAS, and a two-segment segmentation of the moving one."""
        from DTNRegistrationLib import mrml
        from DTNRegistrationLib.mrml import phantoms

        moving, fixed, segmentation, _labels = phantoms.make_test_volumes(mrml.app_context())
        return moving, fixed, segmentation

    @staticmethod
    def _tinyModel() -> str:
        """A small randomly initialised DTN as a weights file: exercises the pipeline without shipped weights."""
        from DTNRegistrationLib.mrml import phantoms

        path = Path(slicer.app.temporaryPath) / "DTNRegistrationTest-tiny.safetensors"
        return str(phantoms.write_tiny_model(path))

    def _needTorch(self):
        from DTNRegistrationLib.mrml import dependencies

        if not dependencies.needs(REQUIREMENTS_FILE).nothing:
            self.skipTest("PyTorch (new enough) or the packages of requirements.txt are not installed")

    def _parameters(self, logic, moving, fixed, segmentation, refine):
        parameters = logic.getParameterNode()
        parameters.movingVolume, parameters.fixedVolume = moving, fixed
        parameters.movingSegmentation = segmentation
        parameters.model = self._tinyModel()
        parameters.device = "cpu"
        parameters.customRefinement = True  # refineSteps counts only with it; else the preset runs
        parameters.refineSteps = refine
        return parameters

    def _poll(self, runner, until, timeout: float = 300.0):
        start = time.time()
        while not until(runner.poll()):
            slicer.app.processEvents()
            time.sleep(0.05)
            self.assertLess(time.time() - start, timeout, "registration did not finish in time")
        return runner.state

    def _pollUntilRefining(self, runner):
        state = self._poll(runner, lambda state: state.done or state.message.startswith("refining: step"))
        self.assertFalse(state.done, f"the child ended before refining: {state.error}")

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

    def test_LogicRegistersInChildProcessAndCancels(self):
        import numpy as np

        from DTNRegistrationLib import errors, mrml

        self._needTorch()
        self.delayDisplay("Registering two small volumes in PythonSlicer (CPU, tiny model), then cancelling one")
        moving, fixed, segmentation = self._phantomVolumes()
        logic = DTNRegistrationLogic()
        movingBefore = np.array(slicer.util.arrayFromVolume(moving))
        parameters = self._parameters(logic, moving, fixed, segmentation, refine=500)
        count = slicer.mrmlScene.GetNumberOfNodes()
        job, runner = logic.startRegistration(parameters)
        self.assertEqual(job.options.refine, 500)
        self._pollUntilRefining(runner)
        self.assertIn("/500,", runner.state.message, "the child must run the custom step count")
        start = time.time()
        runner.cancel()
        state = self._poll(runner, lambda state: state.done, timeout=10)
        self.assertLess(time.time() - start, 2.0, "Cancel must stop the child within 2 s")
        self.assertIsInstance(state.error, errors.Cancelled)
        self.assertFalse(runner.folder.exists())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

        parameters.refineSteps = 2
        job, runner = logic.startRegistration(parameters)
        state = self._poll(runner, lambda state: state.done)
        self.assertIsNone(state.error, getattr(state.error, "details", ""))
        self.assertEqual(state.result.metrics.get("refine_steps"), 2, "the report records the steps run")
        nodes = logic.finishRegistration(job, state.result)
        for role in ("transform", "warped", "jacobian", "folding", "segmentation", "labelmap"):
            self.assertIn(role, nodes)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(moving), movingBefore)
        self.assertIn("Folding voxels", mrml.status_line(state.result))
        path = os.path.join(slicer.app.temporaryPath, "DTNRegistrationTest.seg.nrrd")
        mrml.export_segmentation(nodes["segmentation"], path)
        self.assertTrue(os.path.getsize(path) > 0)
        self.delayDisplay("Logic test passed")

    def test_WidgetRegistersAndCancels(self):
        self._needTorch()
        self.delayDisplay("Register through the module panel (child process, progress, Cancel)")
        moving, fixed, segmentation = self._phantomVolumes()
        slicer.util.selectModule("DTNRegistration")
        widget = slicer.modules.DTNRegistrationWidget
        self._parameters(widget.logic, moving, fixed, segmentation, refine=500)
        count = slicer.mrmlScene.GetNumberOfNodes()

        widget.onRegisterButton()
        self.assertEqual(widget.ui.registerButton.text, "Cancel")
        self._pollUntilRefining(widget._run[1])
        widget.onRegisterButton()  # Cancel
        self._waitForWidget(widget, timeout=10)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count, "a cancelled run must not add nodes")
        self.assertIn("cancelled", widget.ui.statusLabel.text)

        widget._parameterNode.refineSteps = 2
        widget.onRegisterButton()
        self._waitForWidget(widget)
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.assertIn("Folding voxels", widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.registerButton.text, "Register")
        self.delayDisplay("Widget test passed")

    def _waitForWidget(self, widget, timeout: float = 300.0):
        start = time.time()
        while widget._run is not None:
            slicer.app.processEvents()  # the panel's QTimer polls the child
            time.sleep(0.05)
            self.assertLess(time.time() - start, timeout, "registration did not finish in time")
