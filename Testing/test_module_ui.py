"""The Slicer module's panel, code and packaging agree (no Slicer or Qt needed: XML and AST only).

* every widget DTNRegistration.py uses exists in Resources/UI/DTNRegistration.ui with the expected class;
* every field of the parameter node has a widget carrying its ``SlicerParameterName`` dynamic property, of a
  class the parameter node wrapper can connect to that field's type, and no widget names a missing field;
* the extension files (CMake, .s4ext, ExtensionsIndex JSON, icons, requirements) are consistent.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "DTNRegistration"
MODULE_FILE = MODULE_DIR / "DTNRegistration.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DTNRegistration.ui"

# Widget classes the parameter node wrapper connects to each field type (slicer.parameterNodeWrapper).
CONNECTABLE = {
    "node": {"qMRMLNodeComboBox"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "int": {"QSpinBox", "QSlider"},
    "bool": {"QCheckBox", "QPushButton"},
    "choice": {"QComboBox"},
    "str": {"QLineEdit", "QTextEdit"},
}
# Classes of widgets used by name in the code, by the suffix of their name.
SUFFIX_CLASSES = {
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "Button": {"QPushButton", "QToolButton"},
    "Selector": {"qMRMLNodeComboBox"},
    "Label": {"QLabel"},
    "ProgressBar": {"QProgressBar"},
    "ComboBox": {"QComboBox"},
    "SliderWidget": {"ctkSliderWidget"},
    "SpinBox": {"QSpinBox"},
    "CheckBox": {"QCheckBox"},
    "LineEdit": {"QLineEdit"},
}


# ----------------------------------------------------------------------------------------------------------------
# Reading the .ui and the module source
# ----------------------------------------------------------------------------------------------------------------


def _property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            child = list(prop)[0]
            if child.tag == "stringlist":
                return [s.text for s in child.findall("string")]
            if child.tag == "bool":
                return child.text == "true"
            return child.text
    return None


@pytest.fixture(scope="module")
def ui():
    tree = ET.parse(UI_FILE)
    widgets = {w.get("name"): w for w in tree.iter("widget")}
    return {"tree": tree, "widgets": widgets}


@pytest.fixture(scope="module")
def source():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found in {MODULE_FILE.name}")


def _parameter_fields(tree: ast.Module) -> dict[str, ast.expr]:
    """Annotated fields of the class decorated with @parameterNodeWrapper."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {
                item.target.id: item.annotation
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in the module")


def _kind(annotation: ast.expr) -> tuple[str, list[str]]:
    """The field's kind for the GUI connector, and its node classes for node fields."""
    text = ast.unparse(annotation)
    nodes = re.findall(r"vtkMRML\w+", text)
    if nodes:
        return "node", nodes
    if "Choice(" in text:
        return "choice", []
    base = re.sub(r"Annotated\[(\w+),.*\]", r"\1", text)
    return base, []


def _ui_attributes(tree: ast.Module) -> set[str]:
    """Names X used as ``self.ui.X`` anywhere in the module."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


# ----------------------------------------------------------------------------------------------------------------
# The panel and the code
# ----------------------------------------------------------------------------------------------------------------


def test_every_parameter_has_a_connectable_widget(ui, source):
    fields = _parameter_fields(source)
    assert len(fields) >= 14
    by_parameter = {}
    for widget in ui["widgets"].values():
        parameter = _property(widget, "SlicerParameterName")
        if parameter is not None:
            assert parameter not in by_parameter, f"two widgets carry SlicerParameterName {parameter}"
            by_parameter[parameter] = widget
    assert set(by_parameter) == set(fields), (
        f"missing in .ui: {sorted(set(fields) - set(by_parameter))}; "
        f"stale in .ui: {sorted(set(by_parameter) - set(fields))}"
    )
    for name, annotation in fields.items():
        kind, node_classes = _kind(annotation)
        widget = by_parameter[name]
        assert widget.get("class") in CONNECTABLE[kind], (
            f"{name} ({ast.unparse(annotation)}) is shown by a {widget.get('class')}; "
            f"the parameter node wrapper connects it to {sorted(CONNECTABLE[kind])}"
        )
        if kind == "node":
            assert _property(widget, "nodeTypes") == node_classes, f"{name}: nodeTypes differ from the annotation"
            optional = "Optional[" in ast.unparse(annotation)
            assert bool(_property(widget, "noneEnabled")) == optional, f"{name}: noneEnabled must match Optional"
        if kind == "float":  # a slider needs bounds: the wrapper refuses an unbounded float on ctkSliderWidget
            assert "WithinRange(" in ast.unparse(annotation)


def test_every_widget_the_code_uses_exists_with_its_class(ui, source):
    used = _ui_attributes(source)
    assert {"registerButton", "progressBar", "statusLabel", "deviceInfoLabel"} <= used
    for name in sorted(used):
        assert name in ui["widgets"], f"self.ui.{name} is used in the code but not defined in {UI_FILE.name}"
        suffix = next((s for s in SUFFIX_CLASSES if name.lower().endswith(s.lower())), None)
        assert suffix is not None, f"self.ui.{name}: unknown widget kind (name it after its class)"
        assert ui["widgets"][name].get("class") in SUFFIX_CLASSES[suffix], (
            f"{name} is a {ui['widgets'][name].get('class')}, expected one of {sorted(SUFFIX_CLASSES[suffix])}"
        )


def test_node_selectors_follow_the_scene(ui):
    connected = {
        c.findtext("receiver")
        for c in ui["tree"].iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    selectors = {n for n, w in ui["widgets"].items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors == connected, f"selectors without the scene connection: {sorted(selectors - connected)}"
    root = ui["tree"].getroot().find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "DTNRegistration"


def test_outputs_default_to_create_new_and_advanced_is_collapsed(ui, source):
    fields = _parameter_fields(source)
    outputs = [name for name in fields if name.startswith("output")]
    assert set(outputs) >= {"outputTransform", "outputWarpedVolume", "outputJacobian", "outputSegmentation"}
    by_parameter = {_property(w, "SlicerParameterName"): w for w in ui["widgets"].values()}
    for name in outputs:
        widget = by_parameter[name]
        assert _property(widget, "noneEnabled") is True
        assert _property(widget, "noneDisplay").startswith("Create new"), f"{name} must default to creating a node"
    assert _property(ui["widgets"]["advancedCollapsibleButton"], "collapsed") is True
    for name in (
        "model",
        "customRefinement",
        "refineSteps",
        "refineSimilarity",
        "affine",
        "mask",
        "movingExclusion",
    ):  # the advanced settings live in the collapsed box
        widget = by_parameter[name]
        parents = [p for p in ui["tree"].iter("widget") if widget in list(p.iter("widget")) and p is not widget]
        assert any(p.get("name") == "advancedCollapsibleButton" for p in parents), f"{name} is not in Advanced"


def test_module_metadata_and_structure(source):
    text = MODULE_FILE.read_text(encoding="utf-8")
    module = _class(source, "DTNRegistration")
    init = ast.unparse(module)
    assert re.search(r"title = _\(['\"]DTN Registration['\"]\)", init)
    assert re.search(r"categories = \[translate\(['\"]\w+['\"], ['\"]Registration['\"]\)\]", init)
    assert "MICCAI 2021" in text and "Dual Transformer Network" in text
    for name in (
        "DTNRegistrationWidget",
        "DTNRegistrationLogic",
        "DTNRegistrationTest",
        "DTNRegistrationParameterNode",
    ):
        _class(source, name)
    assert 'resourcePath("UI/DTNRegistration.ui")' in text
    # No engine, torch or pip work at import time or in the widget constructor.
    top_imports = {
        alias.name.split(".")[0]
        for node in source.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    } | {node.module.split(".")[0] for node in source.body if isinstance(node, ast.ImportFrom) and node.module}
    assert not top_imports & {"torch", "DTNRegistrationLib", "SimpleITK", "numpy"}, top_imports
    widget_init = next(
        f
        for f in _class(source, "DTNRegistrationWidget").body
        if isinstance(f, ast.FunctionDef) and f.name == "__init__"
    )
    assert not re.search(r"pip|install|torch|engine", ast.unparse(widget_init))
    # The engine never runs in a thread of Slicer's process (the main thread's GIL would starve it): the module
    # starts no thread, and the Logic opens no dialog (the Widget asks the user).
    assert "threading" not in text and "Thread(" not in text
    logic = ast.unparse(_class(source, "DTNRegistrationLogic"))
    assert not re.search(r"Display\(|QMessageBox|QFileDialog", logic), "the Logic must not open dialogs"
    # The Logic does not merely forward to DTNRegistrationLib.mrml: no method whose body is one `return engine.X(...)`.
    for method in _class(source, "DTNRegistrationLogic").body:
        if isinstance(method, ast.FunctionDef) and len(method.body) == 1 and isinstance(method.body[0], ast.Return):
            assert "self.engine." not in ast.unparse(method.body[0]), f"{method.name} only forwards to mrml"


def test_dependency_handling_uses_slicer_helpers(source):
    text = (MODULE_DIR / "DTNRegistrationLib" / "mrml" / "dependencies.py").read_text(encoding="utf-8")
    assert "PyTorchUtils" in text and "installTorch" in text and "torchVersionRequirement" in text
    assert "pip_ensure" in text and "slicer.util.pip_install" in text
    requirements = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    listed = {
        re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()
        for line in requirements.splitlines()
        if line.strip() and not line.strip().startswith("#")
    }
    assert listed, "requirements.txt lists nothing"
    assert not listed & {"simpleitk", "numpy", "scipy", "torch", "vtk"}, "never reinstall what Slicer bundles"


# ----------------------------------------------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icons_are_128_pixel_pngs():
    for path in (
        ROOT / "Resources" / "Icons" / "DTNRegistration.png",
        MODULE_DIR / "Resources/Icons/DTNRegistration.png",
    ):
        assert _png_size(path) == (128, 128)


def test_cmake_builds_the_module_with_every_engine_file():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\(DTNRegistration\)", top)
    assert "add_subdirectory(DTNRegistration)" in top
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert key in top
    module = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in module and "WITH_GENERIC_TESTS" in module
    assert "${MODULE_NAME}Lib/*.py" in module, "the engine package must be part of the module's scripts"
    for resource in ("Resources/UI/${MODULE_NAME}.ui", "Resources/requirements.txt", "Resources/Icons/*.png"):
        assert resource in module
    testing = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicer_add_python_unittest(SCRIPT" in testing and "${MODULE_NAME}.py" in testing


def test_extension_descriptions_agree():
    s4ext = {}
    for line in (ROOT / "DTNRegistration.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            s4ext[key] = value.strip()
    index = json.loads((ROOT / "DTNRegistration.json").read_text(encoding="utf-8"))
    assert index["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    assert {"$schema", "category", "scm_url"} <= set(index)
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies"}
    allowed |= {"build_subdirectory", "enabled", "tier"}
    assert set(index) <= allowed
    assert index["category"] == s4ext["category"] == "Registration"
    assert index["scm_url"] == s4ext["scmurl"]
    assert index["scm_revision"] == s4ext["scmrevision"]
    assert index["build_dependencies"] == s4ext["depends"].split() == ["PyTorch"]
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f'"{s4ext["category"]}"' in top and f'"{s4ext["description"]}"' in top
    repository = re.search(r'set\(EXTENSION_REPOSITORY "([^"]+)"\)', top).group(1)
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/")
    cmake = {
        key: value.replace("${EXTENSION_REPOSITORY}", repository).replace("${EXTENSION_RAW_FILES}", raw)
        for key, value in re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', top)
    }
    assert cmake["EXTENSION_ICONURL"] == s4ext["iconurl"] and cmake["EXTENSION_HOMEPAGE"] == s4ext["homepage"]
    assert cmake["EXTENSION_SCREENSHOTURLS"] == s4ext["screenshoturls"] and repository == s4ext["scmurl"]
    repository = index["scm_url"].rstrip("/").rsplit("/", 1)[-1]
    assert repository.startswith("Slicer") and not "DTNRegistration".startswith("Slicer")


def test_panel_defaults_match_the_engine(source):
    """The panel's refinement default is the command line's preset, so both faces give the same result by default."""
    from DTNRegistrationLib import options

    for node in source.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        ):
            defaults = {
                item.target.id: ast.literal_eval(item.value)
                for item in node.body
                if isinstance(item, ast.AnnAssign) and item.value is not None and isinstance(item.value, ast.Constant)
            }
            assert defaults["preset"] == options.DEFAULT_PRESET and defaults["customRefinement"] is False
            assert defaults["refineSimilarity"] == options.DEFAULT_SIMILARITY == "auto"
            return
    raise AssertionError("no @parameterNodeWrapper class in the module")


def test_panel_constants_match_the_engine(source):
    """The alpha default and range the parameter node needs before the engine is imported equal the engine's."""
    from DTNRegistrationLib import options

    constants = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in source.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("DEFAULT_ALPHA", "ALPHA_RANGE")
    }
    assert constants == {"DEFAULT_ALPHA": options.DEFAULT_ALPHA, "ALPHA_RANGE": options.ALPHA_RANGE}


# ----------------------------------------------------------------------------------------------------------------
# Issue 10: what only the application would show
# ----------------------------------------------------------------------------------------------------------------


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == dotted]


def test_qt_objects_made_in_python_have_a_qt_parent(source):
    """PythonQt deletes a Python-made QObject without a Qt parent with its wrapper: a completer must get one."""
    completers = _calls(source, "qt.QCompleter")
    assert completers, "the model name completer is gone"
    for call in completers:
        assert len(call.args) + len(call.keywords) >= 2, f"{ast.unparse(call)}: give it the line edit as parent"


def test_panel_never_waits_for_nvidia_smi(source):
    """nvidia-smi can take seconds: the panel starts it (GpuQuery) and polls, never calls the blocking forms."""
    widget = ast.unparse(_class(source, "DTNRegistrationWidget"))
    assert "GpuQuery(" in widget
    assert not re.search(r"nvidia_gpus\(|detect_devices\(\)|\.wait\(\)", widget.replace("runner.wait(", ""))


def test_license_and_contributors():
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "BSD 3-Clause License" in license_text and "DTNRegistration developers" in license_text
    assert "Neither the name of the copyright holder" in license_text
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'license = { text = "BSD-3-Clause" }' in pyproject
    s4ext = (ROOT / "DTNRegistration.s4ext").read_text(encoding="utf-8")
    contributors = re.search(r"^contributors (.+)$", s4ext, re.M).group(1)
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    in_cmake = re.search(r'EXTENSION_CONTRIBUTORS "([^"]+)"', top).group(1)
    module = re.search(r"contributors = \[(.+)\]", MODULE_FILE.read_text(encoding="utf-8")).group(1)
    in_module = [ast.literal_eval(item.strip()) for item in module.split('", ')]
    for names in (contributors, in_cmake, ", ".join(in_module)):
        for person in names.split(", "):
            assert re.fullmatch(r"[^()]+ \([^()]+\)", person), f"{person!r}: use 'First Last (Organisation)'"


def test_placeholder_urls_come_from_one_repository_address():
    """The repository's address is set once in CMakeLists.txt; the descriptions copy it (change them together)."""
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    repository = re.search(r'set\(EXTENSION_REPOSITORY "([^"]+)"\)', top).group(1)
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/")
    urls = re.findall(r"https?://[^\s\"')]+", top + (ROOT / "DTNRegistration.s4ext").read_text(encoding="utf-8"))
    urls += [json.loads((ROOT / "DTNRegistration.json").read_text(encoding="utf-8"))["scm_url"]]
    project = [url for url in urls if "DTNRegistration/" in url or url.endswith("DTNRegistration")]
    assert project and all(url.startswith((repository, raw)) for url in project), project
    assert top.count("github.com/DTNRegistration/SlicerDTNRegistration") == 1, "one literal address in CMake"
    assert "EXTENSION_REPOSITORY" in (ROOT / "docs" / "slicer.md").read_text(encoding="utf-8")


def _module_constant(name: str):
    module = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    return next(
        ast.literal_eval(node.value)
        for node in module.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets)
    )


def test_panel_presets_and_similarities_are_the_engines():
    from DTNRegistrationLib import options
    from DTNRegistrationLib.core import losses, refinement

    assert tuple(_module_constant("PRESETS")) == options.PRESET_NAMES == tuple(refinement.PRESETS)
    similarities = tuple(_module_constant("SIMILARITIES"))
    assert similarities == options.SIMILARITY_NAMES and set(similarities) == {"auto", *losses.SIMILARITIES}
