"""Synthetic training pairs (in the spirit of SynthMorph) and spatial/intensity augmentation of real images.

Everything runs on the device of the ``torch.Generator`` it is given and is deterministic for its seed,
so a training run can save the generator's state and resume it exactly.

Synthetic pairs: a random label template (argmax of K smooth noise channels), deformed twice by random
smooth diffeomorphisms (integrated stationary velocities, so no folding) into the moving and fixed label
maps; each label gets a random intensity (shared by both images with a small jitter by default, since the
paper's L1 similarity assumes one contrast), then texture, bias field, blur and noise, and a [0, 1] range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import spatial

Shape = tuple[int, int, int]


@dataclass
class SynthConfig:
    """Ranges of the synthetic pair generator (lengths in voxels of the model grid)."""

    num_labels: int = 16
    label_divisors: tuple[int, ...] = (6, 8, 12)  # label blobs: noise on a grid shape // divisor
    template_warp_std: float = 6.0  # max std of the velocity deforming the label template
    pair_warp_std: float = 3.0  # max std of the velocity of each image's deformation
    warp_divisor: int = 16  # velocity noise on a grid shape // divisor (smoothness)
    contrast: str = "shared"  # "shared": one intensity per label for both images (+ jitter); "independent"
    intensity_jitter: float = 0.05
    texture_std: float = 0.05  # smooth within-label intensity variation
    background_dark: float = 0.5  # probability that label 0 is a black background
    bias_std: float = 0.3  # max std of the log bias field
    blur_max: float = 1.0  # max Gaussian blur sigma
    noise_max: float = 0.04  # max std of additive Gaussian noise

    def __post_init__(self) -> None:
        if self.contrast not in ("shared", "independent"):
            raise ValueError(f"contrast must be 'shared' or 'independent', got {self.contrast!r}")
        if self.num_labels < 2:
            raise ValueError("a synthetic label map needs at least 2 labels")
        self.label_divisors = tuple(self.label_divisors)


@dataclass
class AugmentConfig:
    """Ranges of the random affine + elastic + intensity augmentation of real images."""

    rotation_deg: float = 10.0
    scale: float = 0.08
    shear: float = 0.04
    translation: float = 4.0  # voxels
    elastic_std: float = 2.0  # max std of the elastic velocity, voxels
    elastic_divisor: int = 16
    gamma_std: float = 0.25  # log-gamma std
    bias_std: float = 0.15
    blur_max: float = 0.5
    noise_max: float = 0.02


@dataclass
class Pair:
    """A batch of moving/fixed images ``(B, 1, D, H, W)`` in [0, 1] and their integer label maps (or None)."""

    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: torch.Tensor | None = None
    fixed_labels: torch.Tensor | None = None
    displacement: torch.Tensor | None = None  # the true field (voxels) where known: moving(x + u(x)) ~ fixed(x)

    def to(self, device: torch.device | str) -> Pair:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        parts = (self.moving, self.fixed, self.moving_labels, self.fixed_labels, self.displacement)
        return Pair(*(move(t) for t in parts))


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on ``device`` (all sampling here draws from it)."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def _uniform(gen: torch.Generator, size, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=gen, device=gen.device)


def _normal(gen: torch.Generator, size) -> torch.Tensor:
    return torch.randn(size, generator=gen, device=gen.device)


def smooth_noise(gen: torch.Generator, batch: int, channels: int, shape: Shape, divisor: float) -> torch.Tensor:
    """Unit Gaussian noise on a coarse grid (``shape / divisor``), upsampled: cheap, smooth, band-limited."""
    coarse = [max(2, int(math.ceil(n / divisor))) for n in shape]
    noise = _normal(gen, (batch, channels, *coarse))
    return F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)


def random_velocity(gen: torch.Generator, batch: int, shape: Shape, std_max: float, divisor: float) -> torch.Tensor:
    """A smooth stationary velocity field, each sample's std uniform in [0, std_max] voxels."""
    std = _uniform(gen, (batch, 1, 1, 1, 1), 0.0, std_max)
    return smooth_noise(gen, batch, 3, shape, divisor) * std


def random_deformation(gen: torch.Generator, batch: int, shape: Shape, std_max: float, divisor: float) -> torch.Tensor:
    """Displacement (voxels) of a random diffeomorphism: a smooth velocity integrated at half resolution."""
    return random_deformation_and_inverse(gen, batch, shape, std_max, divisor, inverse=False)[0]


def random_deformation_and_inverse(
    gen: torch.Generator, batch: int, shape: Shape, std_max: float, divisor: float, inverse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random diffeomorphism's displacement and, with ``inverse``, its inverse's: ``exp(v)`` and ``exp(-v)``."""
    half = tuple(max(2, n // 2) for n in shape)
    v = random_velocity(gen, batch, half, std_max * half[0] / shape[0], divisor / 2)
    forward = spatial.resize_field(spatial.integrate(v), tuple(shape))
    backward = spatial.resize_field(spatial.inverse(v), tuple(shape)) if inverse else None
    return forward, backward


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a ``(B, C, D, H, W)`` tensor (reflect padding)."""
    if sigma <= 0.05:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    b, c = x.shape[:2]
    y = x.reshape(b * c, 1, *x.shape[2:])
    for axis in range(3):
        view = [1, 1, 1, 1, 1]
        view[2 + axis] = -1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(view))
    return y.reshape(x.shape)


def normalise_01(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling to [0, 1]."""
    flat = x.flatten(1)
    lo = flat.min(1).values.view(-1, *[1] * (x.dim() - 1))
    hi = flat.max(1).values.view(-1, *[1] * (x.dim() - 1))
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def corrupt(gen: torch.Generator, image: torch.Tensor, bias_std: float, blur_max: float, noise_max: float):
    """Bias field, blur and noise, each with a random strength per sample, then [0, 1]."""
    b, _, *shape = image.shape
    log_bias = smooth_noise(gen, b, 1, tuple(shape), 24) * _uniform(gen, (b, 1, 1, 1, 1), 0.0, bias_std)
    image = image * torch.exp(log_bias)
    sigmas = _uniform(gen, (b,), 0.0, blur_max).tolist()
    image = torch.cat([gaussian_blur(image[i : i + 1], s) for i, s in enumerate(sigmas)])
    image = image + _normal(gen, image.shape) * _uniform(gen, (b, 1, 1, 1, 1), 0.0, noise_max)
    return normalise_01(image)


def _label_template(gen: torch.Generator, cfg: SynthConfig, batch: int, shape: Shape) -> torch.Tensor:
    """K smooth noise channels, deformed: the continuous template whose argmax is a label map."""
    idx = int(torch.randint(len(cfg.label_divisors), (1,), generator=gen, device=gen.device).item())
    channels = smooth_noise(gen, batch, cfg.num_labels, shape, cfg.label_divisors[idx])
    u = random_deformation(gen, batch, shape, cfg.template_warp_std, cfg.warp_divisor)
    return spatial.warp(channels, u, padding="border")


def _paint(gen: torch.Generator, cfg: SynthConfig, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """An image from a label map: per-label mean, smooth texture, bias, blur, noise."""
    b, _, *shape = labels.shape
    image = torch.gather(means, 1, labels.flatten(1)).view(labels.shape)
    image = image + smooth_noise(gen, b, 1, tuple(shape), 8) * cfg.texture_std
    return corrupt(gen, image.clamp_min(0), cfg.bias_std, cfg.blur_max, cfg.noise_max)


def _label_means(gen: torch.Generator, cfg: SynthConfig, batch: int) -> torch.Tensor:
    means = _uniform(gen, (batch, cfg.num_labels))
    dark = _uniform(gen, (batch,)) < cfg.background_dark
    means[:, 0] = torch.where(dark, torch.zeros_like(means[:, 0]), means[:, 0])
    return means


def synth_pair(
    gen: torch.Generator, shape: Shape, batch: int = 1, cfg: SynthConfig | None = None, true_field: bool = True
) -> Pair:
    """A random moving/fixed pair with label maps (int64), related by a random diffeomorphism; with
    ``true_field`` also the displacement that carries the moving image onto the fixed one (costs an inverse and a
    composition; the random stream is the same either way)."""
    cfg = cfg or SynthConfig()
    shape = tuple(int(n) for n in shape)
    template = _label_template(gen, cfg, batch, shape)
    labels, fields = [], []
    for _ in range(2):
        u, u_inverse = random_deformation_and_inverse(
            gen, batch, shape, cfg.pair_warp_std, cfg.warp_divisor, inverse=true_field
        )
        labels.append(spatial.warp(template, u, padding="border").argmax(1, keepdim=True))
        fields.append((u, u_inverse))
    # moving = T o (Id + a), fixed = T o (Id + b), so moving o (Id + a)^-1 o (Id + b) = fixed
    displacement = spatial.compose(fields[0][1], fields[1][0]) if true_field else None
    means_m = _label_means(gen, cfg, batch)
    if cfg.contrast == "shared":
        means_f = (means_m + _normal(gen, means_m.shape) * cfg.intensity_jitter).clamp(0, 1)
        means_f[:, 0] = means_m[:, 0]
    else:
        means_f = _label_means(gen, cfg, batch)
    moving = _paint(gen, cfg, labels[0], means_m)
    fixed = _paint(gen, cfg, labels[1], means_f)
    return Pair(moving, fixed, labels[0], labels[1], displacement)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(B, 3, 3)`` from three angles per sample (radians, about axes 0, 1, 2)."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])

    def mat(rows):
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    r0 = mat([[one, zero, zero], [zero, c[:, 0], -s[:, 0]], [zero, s[:, 0], c[:, 0]]])
    r1 = mat([[c[:, 1], zero, s[:, 1]], [zero, one, zero], [-s[:, 1], zero, c[:, 1]]])
    r2 = mat([[c[:, 2], -s[:, 2], zero], [s[:, 2], c[:, 2], zero], [zero, zero, one]])
    return r0 @ r1 @ r2


def random_affine_field(gen: torch.Generator, batch: int, shape: Shape, cfg: AugmentConfig) -> torch.Tensor:
    """Displacement (voxels) of a random affine map about the grid centre: rotation, scale, shear, shift."""
    angles = _uniform(gen, (batch, 3), -1.0, 1.0) * math.radians(cfg.rotation_deg)
    scales = torch.exp(_uniform(gen, (batch, 3), -1.0, 1.0) * math.log1p(cfg.scale))
    shear = torch.zeros(batch, 3, 3, device=gen.device)
    off = ~torch.eye(3, dtype=torch.bool, device=gen.device)
    shear[:, off] = _uniform(gen, (batch, 6), -1.0, 1.0) * cfg.shear
    matrix = _rotation(angles) @ torch.diag_embed(scales) @ (torch.eye(3, device=gen.device) + shear)
    shift = _uniform(gen, (batch, 3), -1.0, 1.0) * cfg.translation
    grid = spatial.identity_grid(shape, gen.device)  # (1, 3, D, H, W)
    centre = torch.tensor([(n - 1) / 2 for n in shape], device=gen.device).view(1, 3, 1, 1, 1)
    rel = (grid - centre).flatten(2)  # (1, 3, N)
    moved = (matrix @ rel).view(batch, 3, *shape) + centre + shift.view(batch, 3, 1, 1, 1)
    return moved - grid


def random_spatial_field(gen: torch.Generator, batch: int, shape: Shape, cfg: AugmentConfig) -> torch.Tensor:
    """Affine then elastic displacement (an elastic diffeomorphism composed with the affine)."""
    affine = random_affine_field(gen, batch, shape, cfg)
    elastic = random_deformation(gen, batch, shape, cfg.elastic_std, cfg.elastic_divisor)
    return spatial.compose(elastic, affine)


def augment_intensity(gen: torch.Generator, image: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Random gamma, bias field, blur and noise of [0, 1] images."""
    gamma = torch.exp(_normal(gen, (image.shape[0], 1, 1, 1, 1)) * cfg.gamma_std)
    return corrupt(gen, image.clamp(0, 1) ** gamma, cfg.bias_std, cfg.blur_max, cfg.noise_max)


def augment(
    gen: torch.Generator,
    image: torch.Tensor,
    labels: torch.Tensor | None = None,
    cfg: AugmentConfig | None = None,
    spatial_aug: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly deform (affine + elastic) an image batch and its labels alike, then vary its intensities."""
    cfg = cfg or AugmentConfig()
    image = image.to(gen.device, torch.float32)
    if spatial_aug:
        u = random_spatial_field(gen, image.shape[0], tuple(image.shape[2:]), cfg)
        image = spatial.warp(image, u)
        if labels is not None:
            labels = spatial.warp(labels.to(gen.device), u, mode="nearest")
    return augment_intensity(gen, image, cfg), labels


__all__ = [
    "AugmentConfig",
    "Pair",
    "SynthConfig",
    "augment",
    "make_generator",
    "random_affine_field",
    "random_deformation",
    "random_deformation_and_inverse",
    "synth_pair",
]
