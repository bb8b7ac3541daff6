"""Installing what the engine needs inside Slicer: PyTorch through the PyTorch extension, and requirements.txt.

Library code: nothing here asks the user anything. The panel asks first, then calls :func:`install_torch` or
:func:`install_packages`, which raise :class:`~DTNRegistrationLib.errors.DependencyError` with a one-line reason.
The engine runs in a child process, so a torch upgraded here is the one the next registration uses, even where an
older torch is already imported into Slicer's own process by another module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..errors import DependencyError
from ..panel import environment

# Packages Slicer bundles: an installation must never replace them (they are pinned while pip runs).
BUNDLED_PACKAGES = ("SimpleITK", "numpy", "scipy", "vtk")


@dataclass
class Needs:
    """What is missing: a usable torch, and requirement lines of requirements.txt."""

    torch: environment.TorchStatus
    packages: list[str] = field(default_factory=list)

    @property
    def nothing(self) -> bool:
        return self.torch.ok and not self.packages


def needs(requirements_file: str | os.PathLike) -> Needs:
    return Needs(environment.torch_status(), environment.missing_requirements(requirements_file))


def install_torch() -> str:
    """Install or upgrade torch to the engine's requirement with the PyTorch extension; returns its version."""
    try:
        import PyTorchUtils
    except ImportError:
        raise DependencyError(
            "DTN Registration needs the 'PyTorch' extension: install it from the Extensions Manager, restart "
            "Slicer, and click Register again."
        ) from None
    try:
        PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=environment.TORCH_REQUIREMENT
        )
    except Exception as err:  # pip's and light-the-torch's failures come in many types
        logging.exception("DTN Registration: PyTorch installation failed")
        raise DependencyError(f"PyTorch could not be installed: {err}") from err
    status = environment.torch_status()
    if not status.ok:
        raise DependencyError(
            f"PyTorch {status.version or '(none)'} is installed, {status.required} or newer is needed; restart "
            "Slicer and try again (a PyTorch already loaded by another module cannot be replaced while it runs)."
        )
    return status.version


def install_packages(requirements_file: str | os.PathLike) -> None:
    """Install requirements.txt's missing packages, Slicer's bundled packages pinned to their versions."""
    import slicer

    missing = environment.missing_requirements(requirements_file)
    if not missing:
        return
    constraints = environment.write_pinning_constraints(BUNDLED_PACKAGES)
    try:
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer >= 5.12
            requirements = packaging.load_requirements(str(requirements_file))
            packaging.pip_ensure(
                requirements,
                constraints=constraints,
                prompt_install=False,
                prompt_restart=False,
                requester="DTN Registration",
            )
        else:
            slicer.util.pip_install(missing + ["-c", constraints])
    except Exception as err:  # pip failures: CalledProcessError, RuntimeError, ...
        logging.exception("DTN Registration: package installation failed")
        raise DependencyError(f"Python packages could not be installed ({', '.join(missing)}): {err}") from err
    finally:
        os.remove(constraints)
    still = environment.missing_requirements(requirements_file)
    if still:
        raise DependencyError(f"These packages could not be installed: {', '.join(still)}")


__all__ = ["BUNDLED_PACKAGES", "Needs", "install_packages", "install_torch", "needs"]
