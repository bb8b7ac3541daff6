"""The Dual Transformer Network (Zhang, Pei & Zha, MICCAI 2021) and its ablations.

Layout (Fig. 1 of the paper):

* ``phi_s``: a five-level 3D U-Net encoder shared by the moving and the fixed image (one channel each),
  bottleneck ``q_s`` channels at 1/16 resolution.
* ``phi_c``: the same kind of encoder on their two-channel concatenation, ``q_c`` channels; its feature
  maps are also the decoder's skip connections (the VM_dif-like backbone).
* ``T_s``: encoder-decoder transformer (3 + 2 layers) over the moving and fixed sequences, with a learnable
  positional encoding and an image-index encoding; its decoder queries are the fixed image's tokens, so its
  output lives on the fixed grid. ``T_c``: self-attention over the concatenated embedding.
* Bottleneck ``[T_s | T_c]`` (``q_s + q_c = 224`` channels), a decoder with skip connections, a velocity
  head (initialised near zero), scaling and squaring, and a spatial transformer.

Variants (``DTNConfig.variant``): ``dtn`` (both transformers), ``dtn_s`` (``T_s`` only; ``F_c`` passes
un-enhanced), ``dtn_c`` (``T_c`` only; no ``phi_s`` branch) and ``none`` (transformer-free, VM_dif-like).

Speed choices (measured in docs/benchmarks.md): one convolution per encoder level (stride 2 below full
resolution) and the velocity predicted and integrated at half resolution, then upsampled.

Symmetric inference (``symmetric_velocity``, what the pipeline uses): the velocity of the pair averaged with the
negated velocity of the swapped pair, ``(v(m, f) - v(f, m)) / 2``, from one batched pass. Registering B to A then
gives exactly the inverse of A to B, and identical images give exactly the identity: the network alone had put
about 1 mm of spurious motion on identical images. On known deformations it gained 0.01-0.04 Dice, about
nothing on real pairs between subjects, and the fields were about 40 % smoother (docs/model.md). The network
alone (``--refine 0``) cascades it: a coarse network's pass is followed by three passes on the 2 mm work grid, on the
images warped half-way toward each other, which adds what the first left and stays exactly inverse-consistent
(docs/model.md).

Alpha conditioning: with ``alpha_conditioned`` the decoder features are modulated (FiLM) by an MLP of
``log10(alpha)``, so one model serves the whole smoothness range (in the spirit of HyperMorph); with it off,
the network is the paper's, trained at one fixed alpha.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..options import ALPHA_RANGE, DEFAULT_ALPHA
from . import spatial

VARIANTS = ("dtn", "dtn_s", "dtn_c", "none")
SIZE_MULTIPLE = 16


@dataclass
class DTNConfig:
    """Architecture of a model of the DTN family; stored with its weights."""

    variant: str = "dtn"
    enc_channels: tuple[int, ...] = (8, 16, 32, 64)  # levels 1, 1/2, 1/4, 1/8 (both encoders)
    q_s: int = 128  # phi_s bottleneck channels (1/16)
    q_c: int = 96  # phi_c bottleneck channels (1/16)
    dec_channels: tuple[int, ...] = (64, 64, 32, 16)  # decoder at 1/16, 1/8, 1/4, 1/2
    heads: int = 8
    ts_encoder_layers: int = 3
    ts_decoder_layers: int = 2
    tc_layers: int = 3
    ff_multiplier: int = 2
    pos_grid: tuple[int, int, int] = (9, 10, 12)  # learned table size (144x160x192 / 16), interpolated
    velocity_level: int = 1  # predict v at 1 / 2**velocity_level resolution (0 or 1)
    integration_steps: int = spatial.DEFAULT_INTEGRATION_STEPS
    alpha_conditioned: bool = True
    alpha: float = DEFAULT_ALPHA  # training alpha of a non-conditioned model; the default alpha otherwise
    alpha_range: tuple[float, float] = ALPHA_RANGE

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        if self.velocity_level not in (0, 1):
            raise ValueError("velocity_level must be 0 (full) or 1 (half resolution)")
        if len(self.enc_channels) != 4 or len(self.dec_channels) != 4:
            raise ValueError("a five-level U-Net needs 4 encoder and 4 decoder widths")
        for name in ("enc_channels", "dec_channels", "pos_grid", "alpha_range"):
            setattr(self, name, tuple(getattr(self, name)))

    @property
    def uses_ts(self) -> bool:
        return self.variant in ("dtn", "dtn_s")

    @property
    def uses_tc(self) -> bool:
        return self.variant in ("dtn", "dtn_c")

    @property
    def bottleneck_channels(self) -> int:
        return (self.q_s if self.uses_ts else 0) + self.q_c

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DTNConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown DTN configuration keys: {sorted(unknown)}")
        return cls(**data)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    # In place: the convolution's output is not needed for its gradient, and the network ran 16 % faster on a CPU.
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2, inplace=True))


class Encoder(nn.Module):
    """Five-level encoder: a convolution at full resolution, then four stride-2 convolutions."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], bottleneck: int) -> None:
        super().__init__()
        chans = [in_channels, *widths, bottleneck]
        self.levels = nn.ModuleList(
            [_conv(chans[i], chans[i + 1], stride=1 if i == 0 else 2) for i in range(len(chans) - 1)]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats  # resolutions 1, 1/2, 1/4, 1/8, 1/16


class LearnedPositions(nn.Module):
    """A learnable 3-D positional table, trilinearly resized to the bottleneck grid at hand."""

    def __init__(self, channels: int, grid: tuple[int, int, int]) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, channels, *grid) * 0.02)

    def forward(self, shape: tuple[int, int, int]) -> torch.Tensor:
        table = self.table
        if tuple(table.shape[2:]) != tuple(shape):
            table = F.interpolate(table, size=shape, mode="trilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)  # (1, N, C)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, C, D, H, W) -> (B, N, C)


def _volume(tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *shape)


class SeparateTransformer(nn.Module):
    """T_s: encoder over both images' tokens (self- and cross-image attention), decoder queried by the fixed image."""

    def __init__(self, cfg: DTNConfig) -> None:
        super().__init__()
        d = cfg.q_s
        self.positions = LearnedPositions(d, cfg.pos_grid)
        self.image_index = nn.Parameter(torch.randn(2, d) * 0.02)  # 0 = moving, 1 = fixed
        enc = nn.TransformerEncoderLayer(d, cfg.heads, d * cfg.ff_multiplier, 0.0, batch_first=True, norm_first=True)
        dec = nn.TransformerDecoderLayer(d, cfg.heads, d * cfg.ff_multiplier, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, cfg.ts_encoder_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(dec, cfg.ts_decoder_layers)

    def forward(self, f_moving: torch.Tensor, f_fixed: torch.Tensor) -> torch.Tensor:
        shape = tuple(f_fixed.shape[2:])
        pos = self.positions(shape)
        tm = _tokens(f_moving) + pos + self.image_index[0]
        tf = _tokens(f_fixed) + pos + self.image_index[1]
        memory = self.encoder(torch.cat([tm, tf], dim=1))
        return _volume(self.decoder(tf, memory), shape)


class ConcatTransformer(nn.Module):
    """T_c: self-attention over the concatenated pair's embedding."""

    def __init__(self, cfg: DTNConfig) -> None:
        super().__init__()
        d = cfg.q_c
        self.positions = LearnedPositions(d, cfg.pos_grid)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, d * cfg.ff_multiplier, 0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.tc_layers, enable_nested_tensor=False)

    def forward(self, f_concat: torch.Tensor) -> torch.Tensor:
        shape = tuple(f_concat.shape[2:])
        return _volume(self.encoder(_tokens(f_concat) + self.positions(shape)), shape)


class AlphaFiLM(nn.Module):
    """Per-channel scale and shift of the decoder features from log10(alpha); starts as the identity."""

    def __init__(self, widths: tuple[int, ...], hidden: int = 32) -> None:
        super().__init__()
        self.widths = list(widths)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 2 * sum(widths)))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, alpha: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = self.mlp(torch.log10(alpha).view(-1, 1))
        out, start = [], 0
        for w in self.widths:
            gamma, beta = params[:, start : start + w], params[:, start + w : start + 2 * w]
            out.append((gamma.view(-1, w, 1, 1, 1), beta.view(-1, w, 1, 1, 1)))
            start += 2 * w
        return out


class DTN(nn.Module):
    """A model of the DTN family; ``forward(moving, fixed, alpha)`` returns the velocity field."""

    def __init__(self, cfg: DTNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.uses_ts:
            self.phi_s = Encoder(1, cfg.enc_channels, cfg.q_s)
            self.t_s = SeparateTransformer(cfg)
        self.phi_c = Encoder(2, cfg.enc_channels, cfg.q_c)
        if cfg.uses_tc:
            self.t_c = ConcatTransformer(cfg)
        dec = cfg.dec_channels
        skips = list(reversed(cfg.enc_channels))  # 1/8, 1/4, 1/2, 1
        self.bottleneck = _conv(cfg.bottleneck_channels, dec[0])
        self.up_blocks = nn.ModuleList([_conv(dec[i] + skips[i], dec[i + 1]) for i in range(3)])
        widths = [dec[0], dec[1], dec[2], dec[3]]
        if cfg.velocity_level == 0:
            self.full_block = _conv(dec[3] + skips[3], dec[3])
            widths.append(dec[3])
        self.film = AlphaFiLM(tuple(widths)) if cfg.alpha_conditioned else None
        # He initialisation keeps the feature scale through the ten LeakyReLU convolutions; with PyTorch's
        # default (a third of the variance kept per layer) the decoder's features reached the head at about
        # 6 % of the input's scale (measured), and a near-zero head then needed very many Adam steps to move.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, a=0.2, nonlinearity="leaky_relu")
                nn.init.zeros_(module.bias)
        self.velocity_head = nn.Conv3d(dec[3], 3, 3, padding=1)
        nn.init.normal_(self.velocity_head.weight, std=1e-5)
        nn.init.zeros_(self.velocity_head.bias)

    def check_inputs(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        """Raise a ValueError naming the problem with a pair the network cannot take."""
        for name, t in (("moving", moving), ("fixed", fixed)):
            if t.dim() != 5 or t.shape[1] != 1:
                raise ValueError(f"{name} must be a (B, 1, D, H, W) tensor, got shape {tuple(t.shape)}")
            bad = [n for n in t.shape[2:] if n % SIZE_MULTIPLE or n == 0]
            if bad:
                raise ValueError(
                    f"{name} size {tuple(t.shape[2:])} is not divisible by {SIZE_MULTIPLE} along every axis"
                )
            if not torch.isfinite(t).all():
                raise ValueError(f"{name} contains NaN or Inf values")
        if moving.shape != fixed.shape:
            raise ValueError(f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} differ in shape")

    def _alpha_tensor(self, alpha: float | torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        a = self.cfg.alpha if alpha is None else alpha
        a = torch.as_tensor(a, dtype=like.dtype, device=like.device).reshape(-1)
        if (a <= 0).any():
            raise ValueError("alpha must be positive")
        return a.expand(batch) if a.numel() == 1 else a

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, alpha: float | torch.Tensor | None = None):
        """Velocity field ``(B, 3, ...)`` in voxel units of the grid it is predicted on."""
        self.check_inputs(moving, fixed)
        feats_c = self.phi_c(torch.cat([moving, fixed], dim=1))
        bottom = [self.t_c(feats_c[-1]) if self.cfg.uses_tc else feats_c[-1]]
        if self.cfg.uses_ts:
            f_m = self.phi_s(moving)[-1]
            f_f = self.phi_s(fixed)[-1]
            bottom.insert(0, self.t_s(f_m, f_f))
        film = self.film(self._alpha_tensor(alpha, moving.shape[0], moving)) if self.film is not None else None

        def modulate(x: torch.Tensor, i: int) -> torch.Tensor:
            if film is None:
                return x
            gamma, beta = film[i]
            return x * (1 + gamma) + beta

        x = modulate(self.bottleneck(torch.cat(bottom, dim=1)), 0)
        skips = list(reversed(feats_c[:-1]))  # 1/8, 1/4, 1/2, 1
        for i, block in enumerate(self.up_blocks):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = modulate(block(torch.cat([x, skips[i]], dim=1)), i + 1)
        if self.cfg.velocity_level == 0:
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = modulate(self.full_block(torch.cat([x, skips[3]], dim=1)), 4)
        return self.velocity_head(x).contiguous()  # channels-last on the CPU (to_device): callers index it plainly

    def symmetric_velocity(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        alpha: float | torch.Tensor | None = None,
        passes: int = 1,
        start: torch.Tensor | None = None,
    ):
        """``(v(moving, fixed) - v(fixed, moving)) / 2``: inverse-consistent by construction, zero for identical
        images. Both directions run as one batch of twice the size.

        A cascade: ``passes`` > 1, or a ``start`` velocity on this pair's velocity grid (a pass of the network on a
        coarser grid, brought onto this one). Each further pass sees the two images warped half-way toward each
        other (moving by exp(v/2), fixed by exp(-v/2)) and adds its symmetric velocity to v. Swapping the images
        negates every term, so the sum stays exactly inverse-consistent (docs/model.md measures the gain)."""
        alpha_t = self._alpha_tensor(alpha, moving.shape[0], moving)
        if start is None:
            start, passes = symmetric(self, moving, fixed, alpha_t), passes - 1
        velocity = start
        shape = tuple(fixed.shape[2:])
        for _ in range(passes):
            moving_half = spatial.warp(moving, self.displacement(velocity / 2, shape))
            fixed_half = spatial.warp(fixed, self.displacement(velocity / 2, shape, inverse=True))
            velocity = velocity + symmetric(self, moving_half, fixed_half, alpha_t)
        return velocity

    def displacement(self, velocity: torch.Tensor, shape: tuple[int, int, int], inverse: bool = False):
        """Integrate a velocity field (``exp(v)``, or ``exp(-v)`` with ``inverse``) and bring it to ``shape``."""
        u = spatial.integrate(-velocity if inverse else velocity, self.cfg.integration_steps)
        return spatial.resize_field(u, shape)

    def register(self, moving: torch.Tensor, fixed: torch.Tensor, alpha: float | None = None):
        """Velocity, displacement and the warped moving image of a pair."""
        v = self(moving, fixed, alpha)
        u = self.displacement(v, tuple(fixed.shape[2:]))
        return v, u, spatial.warp(moving, u)


def symmetric(network, moving: torch.Tensor, fixed: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``(v(m, f) - v(f, m)) / 2`` from one call of ``network`` (a DTN, or its training wrapper) on a batch of
    twice the size; ``alpha`` one value per pair ``(B,)``."""
    batch = moving.shape[0]
    v = network(torch.cat([moving, fixed]), torch.cat([fixed, moving]), alpha.reshape(-1).expand(batch).repeat(2))
    return (v[:batch] - v[batch:]) / 2


def build_model(cfg: DTNConfig | dict | None = None) -> DTN:
    """Build a model from its configuration (a ``DTNConfig``, its dict form, or the default)."""
    if cfg is None:
        cfg = DTNConfig()
    elif isinstance(cfg, dict):
        cfg = DTNConfig.from_dict(cfg)
    return DTN(cfg)


def to_device(model: DTN, device: str | torch.device) -> DTN:
    """Move ``model`` to ``device``, with channels-last 3-D weights on the CPU: oneDNN's convolutions then run
    1.3-2.4x faster at the same results (docs/benchmarks.md, section 1). CUDA keeps the default layout, which is
    the one measured there."""
    device = torch.device(device)
    layout = torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format
    return model.to(device=device, memory_format=layout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["DTN", "DTNConfig", "VARIANTS", "build_model", "count_parameters", "symmetric", "to_device"]
