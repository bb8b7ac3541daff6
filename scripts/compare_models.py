"""Decide whether new weights ship: candidates against the shipped model, side by side in one run.

    python scripts/compare_models.py runs/x/best.safetensors [more.safetensors ...] [--baseline default]

The model card's rule (issue 11): new weights ship only when they score better, in the same run, on held-out
synthetic pairs *and* on the real development pairs. Scored, for every model:
- ``held-out 4 mm``: the GPU job's validation set on the 4 mm training grid (``.gpu/real4mm.npz`` from
  ``scripts/make_gpu_bundle.py --spacing-mm 4 --shape 48 64 48 --name real4mm.npz --no-simpleitk``): held-out synthetic
  pairs, known deformations of the real brains and real cross-subject pairs, with the symmetric velocity the
  pipeline uses, and no affine or refinement;
- through ``register()``, the network alone (``refine=0``) and the ``fast`` preset, on the 1 mm development pairs of
  scripts/benchmark_registration.py, the 2 mm development pairs and the synthetic pairs of scripts/make_results.py.
Each pair is aligned once and every model starts from that alignment. About 10 minutes for two models on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_job  # noqa: E402
from benchmark_registration import prepare_pairs  # noqa: E402
from make_results import prepare_dev, prepare_synthetic  # noqa: E402

from DTNRegistrationLib.core import alignment, metrics, models  # noqa: E402
from DTNRegistrationLib.core.registration import register  # noqa: E402
from DTNRegistrationLib.evaluate import inputs as evaluation_inputs  # noqa: E402
from DTNRegistrationLib.train import pairs as train_pairs  # noqa: E402

MODES = {"alone": {"refine": 0}, "fast": {"preset": "fast"}}
HELD_OUT_SHAPE = (48, 64, 48)


def held_out(loaded: dict, bundle: Path, count: int) -> dict[str, dict[str, float]]:
    """Mean Dice per validation group on the 4 mm grid, per model."""
    real = train_pairs.load_prepared(bundle)
    val = gpu_job.validation_set(real, HELD_OUT_SHAPE, count, torch.device("cpu"))
    out = {}
    for name, model in loaded.items():
        if model.spacing_mm != 4.0:
            continue
        scores = gpu_job.score(model.model.eval(), val, model.config.alpha, amp=False)
        out[name] = {group: row["dice"] for group, row in scores.items()}
    return out


def labelled_pairs(pairs_csv: Path) -> list[dict]:
    """The labelled pairs of a pairs CSV, as the dicts ``prepare_pairs`` gives."""
    return [vars(pair) for pair in evaluation_inputs.pairs_from_csv(pairs_csv) if pair.moving_labels]


def pipeline(loaded: dict, pairs: list[dict], use_affine: bool) -> dict[str, dict[str, list[float]]]:
    """Dice of every pair, per model and mode: {model: {mode: [dice per pair]}}; also each mode's SDlogJ
    ("MODE sdlogj") and folding % ("MODE folding") per pair."""
    keys = [f"{mode}{suffix}" for mode in MODES for suffix in ("", " sdlogj", " folding")]
    out: dict[str, dict[str, list[float]]] = {name: {key: [] for key in keys} for name in loaded}
    for pair in pairs:
        read = {k: sitk.ReadImage(str(pair[k])) for k in ("moving", "fixed", "moving_labels", "fixed_labels")}
        mask = sitk.ReadImage(str(pair["mask"])) if pair.get("mask") else None
        read["moving"], read["fixed"] = (sitk.Cast(read[k], sitk.sitkFloat32) for k in ("moving", "fixed"))
        prepared = alignment.align(
            read["moving"], read["fixed"], moving_labels=read["moving_labels"], mask=mask, affine=use_affine
        )
        fixed_labels = sitk.GetArrayFromImage(read["fixed_labels"])
        for name, model in loaded.items():
            for mode, options in MODES.items():
                result = register(
                    read["moving"],
                    read["fixed"],
                    moving_labels=read["moving_labels"],
                    mask=mask,
                    model=model,
                    device="cpu",
                    affine=use_affine,
                    inverse=False,
                    prepared=prepared,
                    **options,
                )
                warped = sitk.GetArrayFromImage(result.warped_labels)
                out[name][mode].append(metrics.mean_dice(warped, fixed_labels))
                out[name][f"{mode} sdlogj"].append(result.metrics["sd_log_jacobian"])
                out[name][f"{mode} folding"].append(result.metrics["folding_percent"])
        print(f"  {pair['name']}: " + ", ".join(f"{n} {out[n]['alone'][-1]:.4f}/{out[n]['fast'][-1]:.4f}" for n in out))
    return out


def print_pipeline(title: str, scores: dict, baseline: str) -> None:
    names = list(scores)
    print(f"\n### {title}: mean Dice (network alone / fast), paired difference against {baseline}\n")
    print("| model | alone | fast | alone - base (wins) | fast - base (wins) | SDlogJ alone / fast | max folding % |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        cells = [f"{statistics.fmean(scores[name][m]):.4f}" for m in MODES]
        for mode in MODES:
            diff = np.subtract(scores[name][mode], scores[baseline][mode])
            cells.append(f"{diff.mean():+.4f} ({int((diff > 0).sum())}/{diff.size})")
        cells.append(" / ".join(f"{statistics.fmean(scores[name][f'{m} sdlogj']):.3f}" for m in MODES))
        cells.append(f"{max(max(scores[name][f'{m} folding']) for m in MODES):.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidates", nargs="+", help="weights files or registered model names")
    parser.add_argument("--baseline", default="default", help="the model to beat (default: the shipped default)")
    parser.add_argument("--devdata", type=Path, default=Path("/tmp/dtn-devdata"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dtn-results"), help="shared with make_results")
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu" / "real4mm.npz")
    parser.add_argument("--held-out-pairs", type=int, default=16)
    parser.add_argument("--synthetic-pairs", type=int, default=8)
    parser.add_argument("--skip-1mm", action="store_true", help="leave out the 1 mm pairs (the slowest part)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    specs = {"base": args.baseline, **{f"cand{i + 1}": c for i, c in enumerate(args.candidates)}}
    loaded = {name: models.load_model(None if spec == "default" else spec) for name, spec in specs.items()}
    for name, spec in specs.items():
        print(f"{name}: {spec} ({loaded[name].name}, sha256 {loaded[name].sha256[:12]})")
    start = time.perf_counter()

    if args.bundle.is_file():
        scores = held_out(loaded, args.bundle, args.held_out_pairs)
        groups = list(next(iter(scores.values())))
        print("\n### Held-out 4 mm validation (symmetric network, no affine): mean Dice\n")
        print("| model | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups))
        for name, row in scores.items():
            print(f"| {name} | " + " | ".join(f"{row[g]:.4f}" for g in groups) + " |")
    else:
        print(f"\n(no {args.bundle}: the held-out 4 mm set is left out; see the docstring)")

    sets = []
    if not args.skip_1mm:
        (args.work_dir / "pairs-1mm").mkdir(parents=True, exist_ok=True)
        sets.append(("1 mm development pairs", prepare_pairs(args.devdata, args.work_dir / "pairs-1mm"), True))
    sets.append(("2 mm development pairs", labelled_pairs(prepare_dev(args.devdata, args.work_dir / "dev")), True))
    synthetic_csv = prepare_synthetic(args.work_dir / "synthetic", args.synthetic_pairs)
    sets.append(("2 mm synthetic pairs", labelled_pairs(synthetic_csv), False))
    for title, pairs, use_affine in sets:
        print(f"\n{title}:")
        print_pipeline(title, pipeline(loaded, pairs, use_affine), "base")
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
