"""Shared pytest fixtures: small generated volumes and a tiny network configuration."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DTNRegistrationLib.core.network import DTNConfig

torch.set_num_threads(2)

TINY = dict(enc_channels=(4, 8, 8, 16), q_s=16, q_c=16, dec_channels=(16, 16, 8, 8), heads=2, pos_grid=(2, 2, 2))


def tiny_config(**overrides) -> DTNConfig:
    """A small member of the DTN family: same structure as the default, narrow channels."""
    return DTNConfig(**{**TINY, **overrides})


@pytest.fixture
def tiny_cfg() -> DTNConfig:
    return tiny_config()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (the test machine is shared; oversubscribed threads are far slower).

    The number of threads before is restored after the module. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rough_network_field(monkeypatch):
    """``register()`` starts from a rough random velocity (the network's safeguard bypassed): its maps fold."""
    from DTNRegistrationLib.core import registration

    generator = torch.Generator().manual_seed(0)

    def rough_start(velocity, *args, **kwargs):
        return 3.0 * torch.randn(velocity.shape, generator=generator), "network"

    monkeypatch.setattr(registration, "better_start", rough_start)


def blob_volume(shape=(32, 32, 32), centre=None, radius=6.0) -> np.ndarray:
    """A smooth ball of intensity 1 on 0."""
    centre = np.array(shape) / 2.0 if centre is None else np.asarray(centre, float)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    dist = np.linalg.norm(grid - centre, axis=-1)
    return (1.0 / (1.0 + np.exp((dist - radius) * 1.5))).astype(np.float32)


def phantom_labels(shape=(32, 32, 32)) -> np.ndarray:
    """Nested ellipsoids labelled 1..3: a brain-like label map to measure Dice on."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    r = np.sqrt(((grid / np.array([0.8, 0.7, 0.75])) ** 2).sum(-1))
    labels = np.zeros(shape, np.int32)
    labels[r < 0.9] = 1
    labels[r < 0.6] = 2
    off = np.sqrt((((grid - [0.0, 0.25, 0.2]) / 0.22) ** 2).sum(-1))
    labels[off < 1] = 3
    return labels


def image_from_labels(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    table = np.array([0.0, 0.45, 0.8, 0.25])
    image = table[labels] + rng.normal(0, 0.01, labels.shape)
    return image.astype(np.float32)


def smooth_displacement(shape, amplitude: float, seed: int = 0) -> np.ndarray:
    """A smooth random field (3, D, H, W) in voxels: low-frequency sines."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    field = np.zeros((3,) + tuple(shape), np.float32)
    for c in range(3):
        phases = rng.uniform(0, np.pi, 3)
        field[c] = amplitude * np.sin(axes[0] + phases[0]) * np.sin(axes[1] + phases[1]) * np.sin(axes[2] + phases[2])
    return field


def known_deformation_labels(shape, amplitude: float = 2.5, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's labels (fixed) and the same labels under a smooth diffeomorphism exp(v) (moving)."""
    from DTNRegistrationLib.core import spatial

    fixed = phantom_labels(shape)
    true_u = spatial.integrate(torch.from_numpy(smooth_displacement(shape, amplitude, seed=seed))[None])
    moving = spatial.warp(torch.from_numpy(fixed)[None, None], true_u, mode="nearest")[0, 0].numpy()
    return fixed, moving


def imports_in_fresh_process(code: str, module: str, cwd: str | None = None) -> bool:
    """Whether running ``code`` in a new interpreter imports ``module`` (start-up and GUI-process checks)."""
    import subprocess
    import sys

    script = f"{code}\nimport sys\nprint({module!r} in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, check=True)
    assert out.stdout.strip() in ("True", "False"), out.stderr
    return out.stdout.strip() == "True"


def register_pair(pair: dict, model, **options):
    """``register()`` on a pair dict (moving, fixed and their labels) without affine, on the CPU, no inverse."""
    from DTNRegistrationLib.core import registration

    return registration.register(
        pair["moving"],
        pair["fixed"],
        moving_labels=pair["moving_labels"],
        fixed_labels=pair["fixed_labels"],
        model=model,
        **{"affine": False, "device": "cpu", "inverse": False, **options},
    )


def to_sitk(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def write_phantom_pair(root, shape, model_spacing_mm: float = 2.0):
    """A phantom pair with labels as files (the moving one shifted), 2 mm voxels, and a tiny random model.

    Files: fixed.nii.gz, moving.nii.gz, fixed_labels.nii.gz, moving_labels.nii.gz, tiny.safetensors (whose
    metadata says ``model_spacing_mm``). Returns ``root``.
    """
    from DTNRegistrationLib.core import models
    from DTNRegistrationLib.core.network import build_model

    torch.manual_seed(0)
    models.save_weights(build_model(tiny_config()), root / "tiny.safetensors", {"spacing_mm": model_spacing_mm})
    labels = phantom_labels(shape)
    shifted = np.roll(labels, 2, axis=1)
    for name, array in {
        "fixed.nii.gz": image_from_labels(labels),
        "moving.nii.gz": image_from_labels(shifted, 1),
        "fixed_labels.nii.gz": labels.astype(np.uint8),
        "moving_labels.nii.gz": shifted.astype(np.uint8),
    }.items():
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 2.0))
        sitk.WriteImage(image, str(root / name))
    return root


def zero_velocity_model(folder, **metadata):
    """A small DTN whose velocity head is zero, saved and loaded back: refinement does all the registering, from
    the same start in every orientation (Adam's first steps follow the gradient's sign, so round-off in a
    near-zero start would otherwise show in the result). ``metadata`` is added to its weights file's."""
    from DTNRegistrationLib.core import models
    from DTNRegistrationLib.core.network import build_model

    torch.manual_seed(0)
    path = folder / "tiny.safetensors"
    model = build_model(tiny_config())
    torch.nn.init.zeros_(model.velocity_head.weight)
    models.save_weights(model, path, {"spacing_mm": 2.0, **metadata})
    return models.load_weights(path)
