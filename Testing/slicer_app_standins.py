"""Import DTNRegistration.py headless: stand-ins for the parts of the Slicer application that slicer-core lacks.

slicer-core gives real MRML (scenes, nodes, the Volumes, Transforms and Segmentations logics). It has no Qt, no
``slicer.app``, no ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper`` or ``slicer.i18n``, and no
Sample Data module. ``load_module`` puts small stand-ins for exactly those in place (recording what the module does
with them) and imports the module file, so its Module, Logic, Test and Widget code runs against a real scene.

The stand-ins mirror Slicer's behaviour where the tests depend on it (cited from Slicer's sources):
``ScriptedLoadableModule.runTest`` is what Reload and Test calls (it creates ``<Module>Test`` and calls its
``runTest`` directly, not through unittest); ``SampleDataLogic`` signatures are those of Slicer 5.6 and 5.12.
Widgets are plain recorders (``FakeWidget``): they store what the code sets and the signals it connects.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import slicer

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "DTNRegistration" / "DTNRegistration.py"


class FakeWidget:
    """Any Qt widget: attributes set are kept, ``connect`` calls recorded, other methods accepted."""

    def __init__(self, name: str = "") -> None:
        self.__dict__.update(name=name, enabled=True, text="", toolTip="", value=0, count=3, connections=[])
        self.__dict__["items"] = {}

    def connect(self, signal, slot) -> None:
        self.connections.append((signal, slot))

    def setItemText(self, index, text) -> None:
        self.items[index] = text

    def __getattr__(self, name):  # setVisible, setStyleSheet, setCompleter, ...
        return lambda *args, **kwargs: None


class FakeQt(types.ModuleType):
    """The ``qt`` module: timers that do not tick (tests call the slots), completers that keep their parent."""

    def __init__(self) -> None:
        super().__init__("qt")
        self.completers = []
        qt = self

        class QTimer(FakeWidget):
            @staticmethod
            def singleShot(msec, slot):
                pass

            def start(self):
                self.__dict__["active"] = True

            def stop(self):
                self.__dict__["active"] = False

        class QCompleter:
            def __init__(self, items, parent=None):
                self.items, self.parent = list(items), parent
                qt.completers.append(self)

        self.QTimer, self.QCompleter = QTimer, QCompleter
        self.QFileDialog = types.SimpleNamespace(getOpenFileName=lambda *a: "", getSaveFileName=lambda *a: "")


class FakeApp:
    def __init__(self, temporary: Path) -> None:
        self.temporaryPath = str(temporary)
        self.connections = []

    def connect(self, signal, slot) -> None:
        self.connections.append((signal, slot))

    def processEvents(self) -> None:
        pass

    def startupEnvironment(self):
        environment = dict(os.environ)
        return types.SimpleNamespace(keys=lambda: list(environment), value=environment.get)


def _scripted_loadable_module() -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent
            self.moduleName = self.__class__.__name__

        def runTest(self, msec=100, **kwargs):  # as Slicer's: the Test class's runTest, called directly
            test_case = getattr(sys.modules[self.__module__], self.moduleName + "Test")()
            test_case.messageDelay = msec
            test_case.runTest(**kwargs)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode("DTNRegistration", "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag("DTNRegistration")
                node.SetName("DTNRegistration")
                scene.AddNode(node)
            return node

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.parent = parent

        def setup(self) -> None:  # Slicer's adds the Reload and Test buttons
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.messages = []

        def delayDisplay(self, message, msec=None) -> None:
            self.messages.append(message)

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    return module


def _parameter_node_wrapper() -> types.ModuleType:
    """The decorator as an attribute holder over the raw node (defaults from the class, as Slicer's wrapper)."""
    module = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        fields = list(cls.__annotations__)

        def init(self, raw):
            self.parameterNode = raw
            for name in fields:
                setattr(self, name, getattr(cls, name, None))

        members = {
            "__init__": init,
            "fields": fields,
            "connectGui": lambda self, ui: "gui-tag",
            "disconnectGui": lambda self, tag: None,
            # the wrapper is observed like the node it wraps (the module observes ModifiedEvent)
            "AddObserver": lambda self, *args: self.parameterNode.AddObserver(*args),
            "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
        }
        return type(cls.__name__, (), members)

    module.parameterNodeWrapper = parameterNodeWrapper
    module.Choice = lambda choices: ("Choice", tuple(choices))
    module.WithinRange = lambda low, high: ("WithinRange", low, high)
    return module


def sample_data_5_6() -> types.ModuleType:
    """Slicer 5.6's SampleDataLogic signature: ``loadFileType`` only, no categories with titles."""
    module = types.ModuleType("SampleData")

    class SampleDataLogic:
        sources = []

        @staticmethod
        def registerCustomSampleDataSource(
            category="Custom",
            sampleName=None,
            uris=None,
            fileNames=None,
            nodeNames=None,
            customDownloader=None,
            thumbnailFileName=None,
            loadFileType="VolumeFile",
            loadFiles=None,
            loadFileProperties={},  # noqa: B006 - Slicer's own signature
            checksums=None,
        ):
            SampleDataLogic.sources.append((category, sampleName, list(uris), list(nodeNames), loadFileType))

    module.SampleDataLogic = SampleDataLogic
    return module


def sample_data_5_12() -> types.ModuleType:
    """Slicer 5.8-5.12's signature: ``loadFileTypes``, ``loadFileType`` kept as an alias; 5.12's titled category."""
    module = types.ModuleType("SampleData")

    class SampleDataLogic:
        sources = []
        categories = {}

        @staticmethod
        def registerCustomSampleDataCategory(category, title):
            SampleDataLogic.categories[category] = title

        @staticmethod
        def registerCustomSampleDataSource(
            category="Custom",
            sampleName=None,
            uris=None,
            fileNames=None,
            nodeNames=None,
            customDownloader=None,
            thumbnailFileName=None,
            loadFileTypes=None,
            loadFiles=None,
            loadFileProperties={},  # noqa: B006 - Slicer's own signature
            checksums=None,
            loadFileType=None,
        ):
            if loadFileType is not None and loadFileTypes is not None:
                raise ValueError("loadFileType and loadFileTypes cannot be specified at the same time")
            if loadFileType is not None:
                loadFileTypes = loadFileType
            SampleDataLogic.sources.append((category, sampleName, list(uris), list(nodeNames), loadFileTypes))

    module.SampleDataLogic = SampleDataLogic
    return module


def load_module(monkeypatch, context, temporary: Path, sample_data=None):
    """Install the stand-ins (undone by ``monkeypatch``) and import DTNRegistration.py afresh; returns it."""
    qt = FakeQt()
    app = FakeApp(temporary)
    messages = []
    modules_ns = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: context.volumes_logic),
        segmentations=types.SimpleNamespace(logic=lambda: context.segmentations_logic),
        transforms=types.SimpleNamespace(logic=lambda: context.transforms_logic),
    )
    app.applicationLogic = lambda: context.application_logic
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context_name, text: text
    stand_ins = {
        "qt": qt,
        "slicer.i18n": i18n,
        "slicer.ScriptedLoadableModule": _scripted_loadable_module(),
        "slicer.parameterNodeWrapper": _parameter_node_wrapper(),
        "SampleData": sample_data or sample_data_5_12(),
    }
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", context.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", modules_ns, raising=False)
    monkeypatch.setattr(slicer.util, "delayDisplay", lambda message, *a, **k: messages.append(message), raising=False)
    spec = importlib.util.spec_from_file_location("DTNRegistration", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "DTNRegistration", module)
    spec.loader.exec_module(module)
    module.standins = types.SimpleNamespace(qt=qt, app=app, messages=messages, sample_data=stand_ins["SampleData"])
    return module


def fake_ui(names) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: FakeWidget(name) for name in names})
