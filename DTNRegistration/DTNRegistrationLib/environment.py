"""What the Slicer module needs to know about its Python environment, without Slicer, Qt or torch.

Installed packages against requirements.txt, the GPUs and whether PyTorch can use them, and the metadata of
model weights. Nothing here installs anything or imports torch: the module's panel calls it before the first
registration, where importing torch would be slow (or fail, before PyTorch is installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# -- packages ------------------------------------------------------------------------------------------------


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


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
    for line in Path(requirements_file).read_text().splitlines():
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
    with os.fdopen(handle, "w") as stream:
        stream.write("\n".join(lines) + "\n")
    return path


# -- devices -------------------------------------------------------------------------------------------------


@dataclass
class Devices:
    """The GPUs found and whether the installed PyTorch can use them."""

    gpus: list[str]
    torch_version: str | None  # None: PyTorch is not installed
    cuda_usable: bool


def nvidia_gpus() -> list[str]:
    """Names of the NVIDIA GPUs that ``nvidia-smi`` lists (none where it is missing or fails)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def detect_devices() -> Devices:
    """GPUs and whether PyTorch can use them, from ``nvidia-smi`` and package metadata (torch is not imported).

    Where torch is already imported, it is asked directly.
    """
    gpus = nvidia_gpus()
    torch_version = installed_version("torch")
    cpu_build = torch_version is not None and "+cpu" in torch_version
    cuda_usable = bool(gpus) and torch_version is not None and not cpu_build
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        cuda_usable = bool(torch.cuda.is_available())
        if cuda_usable and not gpus:
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Devices(gpus, torch_version, cuda_usable)


# -- model weights -------------------------------------------------------------------------------------------


def read_model_registry(models_dir: str | os.PathLike) -> dict:
    """The shipped models' registry (``models.json``); an empty one where it is missing or unreadable."""
    path = Path(models_dir) / "models.json"
    if not path.is_file():
        return {"default": None, "models": {}}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"default": None, "models": {}}


def weights_metadata(path: str | os.PathLike) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its JSON header (no torch, no safetensors)."""
    with open(path, "rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        if length > 100_000_000:  # the safetensors format caps its header at 100 MB
            raise ValueError("not a safetensors file")
        header = json.loads(stream.read(length))
    return header.get("__metadata__", {}) or {}


def weights_config(path: str | os.PathLike) -> tuple[dict, dict]:
    """A weights file's network configuration and its extra information (e.g. ``spacing_mm``).

    Raises ``OSError``, ``ValueError`` or ``struct.error`` where the file cannot be read as DTN weights.
    """
    metadata = weights_metadata(path)
    return json.loads(metadata.get("dtn_config", "{}")), json.loads(metadata.get("info", "{}"))
