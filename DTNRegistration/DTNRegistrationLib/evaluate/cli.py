"""The ``dtnreg evaluate`` subcommand: its arguments, and bad input reported before any work (exit 2)."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from ..options import RegistrationOptions, device_argument
from .inputs import PairSpec, check_pairs, pairs_from_atlas, pairs_from_csv, pairs_from_dataset_json
from .run import DEFAULT_ALPHAS, evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``dtnreg evaluate``."""
    src = parser.add_argument_group("pairs (one of)")
    src.add_argument("--pairs", help="CSV with columns moving,fixed,moving_labels,fixed_labels[,mask,moving_mask,name]")
    src.add_argument("--dataset-json", help="Learn2Reg/OASIS dataset JSON (registration_val pairs, or validation)")
    src.add_argument("--atlas", help="atlas mode: fixed image; every image of --images-dir is registered onto it")
    src.add_argument("--atlas-labels", help="the atlas's label map")
    src.add_argument("--atlas-mask", help="the atlas's brain mask")
    src.add_argument("--images-dir", help="atlas mode: folder of moving images")
    src.add_argument("--labels-dir", help="atlas mode: folder of their label maps (same file names)")
    src.add_argument("--images-glob", default="*", help="atlas mode: which files of --images-dir")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["identity", "affine", "dtn:default"],
        help="e.g. identity affine dtn:default dtn:/path/w.safetensors:refine=20 syn (see docs/results.md)",
    )
    parser.add_argument("--output-dir", required=True, help="CSV, report.md, figures and the resumable cache")
    parser.add_argument(
        "--label-table", default="freesurfer", help="freesurfer (bundled subset), numbers, or a LUT/JSON file"
    )
    parser.add_argument(
        "--alphas", default=DEFAULT_ALPHAS, help="alphas of the Fig. 2(b) sweep (comma-separated; '' to skip)"
    )
    parser.add_argument("--alpha-pair", help="pair name for the alpha sweep (default: the first labelled pair)")
    parser.add_argument("--device", default="auto", type=device_argument, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--title", default="Registration evaluation", help="the report's title")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def pairs_from_args(args: argparse.Namespace) -> list[PairSpec]:
    given = [bool(args.pairs), bool(args.dataset_json), bool(args.atlas or args.images_dir)]
    if sum(given) != 1:
        raise InputError("give exactly one of --pairs CSV, --dataset-json JSON, or --atlas IMAGE --images-dir DIR")
    if args.pairs:
        return pairs_from_csv(args.pairs)
    if args.dataset_json:
        return pairs_from_dataset_json(args.dataset_json)
    if not (args.atlas and args.images_dir):
        raise InputError("atlas mode needs both --atlas IMAGE and --images-dir DIR")
    return pairs_from_atlas(
        args.atlas, args.images_dir, args.atlas_labels, args.labels_dir, args.images_glob, args.atlas_mask
    )


def parse_alphas(text: str | None) -> tuple[float, ...]:
    try:
        alphas = tuple(float(a) for a in (text or "").replace(" ", "").split(",") if a)
    except ValueError:
        raise InputError(f"--alphas: expected comma-separated numbers, got {text!r}") from None
    for alpha in alphas:
        try:
            RegistrationOptions(alpha=alpha)
        except InputError as err:
            raise InputError(f"--alphas: {err}") from None
    return alphas


def main(args: argparse.Namespace) -> int:
    """``dtnreg evaluate``: 0 on success, 2 for bad input (reported before any work)."""
    from ..errors import ModelError
    from .baselines import parse_methods
    from .labels import load_label_table

    try:
        pairs = pairs_from_args(args)
        check_pairs(pairs)
        table = load_label_table(args.label_table)
        alphas = parse_alphas(args.alphas)
        methods = parse_methods(args.methods, args.device)
        run = evaluate(
            pairs,
            methods,
            args.output_dir,
            table=table,
            alphas=alphas,
            alpha_pair=args.alpha_pair,
            title=args.title,
            quiet=args.quiet,
        )
    except (InputError, ModelError) as err:
        print(f"dtnreg evaluate: error: {err}", file=sys.stderr)
        return 2
    print(
        f"evaluated {len(pairs)} pairs x {len(methods)} methods ({run.computed} computed, {run.reused} reused); "
        f"report: {run.files['report.md']}",
        file=sys.stderr,
    )
    return 0


__all__ = ["add_arguments", "main"]
