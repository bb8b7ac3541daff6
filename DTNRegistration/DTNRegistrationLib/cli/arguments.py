"""The ``dtnreg`` arguments: the subcommands, and the registration options every registering subcommand takes."""

from __future__ import annotations

import argparse

from .. import __version__
from ..options import (
    DEFAULT_OUTPUTS,
    DEFAULT_SIMILARITY,
    OUTPUT_NAMES,
    PRESET_NAMES,
    SIMILARITY_NAMES,
    RegistrationOptions,
    device_argument,
)


def _output_list(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(OUTPUT_NAMES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown output(s) {unknown}; choose from {','.join(OUTPUT_NAMES)}")
    return names


def add_registration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alpha", type=float, default=None, help="smoothness weight (default: the model's)")
    parser.add_argument("--device", default="auto", type=device_argument, help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--model", default=None, help="shipped model name or a .safetensors path")
    parser.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help="refinement schedule: fast (default; coarse to fine at 4 and 2 mm), accurate (adds a 1 mm level, "
        "smoother map) or longitudinal (two scans of one person: rigid alignment, no network, no deformation where "
        "the images agree)",
    )
    parser.add_argument(
        "--refine", type=int, default=None, help="N steps on the 2 mm grid instead of the preset (0: network alone)"
    )
    parser.add_argument(
        "--outputs",
        type=_output_list,
        default=DEFAULT_OUTPUTS,
        help=f"files to write, comma-separated from {','.join(OUTPUT_NAMES)} (default: {','.join(DEFAULT_OUTPUTS)};"
        " report.json always; warped_labels whenever labels are given)",
    )
    parser.add_argument(
        "--refine-similarity",
        choices=SIMILARITY_NAMES,
        default=DEFAULT_SIMILARITY,
        help="similarity of the refinement: auto (default; ncc for one contrast, ngf when the contrasts differ, "
        "e.g. T2 or FLAIR against T1; the choice is in report.json), ncc, ngf (normalised gradient fields), mind "
        "(MIND-SSC descriptors), l1, mse",
    )
    parser.add_argument("--no-affine", action="store_true", help="skip the affine initialisation")
    parser.add_argument("--format", default=".nii.gz", help="output image format: .nii.gz, .nii, .nrrd, .mha")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--progress-format",
        choices=["bar", "jsonl"],
        default="bar",
        help="bar: a progress bar on stderr (default); jsonl: one JSON line per stage and step on stdout",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtnreg", description="Dual Transformer Network brain MRI registration")
    parser.add_argument("--version", action="version", version=f"dtnreg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register one moving image onto one fixed image")
    reg.add_argument("--moving", required=True, help="image to deform (NIfTI, NRRD, MetaImage or a DICOM folder)")
    reg.add_argument("--fixed", required=True, help="image to register onto: the outputs are on its grid")
    reg.add_argument("--moving-labels", help="label map of the moving image, warped onto the fixed image")
    reg.add_argument("--fixed-labels", help="label map of the fixed image: Dice per label in report.json")
    reg.add_argument("--mask", help="fixed-image mask restricting the similarity (e.g. a brain mask)")
    reg.add_argument(
        "--moving-mask",
        help="moving-image mask: where it is 0 (a lesion or resection cavity the fixed image lacks) is left out of "
        "the similarity",
    )
    reg.add_argument("--output-dir", required=True, help="folder for the outputs and report.json (created)")
    reg.add_argument("--scene", help="also write a Slicer scene (.mrb) with the result nodes (needs slicer-core)")
    add_registration_options(reg)

    batch = sub.add_parser("batch", help="many pairs with one loaded model: a CSV of pairs, or one atlas")
    batch.add_argument(
        "--pairs", help="CSV with columns moving,fixed[,moving_labels,fixed_labels,mask,moving_mask,name]"
    )
    batch.add_argument("--fixed", help="atlas mode: one fixed image ...")
    batch.add_argument("--moving", nargs="+", help="... and many moving images")
    batch.add_argument("--output-dir", required=True, help="one sub-folder per pair, and batch_summary.csv")
    batch.add_argument(
        "--shard",
        metavar="K/N",
        help="only every N-th pair, starting with the K-th (K from 1 to N): a job array's part",
    )
    add_registration_options(batch)

    merge = sub.add_parser("batch-merge", help="merge the summaries of `dtnreg batch --shard K/N` runs")
    merge.add_argument("--output-dir", required=True, help="the shards' common --output-dir")

    demo = sub.add_parser("demo", help="register the bundled sample pair and draw a figure")
    demo.add_argument("--output-dir", default="demo-output", help="folder for the outputs (default: demo-output)")
    add_registration_options(demo)

    bench = sub.add_parser("benchmark", help="print speed and memory figures of the network")
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--sizes", default="144x160x192,160x192x224")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--variant", default="dtn")

    train = sub.add_parser("train", help="train a model (see the README)")
    try:
        from ..train.cli import add_arguments

        add_arguments(train)
    except ImportError:  # training extras missing: the subcommand says so when used
        pass

    evaluate = sub.add_parser("evaluate", help="compare methods on labelled pairs: Table 1, t-tests, figures")
    try:
        from ..evaluate.cli import add_arguments as add_evaluation_arguments

        add_evaluation_arguments(evaluate)
    except ImportError:  # as for train: the subcommand says so when used
        pass
    return parser


def registration_options(args: argparse.Namespace) -> RegistrationOptions:
    """The registration options of a registering subcommand (``InputError`` for a bad value)."""
    return RegistrationOptions(
        alpha=args.alpha,
        device=args.device,
        model=args.model,
        preset=args.preset,
        refine=args.refine,
        refine_similarity=args.refine_similarity,
        affine=not args.no_affine,
        outputs=args.outputs,
    )


def requested_options(args: argparse.Namespace) -> dict:
    """What ``report.json`` records as asked for: the options that change a pair's outputs, and the format."""
    from ..core.outputs import check_extension  # SimpleITK: loaded only when a subcommand registers

    return {**registration_options(args).provenance(), "format": check_extension(args.format)}
