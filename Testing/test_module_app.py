"""The module file's code run headless: real MRML (slicer-core), real child processes, stand-ins for the app.

What only the Slicer application would show (issue 10), each caught here: Sample Data on 5.6 and 5.12, a skipped
self-test under Reload and Test, the default volumes, installs that disable the panel and ignore clicks, the torch
version check, nvidia-smi off the GUI path, and the panel's Register, Cancel and result path through the child
process. See slicer_app_standins.py for what is stood in and why.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
import types
import unittest
from pathlib import Path

import pytest

try:
    import slicer
except ImportError as err:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"SKIPPING THE MODULE TESTS: `import slicer` failed ({err}). Install slicer-core (Python >= 3.10).",
        allow_module_level=True,
    )

import slicer_app_standins as standins
import slicer_scene as ss

from DTNRegistrationLib import errors
from DTNRegistrationLib.core import models
from DTNRegistrationLib.mrml import dependencies
from DTNRegistrationLib.panel import environment, sample_data

ROOT = Path(__file__).resolve().parents[1]
PANEL = [
    "inputsCollapsibleButton",
    "registrationCollapsibleButton",
    "advancedCollapsibleButton",
    "outputsCollapsibleButton",
    "registerButton",
    "progressBar",
    "statusLabel",
    "deviceInfoLabel",
    "deviceComboBox",
    "modelInfoLabel",
    "modelLineEdit",
    "alphaSliderWidget",
    "exportSegmentationButton",
    "placeMovingButton",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(ss.write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.safetensors"))


@pytest.fixture
def launcher_on_path(tmp_path, monkeypatch):
    """``PythonSlicer`` on PATH, as Slicer puts it there: a launcher that starts this Python as its child."""
    folder = tmp_path / "bin"
    folder.mkdir()
    launcher = folder / "PythonSlicer"
    launcher.write_text(f'#!/bin/sh\n"{sys.executable}" "$@"\n')
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{__import__('os').environ['PATH']}")
    return launcher


@pytest.fixture
def module(monkeypatch, tmp_path, launcher_on_path):
    context = ss.headless_scene()
    loaded = standins.load_module(monkeypatch, context, tmp_path)
    loaded.context = context
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kwargs: None)
    return loaded


def make_widget(module, monkeypatch):
    """The panel without Qt: the module's Widget class over recording widgets, on the real scene."""
    widget = module.DTNRegistrationWidget()
    widget.ui = standins.fake_ui(PANEL)
    widget.logic = module.DTNRegistrationLogic()
    widget._pollTimer = standins.FakeQt().QTimer()
    widget.setParameterNode(widget.logic.getParameterNode())
    dialogs = types.SimpleNamespace(questions=[], errors=[])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **k: dialogs.questions.append(text) or True)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **k: dialogs.errors.append(text))
    return widget, dialogs


def nothing_needed(monkeypatch):
    monkeypatch.setattr(dependencies, "needs", lambda _file: dependencies.Needs(environment.TorchStatus("2.5.0")))


# ----------------------------------------------------------------------------------------------------------------
# Module description, Sample Data, Reload and Test
# ----------------------------------------------------------------------------------------------------------------


def test_module_description(module):
    parent = types.SimpleNamespace()
    module.DTNRegistration(parent)
    for person in parent.contributors:
        assert re.fullmatch(r"[^()]+ \([^()]+\)", person), f"{person!r}: use 'First Last (Organisation)'"
    assert "PythonSlicer -m DTNRegistrationLib.cli register" in parent.helpText
    assert "dtnreg register" not in parent.helpText, "Slicer puts no dtnreg on PATH"
    assert "L goes under the result" in parent.helpText
    slots = [slot for signal, slot in module.standins.app.connections if signal == "startupCompleted()"]
    assert module.registerSampleData in slots


@pytest.mark.parametrize("version", ["5.6", "5.12"])
def test_sample_data_registers_on_every_supported_slicer(monkeypatch, tmp_path, version):
    stand_in = standins.sample_data_5_6() if version == "5.6" else standins.sample_data_5_12()
    module = standins.load_module(monkeypatch, ss.headless_scene(), tmp_path, sample_data=stand_in)
    module.registerSampleData()  # the startupCompleted() slot: must not raise, must register both samples
    logic = stand_in.SampleDataLogic
    assert [name for _category, name, *_ in logic.sources] == ["DTN moving: ITK head", "DTN fixed: ICBM 2009a"]
    for category, _name, uris, nodes, types_ in logic.sources:
        assert category == "DTNRegistration" and all(uri.startswith("file://") for uri in uris)
        assert types_ == ["VolumeFile", "SegmentationFile"] and len(nodes) == 2
    assert logic.sources[0][3][0] == sample_data.MOVING_NODE and logic.sources[1][3][0] == sample_data.FIXED_NODE
    if version == "5.6":  # what the module used to pass, refused by 5.6 (the stand-in has 5.6's signature)
        assert not hasattr(logic, "registerCustomSampleDataCategory")
        with pytest.raises(TypeError):
            logic.registerCustomSampleDataSource(sampleName="x", uris=["u"], loadFileTypes=["VolumeFile"])
    else:
        assert logic.categories == {"DTNRegistration": "DTN Registration"}


def test_reload_and_test_reports_a_skipped_self_test_as_a_skip(module, monkeypatch):
    """Without PyTorch the self-test skips: Reload and Test (the Module's runTest) must not raise, and says so."""
    missing = dependencies.Needs(environment.TorchStatus(None))
    monkeypatch.setattr(dependencies, "needs", lambda _file: missing)
    slicer_module = module.DTNRegistration(types.SimpleNamespace())
    with pytest.raises(unittest.SkipTest):  # Slicer's own runTest lets the skip through to its error popup
        module.ScriptedLoadableModule.runTest(slicer_module)
    slicer_module.runTest(msec=0)  # the module's: reported, not raised
    assert any(message.startswith("Self-test skipped") for message in module.standins.messages)

    def failing(self):
        raise AssertionError("a real failure")

    monkeypatch.setattr(module.DTNRegistrationTest, "test_GeometryRoundTrip", failing)
    with pytest.raises(AssertionError, match="a real failure"):  # failures still fail
        slicer_module.runTest(msec=0)


def test_self_test_logic_part_runs_headless_through_pythonslicer(module, launcher_on_path):
    """The self-test's Logic test as Slicer runs it: PythonSlicer found on PATH, a launcher, cancel, then a result."""
    import shutil

    from DTNRegistrationLib.mrml import runner

    assert runner.child_python() == shutil.which("PythonSlicer") == str(launcher_on_path), "the app's child Python"
    test = module.DTNRegistrationTest()
    test.setUp()
    test.test_LogicRegistersInChildProcessAndCancels()
    assert "Logic test passed" in test.messages


# ----------------------------------------------------------------------------------------------------------------
# The panel: defaults, installs, Register / Cancel / results
# ----------------------------------------------------------------------------------------------------------------


def test_default_volumes_follow_the_sample_names_not_the_load_order(module, monkeypatch):
    scene = module.context.scene
    for name in (sample_data.MOVING_NODE, sample_data.FIXED_NODE):  # the order Sample Data lists them
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    widget, _ = make_widget(module, monkeypatch)
    widget.initializeParameterNode()
    assert widget._parameterNode.movingVolume.GetName() == sample_data.MOVING_NODE
    assert widget._parameterNode.fixedVolume.GetName() == sample_data.FIXED_NODE


def test_default_volumes_leave_moving_unset_for_other_volumes(module, monkeypatch):
    scene = module.context.scene
    first = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "first")
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "second")
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    widget, _ = make_widget(module, monkeypatch)
    widget.initializeParameterNode()
    assert widget._parameterNode.movingVolume is None and widget._parameterNode.fixedVolume is first
    assert not widget.ui.registerButton.enabled


def test_installs_disable_the_panel_and_ignore_a_second_click(module, monkeypatch):
    """pip's output processes events: a click meanwhile must not start a nested install or a registration."""
    old_torch = dependencies.Needs(environment.TorchStatus("2.0.1"), ["safetensors>=0.4,<1"])
    monkeypatch.setattr(dependencies, "needs", lambda _file: old_torch)
    widget, dialogs = make_widget(module, monkeypatch)
    seen = []

    def install_torch():
        seen.append({name: getattr(widget.ui, name).enabled for name in PANEL[:5]})
        widget.onRegisterButton()  # the user clicks Register again while pip runs
        return "2.1.0"

    monkeypatch.setattr(dependencies, "install_torch", install_torch)
    monkeypatch.setattr(dependencies, "install_packages", lambda _file: seen.append("packages"))
    assert widget.ensureDependencies()
    assert len(dialogs.questions) == 1 and "2.0.1 is installed, 2.1 or newer is needed" in dialogs.questions[0]
    assert seen == [dict.fromkeys(PANEL[:5], False), "packages"], "one install, the panel disabled meanwhile"
    assert widget._run is None and not widget._busy
    assert widget.ui.inputsCollapsibleButton.enabled and widget.ui.outputsCollapsibleButton.enabled


def test_a_failed_install_is_reported_and_the_panel_is_ready_again(module, monkeypatch):
    monkeypatch.setattr(dependencies, "needs", lambda _file: dependencies.Needs(environment.TorchStatus(None)))
    widget, dialogs = make_widget(module, monkeypatch)

    def no_extension():
        raise errors.DependencyError("DTN Registration needs the 'PyTorch' extension")

    monkeypatch.setattr(dependencies, "install_torch", no_extension)
    assert not widget.ensureDependencies()
    assert dialogs.errors == ["DTN Registration needs the 'PyTorch' extension"]
    assert widget.ui.registrationCollapsibleButton.enabled and not widget._busy


def poll_widget(widget, until, timeout=120.0):
    start = time.perf_counter()
    while not until():
        widget.onPollRunner()  # the QTimer's slot
        time.sleep(0.05)
        assert time.perf_counter() - start < timeout, widget.ui.statusLabel.text


def option_value(command, name):
    """The value after ``name`` on a command line (None when the option is absent)."""
    return command[command.index(name) + 1] if name in command else None


def test_panel_registers_cancels_and_shows_results_through_the_child(module, monkeypatch, tiny_model):
    nothing_needed(monkeypatch)
    context = module.context
    moving, fixed, segmentation, _ = ss.make_test_volumes(context)
    linear = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "L")
    moving.SetAndObserveTransformNodeID(linear.GetID())
    widget, dialogs = make_widget(module, monkeypatch)
    node = widget._parameterNode
    node.movingVolume, node.fixedVolume, node.movingSegmentation = moving, fixed, segmentation
    # Custom refinement: refineSteps counts only with customRefinement on (else the preset runs). 500 steps keep
    # the child busy well past the moment Cancel is clicked.
    node.model, node.device, node.customRefinement, node.refineSteps = tiny_model, "cpu", True, 500
    before = ss.node_ids(context.scene)

    widget.onRegisterButton()
    assert widget.ui.registerButton.text == "Cancel" and not widget.ui.inputsCollapsibleButton.enabled
    command = list(widget._run[1].process.args)
    assert option_value(command, "--refine") == "500" and "--preset" not in command, command
    poll_widget(widget, lambda: widget.ui.statusLabel.text.startswith("refining: step"))
    assert "/500," in widget.ui.statusLabel.text, widget.ui.statusLabel.text  # the child runs the custom count
    start = time.perf_counter()
    widget.onRegisterButton()  # Cancel
    poll_widget(widget, lambda: widget._run is None, timeout=5)
    assert time.perf_counter() - start < 2.0
    assert "cancelled" in widget.ui.statusLabel.text and ss.node_ids(context.scene) == before
    assert widget.ui.registerButton.text == "Register" and widget.ui.inputsCollapsibleButton.enabled

    node.refineSteps = 2
    widget.onRegisterButton()
    runner = widget._run[1]
    assert option_value(list(runner.process.args), "--refine") == "2"
    poll_widget(widget, lambda: widget._run is None)
    assert "Folding voxels" in widget.ui.statusLabel.text, widget.ui.statusLabel.text
    report = runner.state.result.metrics  # report.json's "metrics": what the child actually ran
    assert report["refine_steps"] == 2 and report["refine_levels_mm"] == [2.0] and report["preset"] is None, report
    assert not dialogs.errors and widget.ui.placeMovingButton.enabled and widget.ui.exportSegmentationButton.enabled
    transform = widget._lastNodes["transform"]
    widget.onPlaceMoving()
    assert moving.GetParentTransformNode() is linear and linear.GetParentTransformNode() is transform
    assert "keeps it" in widget.ui.statusLabel.text


def test_panel_reports_a_failing_child_in_one_line(module, monkeypatch, tmp_path):
    nothing_needed(monkeypatch)
    context = module.context
    moving, fixed, _, _ = ss.make_test_volumes(context)
    widget, dialogs = make_widget(module, monkeypatch)
    node = widget._parameterNode
    node.movingVolume, node.fixedVolume = moving, fixed
    node.model, node.device = str(tmp_path / "missing.safetensors"), "cpu"
    before = ss.node_ids(context.scene)
    widget.onRegisterButton()
    poll_widget(widget, lambda: widget._run is None)
    assert len(dialogs.errors) == 1 and "missing.safetensors" in dialogs.errors[0] and "\n" not in dialogs.errors[0]
    assert "The scene was not changed" in widget.ui.statusLabel.text and ss.node_ids(context.scene) == before
    assert widget.ui.registerButton.enabled and widget.ui.registerButton.text == "Register"


def test_completer_gets_the_line_edit_as_parent(module, monkeypatch):
    """setup() needs the .ui; the completer is what it makes in Python, so check that it would have a parent."""
    widget, _ = make_widget(module, monkeypatch)
    qt = module.standins.qt
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: types.SimpleNamespace(setMRMLScene=lambda scene: None))
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda ui: widget.ui)
    widget.resourcePath = lambda name: name
    widget.layout = types.SimpleNamespace(addWidget=lambda w: None)
    widget.ui.alphaDefaultButton = widget.ui.modelBrowseButton = standins.FakeWidget()
    widget.ui.outputSegmentationSelector = standins.FakeWidget()
    widget.setup()
    try:
        assert qt.completers and all(completer.parent is widget.ui.modelLineEdit for completer in qt.completers)
        assert models.registry()["default"] in qt.completers[0].items
    finally:
        widget.cleanup()  # the scene observers go with the panel


# ----------------------------------------------------------------------------------------------------------------
# Dependencies and devices (library code, no stand-ins)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        (None, False),
        ("2.0.1", False),
        ("1.13.1+cu117", False),
        ("2.1.0", True),
        ("2.10.0+cpu", True),
        ("2.1.0a0", True),
    ],
)
def test_torch_version_check(version, ok):
    assert environment.TorchStatus(version).ok is ok


def test_torch_requirement_matches_pyproject():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"torch{environment.TORCH_REQUIREMENT}"' in pyproject


def test_install_torch_asks_the_pytorch_extension_for_the_engine_requirement(monkeypatch):
    calls = []
    versions = iter(["2.0.1", "2.3.0"])

    class PyTorchUtilsLogic:
        def installTorch(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    monkeypatch.setattr(environment, "installed_version", lambda name: next(versions))
    with pytest.raises(errors.DependencyError, match="2.0.1 is installed, 2.1 or newer is needed"):
        dependencies.install_torch()  # the installer left the old version: said so
    assert dependencies.install_torch() == "2.3.0"
    assert calls == [{"askConfirmation": False, "torchVersionRequirement": ">=2.1"}] * 2
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the extension is not installed
    with pytest.raises(errors.DependencyError, match="'PyTorch' extension"):
        dependencies.install_torch()


def test_gpu_query_never_blocks(tmp_path):
    slow = tmp_path / "nvidia-smi"
    slow.write_text("#!/bin/sh\nsleep 1.5\necho 'NVIDIA Test GPU'\n")
    slow.chmod(0o755)
    start = time.perf_counter()
    query = environment.GpuQuery(executable=str(slow))
    assert query.poll() is None and time.perf_counter() - start < 0.5, "starting the query must not wait"
    assert query.wait() == ["NVIDIA Test GPU"]
    hanging = tmp_path / "hanging-smi"
    hanging.write_text("#!/bin/sh\nsleep 30\n")
    hanging.chmod(0o755)
    start = time.perf_counter()
    assert environment.GpuQuery(timeout_s=0.5, executable=str(hanging)).wait() == []
    assert time.perf_counter() - start < 3.0, "a hanging driver is given up on"
    assert environment.GpuQuery(executable=str(tmp_path / "absent")).poll() == []
