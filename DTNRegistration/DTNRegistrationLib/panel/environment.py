"""What the Slicer module needs to know about its Python environment, without Slicer, Qt or torch.

Installed packages against requirements.txt and the engine's torch requirement, the GPUs and whether PyTorch can
use them (``nvidia-smi`` run without blocking), child processes without a console window. Nothing here installs
anything or imports torch: the module's panel calls it before the first registration, where importing torch would
be slow (or fail, before PyTorch is installed). The models' registry and weights metadata: ``core.model_registry``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The oldest torch the engine runs on (pyproject.toml says the same; a test checks that they agree).
MIN_TORCH_VERSION = "2.1"
TORCH_REQUIREMENT = ">=" + MIN_TORCH_VERSION

# -- packages ------------------------------------------------------------------------------------------------


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def version_tuple(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: "2.10.0+cu121" -> (2, 10, 0); "2.1.0a0" -> (2, 1, 0)."""
    numbers = []
    for part in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.group() != part:  # "0a0", "0rc1": a pre-release of this number; stop here
            break
    return tuple(numbers)


@dataclass
class TorchStatus:
    """The installed torch against the engine's requirement."""

    version: str | None  # None: not installed
    required: str = MIN_TORCH_VERSION

    @property
    def ok(self) -> bool:
        return self.version is not None and version_tuple(self.version) >= version_tuple(self.required)


def torch_status() -> TorchStatus:
    """The installed torch (from package metadata: torch is not imported) and whether the engine can use it."""
    importlib.invalidate_caches()  # an installation may just have happened in this process
    return TorchStatus(installed_version("torch"))


def installed_version(name: str) -> str | None:
    """The installed version of a distribution, or None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements_file: str | os.PathLike) -> list[str]:
    """Requirement lines of a requirements file that are not installed (or at an unsuitable version)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # without `packaging`, only check that each package is there
        Requirement = None
    missing = []
    for line in Path(requirements_file).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if Requirement is not None:
            requirement = Requirement(line)
            name = requirement.name
        else:
            requirement = None
            name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]
        version = installed_version(name)
        if version is None:
            missing.append(line)
            continue
        if requirement is not None and requirement.specifier and version not in requirement.specifier:
            missing.append(line)
    return missing


def write_pinning_constraints(packages: Sequence[str]) -> str:
    """A temporary pip constraints file pinning ``packages`` to their installed versions; returns its path.

    The caller removes the file. Packages that are not installed are left out.
    """
    lines = [f"{name}=={version}" for name in packages if (version := installed_version(name)) is not None]
    handle, path = tempfile.mkstemp(prefix="DTNRegistration-constraints-", suffix=".txt")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write("\n".join(lines) + "\n")
    return path


# -- child processes -----------------------------------------------------------------------------------------


def hidden_console() -> dict:
    """``subprocess.Popen`` keywords that keep a console window from flashing up on Windows (none elsewhere).

    As Slicer's own ``launchConsoleProcess``: a hidden window (STARTF_USESHOWWINDOW, SW_HIDE), and no console.
    """
    if os.name != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = 0  # SW_HIDE
    return {"startupinfo": info, "creationflags": subprocess.CREATE_NO_WINDOW}


# -- devices -------------------------------------------------------------------------------------------------


@dataclass
class Devices:
    """The GPUs found and whether the installed PyTorch can use them."""

    gpus: list[str]
    torch_version: str | None  # None: PyTorch is not installed
    cuda_usable: bool

    def summary(self) -> str:
        """One line for the panel: the GPU found and whether registration will use it."""
        gpus = ", ".join(self.gpus)
        if self.gpus and self.cuda_usable:
            return f"GPU: {gpus} (PyTorch {self.torch_version})"
        if self.gpus and self.torch_version is None:
            return f"GPU: {gpus}. PyTorch is not installed yet: it is installed (with CUDA) at the first run."
        if self.gpus:
            return (
                f"GPU: {gpus}, but the installed PyTorch {self.torch_version} cannot use it: reinstall PyTorch with "
                "CUDA in the PyTorch Utils module. Running on the CPU."
            )
        return "No CUDA GPU found: registration runs on the CPU (slower, same results)."


class GpuQuery:
    """``nvidia-smi --query-gpu=name`` started without waiting for it: ``poll()`` returns None until it ends.

    The GUI starts it and polls from a timer, so that a slow or hanging driver never blocks the panel; after
    ``timeout_s`` the query is killed and counts as no GPU. Without ``nvidia-smi`` it is done at once, with none.
    """

    def __init__(self, timeout_s: float = 10.0, executable: str | None = None) -> None:
        self._gpus: list[str] | None = None
        self._deadline = time.monotonic() + timeout_s
        self._process = None
        smi = executable or shutil.which("nvidia-smi")
        if not smi:
            self._gpus = []
            return
        try:
            self._process = subprocess.Popen(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                **hidden_console(),
            )
        except OSError:
            self._gpus = []

    def poll(self) -> list[str] | None:
        """The GPU names once the query has ended (empty where it failed or timed out), else None."""
        if self._gpus is not None:
            return self._gpus
        if self._process.poll() is None:
            if time.monotonic() < self._deadline:
                return None
            self._process.kill()
        output = self._process.communicate()[0] if self._process.returncode == 0 else ""
        self._gpus = [line.strip() for line in (output or "").splitlines() if line.strip()]
        return self._gpus

    def wait(self) -> list[str]:
        while (gpus := self.poll()) is None:
            time.sleep(0.05)
        return gpus


def nvidia_gpus() -> list[str]:
    """Names of the NVIDIA GPUs that ``nvidia-smi`` lists (blocking; none where it is missing or fails)."""
    return GpuQuery().wait()


def detect_devices(gpus: list[str] | None = None) -> Devices:
    """GPUs and whether PyTorch can use them, from ``nvidia-smi`` and package metadata (torch is not imported).

    ``gpus``: the names a :class:`GpuQuery` found (queried here, blocking, when not given). Where torch is
    already imported, it is asked directly.
    """
    gpus = nvidia_gpus() if gpus is None else list(gpus)
    torch_version = installed_version("torch")
    cpu_build = torch_version is not None and "+cpu" in torch_version
    cuda_usable = bool(gpus) and torch_version is not None and not cpu_build
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        cuda_usable = bool(torch.cuda.is_available())
        if cuda_usable and not gpus:
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Devices(gpus, torch_version, cuda_usable)
