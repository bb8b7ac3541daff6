"""``dtnreg train``: the options (each maps onto a ``TrainConfig`` field) and the entry point."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from ..options import SIMILARITY_TERMS
from .config import DATA_FIELDS, TrainConfig


def _flag(parser: argparse.ArgumentParser, name: str, help_text: str) -> None:
    dest = name.replace("-", "_")
    default = getattr(TrainConfig, dest)
    parser.add_argument(
        f"--{name}",
        dest=dest,
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help=f"{help_text} (default: {'on' if default else 'off'})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dtnreg train``; each left out keeps its TrainConfig default (or the resumed run's)."""
    d = TrainConfig()
    g = parser.add_argument_group("output and run")
    _opt = _group_opt(g, d)
    _opt("output-dir", "folder for checkpoints, logs and the final model.safetensors", metavar="DIR")
    _opt("resume", "continue the run whose checkpoint is in DIR exactly (its settings are reused)", metavar="DIR")
    _opt("max-steps", "number of optimiser steps", type=int)
    _opt("max-minutes", "stop (and save) after this many minutes", type=float)
    _opt("seed", "random seed (model initialisation and data)", type=int)
    _opt("device", "auto, cpu, cuda or cuda:N", metavar="DEV")
    _opt("threads", "CPU threads for torch", type=int)
    _opt("checkpoint-every", "steps between checkpoints", type=int)
    _opt("val-every", "steps between validations (0 = never)", type=int)
    _opt("val-synthetic", "number of synthetic validation pairs", type=int)
    _opt("val-same-subject", "validation pairs per labelled real subject (two known deformations of it)", type=int)
    _opt("log-every", "steps between CSV log rows", type=int)
    _flag(g, "amp", "bf16 mixed precision on CUDA")
    _flag(g, "progress", "progress bar")

    g = parser.add_argument_group("data")
    _opt = _group_opt(g, d)
    _flag(g, "synthetic", "train on synthetic pairs (mixed with real images if those are given)")
    _opt("synth-fraction", "share of synthetic pairs when mixing with real images", type=float)
    _opt("synth-labels", "labels per synthetic label map", type=int)
    _opt(
        "synth-contrast",
        "shared or independent label intensities in a synthetic pair",
        choices=["shared", "independent"],
    )
    _opt("images-dir", "folder of training images (random pairs, or moving images with --atlas)", metavar="DIR")
    _opt("images-glob", "file name pattern in --images-dir", metavar="GLOB")
    _opt("labels-dir", "folder of label maps named like the images", metavar="DIR")
    _opt("dataset-json", "Learn2Reg/OASIS dataset JSON", metavar="FILE")
    _opt("prepared-data", "volumes already on the model grid (.npz of scripts/make_gpu_bundle.py)", metavar="FILE")
    _opt("atlas", "fixed atlas image (atlas-based training)", metavar="FILE")
    _opt("atlas-labels", "the atlas's label map", metavar="FILE")
    _opt("template", "image whose grid the real images are aligned to (default: atlas or first image)", metavar="FILE")
    _opt("spacing-mm", "isotropic spacing of the model grid", type=float)
    _opt("shape", "model grid size D H W (array order, multiples of 16)", type=int, nargs=3, metavar="N")
    _opt("align", "affine alignment of real images to the template", choices=["affine", "none"])
    _opt("cache-dir", "folder for preprocessed volumes (default: OUTPUT_DIR/cache)", metavar="DIR")
    _opt("p-same", "probability of a real pair from one subject (two augmentations)", type=float)
    _opt("workers", "threads preparing images", type=int)
    _flag(g, "augment", "affine + elastic + intensity augmentation of real images")

    g = parser.add_argument_group("model and loss")
    _opt = _group_opt(g, d)
    _opt("variant", "architecture", choices=["dtn", "dtn_s", "dtn_c", "none"])
    _flag(g, "alpha-conditioned", "one model for all alphas (alpha sampled log-uniformly each step)")
    _opt("alpha", "smoothness weight (fixed, or the default of a conditioned model)", type=float)
    _opt("alpha-range", "alpha range of a conditioned model", type=float, nargs=2, metavar="A")
    _opt("init", "weights to fine-tune (same architecture)", metavar="WEIGHTS")
    _opt(
        "model-options",
        'other architecture settings as JSON, e.g. \'{"q_s": 64, "heads": 4}\'',
        type=_json_dict,
        metavar="JSON",
    )
    _opt("similarity", "similarity term", choices=sorted(SIMILARITY_TERMS))
    _opt("dice-weight", "weight of the soft Dice term on labelled (synthetic) pairs", type=float)
    _flag(g, "dice-real", "also use real label maps in the Dice term")
    _opt("field-weight", "weight of the end-point error to the true field of synthetic pairs (supervised)", type=float)
    _flag(g, "symmetric", "train the symmetric velocity (v(m, f) - v(f, m)) / 2 that the pipeline uses (2x per step)")
    _opt("lr", "Adam learning rate", type=float)
    _opt("lr-schedule", "constant, or cosine down to lr/10 by max steps or max minutes", choices=["constant", "cosine"])
    _opt("warmup-steps", "linear learning-rate warm-up", type=int)
    _opt("betas", "Adam betas", type=float, nargs=2, metavar="B")
    _opt("batch-size", "pairs per step", type=int)
    _opt("grad-clip", "gradient norm clipping (0 = off)", type=float)


def _group_opt(group, defaults: TrainConfig):
    def opt(name: str, help_text: str, **kw) -> None:
        dest = name.replace("-", "_")
        if "metavar" not in kw and "choices" not in kw and kw.get("type") in (int, float):
            kw["metavar"] = "N" if kw["type"] is int else "X"
        if "default:" not in help_text:
            help_text = f"{help_text} (default: {defaults.to_dict()[dest]})"
        group.add_argument(
            f"--{name}",
            dest=dest,
            default=argparse.SUPPRESS,
            help=help_text,
            **kw,
        )

    return opt


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's configuration: the options given, over the resumed run's settings or the defaults."""
    known = {f.name for f in dataclasses.fields(TrainConfig)} | set(DATA_FIELDS)
    given = {k: v for k, v in vars(args).items() if k in known}
    if given.get("resume"):
        from .checkpoints import load_state  # torch: not needed to build the parser

        state = load_state(given["resume"])
        base = json.loads(state["train_config"])
        base.setdefault("output_dir", given["resume"])
        base["output_dir"] = given.get("output_dir", given["resume"])
        base.pop("init", None)
        return TrainConfig.from_dict(base | given)
    if "output_dir" not in given:
        raise ValueError("give --output-dir (or --resume DIR)")
    return TrainConfig.from_dict(given)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dtnreg train", description="Train a DTN-family model (resumable, multi-GPU through torchrun)."
    )
    add_arguments(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """``dtnreg train``: returns the exit status (2 for bad input, with the reason on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = config_from_args(args)
        from .trainer import train

        final = train(cfg)
    except (ValueError, FloatingPointError) as err:  # InputError, DataError and ModelError are ValueErrors
        print(f"dtnreg train: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_args()))
