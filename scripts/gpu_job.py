"""The one-command GPU job: train, validate, benchmark, and leave at most 8 small files in one folder.

Run by ``scripts/gpu_train.sh run`` on the GPU machine (Python 3.12, torch, numpy, safetensors; no SimpleITK:
training reads the prepared bundle of ``scripts/make_gpu_bundle.py``), and by the test suite for a few steps on
the CPU. Phases, each of which runs even when an earlier one failed (the exit status says so):

1. train each ``--variants`` model for ``--minutes`` (bf16, batch > 1, synthetic pairs generated on the device, real
   volumes copied there once), from ``--init`` weights (default: the shipped default model) or from scratch;
2. validate the starting weights and the trained ones on held-out pairs: synthetic (seed 9001, never trained on),
   real brains under two known random deformations (the answer is known), and real cross-subject tissue pairs;
3. time network inference at the benchmark sizes (fp32 and bf16, both weight layouts) and ``dtnreg register
   --device cuda`` end to end on the bundled demo pair (needs SimpleITK, which the run script unpacks beside the job).

Files in ``--out``: ``<variant>.safetensors`` (final weights), ``<variant>-best.safetensors`` (best validation, one
variant only), ``<variant>-log.csv``, ``validation.json``, ``benchmark.json`` (and the run script's ``job.log``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "DTNRegistration"))

import torch  # noqa: E402

from DTNRegistrationLib.core import metrics, models, spatial  # noqa: E402
from DTNRegistrationLib.core.network import to_device  # noqa: E402
from DTNRegistrationLib.train import pairs, synth  # noqa: E402
from DTNRegistrationLib.train.checkpoints import BEST_WEIGHTS, FINAL_WEIGHTS  # noqa: E402
from DTNRegistrationLib.train.config import DatasetSpec, TrainConfig  # noqa: E402
from DTNRegistrationLib.train.run_log import LOG_FILE  # noqa: E402
from DTNRegistrationLib.train.trainer import Trainer  # noqa: E402

log = logging.getLogger("gpu_job")
HELD_OUT_SEED = 9001  # training samples from its own seed and validates on 12345; these pairs are never seen
SAMPLES = ROOT / "DTNRegistration" / "Resources" / "Samples"
MAX_FILES, MAX_FILE_MB = 8, 16
RESERVED_OPTIONS = ("variant", "alpha_conditioned", "alpha", "alpha_range")  # TrainConfig sets these itself


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True, help="folder made by scripts/make_gpu_bundle.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", nargs="+", default=["dtn"], choices=["dtn", "dtn_s", "dtn_c", "none"])
    p.add_argument("--minutes", type=float, default=6.5, help="training minutes per variant")
    p.add_argument("--steps", type=int, default=1_000_000, help="at most this many steps per variant")
    p.add_argument("--init", default="default", help="weights to start from: 'default' (shipped), a path, or 'none'")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--field-weight", type=float, default=0.1, help="end-point error to synthetic pairs' true field")
    p.add_argument(
        "--symmetric",
        action=argparse.BooleanOptionalAction,
        default=True,  # on the CPU, symmetric runs improved the shipped model; plain runs of that length did not
        help="train the symmetric velocity that the pipeline uses (both directions per pair: twice the work)",
    )
    p.add_argument("--shape", type=int, nargs=3, default=None, help="training grid (default: the bundle's)")
    p.add_argument("--spacing-mm", type=float, default=2.0)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-pairs", type=int, default=8, help="held-out synthetic validation pairs")
    p.add_argument("--bench-sizes", nargs="*", default=["144x160x192", "160x192x224"])
    p.add_argument("--bench-runs", type=int, default=10)
    p.add_argument("--no-register", action="store_true", help="skip the end-to-end dtnreg register timing")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- training


def init_weights(choice: str, variant: str) -> str | None:
    """The weights a run starts from: the shipped default (when its variant matches), a file, or none."""
    if choice == "none":
        return None
    if choice != "default":
        return choice
    reg = models.registry()
    entry = reg["models"].get(reg.get("default") or "")
    if entry is None:
        return None
    return str(models.MODELS_DIR / entry["file"]) if entry["variant"] == variant else None


def train_variant(args, variant: str, work: Path, real_shape) -> tuple[Path, dict]:
    init = init_weights(args.init, variant)
    init_cfg = models.read_weights(init)[1].to_dict() if init else {}  # its architecture, all but what we set
    shape = tuple(args.shape or real_shape)
    cfg = TrainConfig(
        output_dir=str(work / variant),
        synthetic=True,
        synth_fraction=0.5,
        prepared_data=str(args.bundle / "real.npz"),
        p_same=0.5,
        data=DatasetSpec(spacing_mm=args.spacing_mm, shape=shape),
        variant=variant,
        alpha_conditioned=True,
        alpha_range=(0.01, 1.0),
        init=init,
        model_options={k: v for k, v in init_cfg.items() if k not in RESERVED_OPTIONS},
        similarity="ncc",
        dice_weight=1.0,
        field_weight=args.field_weight,
        symmetric=args.symmetric,
        lr=args.lr,
        lr_schedule="cosine",
        warmup_steps=args.warmup,
        betas=(0.9, 0.999),
        batch_size=args.batch,
        grad_clip=1.0,
        max_steps=args.steps,
        max_minutes=args.minutes,
        seed=args.seed,
        device=args.device,
        val_every=args.val_every,
        val_synthetic=4,
        val_same_subject=1,
        checkpoint_every=1000,
        log_every=10,
        progress=False,
    )
    trainer = Trainer(cfg)
    start = time.monotonic()
    final = trainer.run()
    minutes = (time.monotonic() - start) / 60
    info = {
        "variant": variant,
        "init": init,
        "steps": trainer.step,
        "minutes": round(minutes, 2),
        "steps_per_second_first_20": trainer.steps_per_second,
        "steps_per_second": round(trainer.step / max(minutes * 60, 1e-9), 3),
        "pairs_per_second": round(trainer.step * cfg.batch_size / max(minutes * 60, 1e-9), 2),
        "batch": cfg.batch_size,
        "shape": list(shape),
        "best_val_dice_during_training": trainer.best_dice,
        "config": cfg.to_dict(),
    }
    log.info("%s: %d steps in %.1f min (%.2f steps/s)", variant, trainer.step, minutes, info["steps_per_second"])
    return final, info


# ---------------------------------------------------------------------------------------------- validation


def validation_set(real: pairs.RealData, shape, count: int, device) -> list[tuple[str, str, object]]:
    """(group, name, pair): held-out synthetic, known deformations of each labelled real brain, and real
    cross-subject pairs whose label maps name the same structures."""
    out = [("synthetic", n, p) for n, p in pairs.validation_pairs(None, shape, count, HELD_OUT_SEED, device)]
    known = pairs.validation_pairs(real, shape, 0, HELD_OUT_SEED + 1, device, same_subject=2)
    out += [("real_known_deformation", n, p) for n, p in known]
    labelled = [v for v in real.train if v.labels is not None]
    for a in labelled:
        for b in labelled:
            same_structures = set(a.labels.ravel().tolist()) == set(b.labels.ravel().tolist())
            if a is not b and same_structures:
                ma, la = a.tensors()
                fb, lb = b.tensors()
                pair = synth.Pair(ma, fb, la, lb).to(device)
                out.append(("real_cross_subject", f"{a.name}->{b.name}", pair))
    return out


@torch.no_grad()
def score(model, val, alpha: float, amp: bool) -> dict:
    """Mean Dice, folding % and SDlogJ per group (``model`` None: no registration), of the symmetric velocity that
    the pipeline uses (``DTN.symmetric_velocity``)."""
    rows: dict[str, list] = {}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    for group, _, pair in val:
        if model is None:
            u = torch.zeros(1, 3, *pair.fixed.shape[2:], device=pair.fixed.device)
        else:
            with autocast:
                v = model.symmetric_velocity(pair.moving, pair.fixed, alpha)
            u = model.displacement(v.float(), tuple(pair.fixed.shape[2:]))
        jac = metrics.jacobian_determinant(u[0].cpu().numpy())
        warped = spatial.warp(pair.moving_labels, u, mode="nearest")
        dice = metrics.mean_dice(warped.cpu().numpy(), pair.fixed_labels.cpu().numpy())
        rows.setdefault(group, []).append((dice, metrics.folding(jac)[1], metrics.sd_log_jacobian(jac)))
    return {
        group: {
            "pairs": len(r),
            "dice": round(statistics.fmean(x[0] for x in r), 4),
            "folding_percent": round(statistics.fmean(x[1] for x in r), 5),
            "sd_log_jacobian": round(statistics.fmean(x[2] for x in r), 4),
        }
        for group, r in rows.items()
    }


def load(path, device) -> torch.nn.Module:
    return to_device(models.load_weights(path).model, device)


# ---------------------------------------------------------------------------------------------- benchmarks


# Weight layouts timed: channels-last makes the CPU's convolutions 1.3-2.4x faster (network.to_device); whether it
# pays on the GPU too is what these rows say.
LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last_3d}


def time_inference(model, size, device, amp: bool, runs: int, symmetric: bool = False) -> dict:
    """Network + scaling and squaring + warp on one random pair, median of ``runs`` after two warm-ups. One
    direction as in the paper, or ``symmetric``: both directions in one batch, as the pipeline runs it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    moving, fixed = torch.rand(1, 1, *size, device=device), torch.rand(1, 1, *size, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
    times = []
    for _ in range(runs + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast:
            v = model.symmetric_velocity(moving, fixed, 0.1) if symmetric else model(moving, fixed, 0.1)
            u = model.displacement(v.float(), size)
            spatial.warp(moving, u)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {
        "size": "x".join(map(str, size)),
        "precision": "bf16" if amp else "fp32",
        "directions": "symmetric" if symmetric else "one",
        "median_s": round(statistics.median(times[2:]), 4),
        "peak_mb": round(peak, 1),
    }


def time_register(weights: Path, device: str, out: Path) -> list[dict]:
    """``dtnreg register`` on the demo pair in fresh processes: whole-process wall time and the report's stages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "DTNRegistration"), env.get("PYTHONPATH", "")])
    rows = []
    start = time.perf_counter()
    probe = "import torch, SimpleITK, DTNRegistrationLib.cli.commands, DTNRegistrationLib.core.registration;"
    probe += f"torch.zeros(1, device='{device}')"
    subprocess.run([sys.executable, "-c", probe], check=True, env=env)
    startup = time.perf_counter() - start
    for refine in (0, None, 0, None):  # each twice: the first of a kind warms cuDNN's kernel search
        target = out / f"register-{len(rows)}"
        command = [sys.executable, "-m", "DTNRegistrationLib.cli", "register", "--quiet", "--device", device]
        command += ["--model", str(weights), "--output-dir", str(target)]
        command += ["--moving", str(SAMPLES / "moving_itk_head_brain.nii.gz")]
        command += ["--fixed", str(SAMPLES / "fixed_icbm2009a_t1_2mm.nii.gz")]
        command += ["--moving-labels", str(SAMPLES / "moving_itk_head_tissue.nii.gz")]
        command += ["--fixed-labels", str(SAMPLES / "fixed_icbm2009a_tissue_2mm.nii.gz")]
        command += [] if refine is None else ["--refine", str(refine)]
        start = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        wall = time.perf_counter() - start
        report = json.loads((target / "report.json").read_text(encoding="utf-8"))
        rows.append(
            {
                "refine": report["metrics"].get("refine_steps"),
                "wall_s": round(wall, 2),
                "startup_s": round(startup, 2),
                "timings_s": report["timings_s"],
                "dice_mean": report["metrics"].get("dice_mean"),
                "device": report.get("device"),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- main


def phase(name: str, failures: list, fn, *a, **kw):
    """Run one phase; a failure is logged with its traceback and recorded, and the job goes on."""
    log.info("phase: %s", name)
    try:
        return fn(*a, **kw)
    except Exception as err:  # noqa: BLE001 - every phase's failure is reported, none stops the others
        traceback.print_exc()
        failures.append(f"{name}: {type(err).__name__}: {err}")
        return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    amp = device.type == "cuda"
    failures: list[str] = []
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    log.info("environment: %s", env)
    real = pairs.load_prepared(args.bundle / "real.npz")
    real_shape = real.train[0].image.shape
    val = validation_set(real, tuple(args.shape or real_shape), args.val_pairs, device)
    validation: dict = {"environment": env, "identity": score(None, val, 0.1, amp), "runs": {}}
    benchmark: dict = {"environment": env, "inference": [], "register": []}
    with tempfile.TemporaryDirectory(prefix="dtn-gpu-job-") as tmp:
        work = Path(tmp)
        for variant in args.variants:
            result = phase(f"train {variant}", failures, train_variant, args, variant, work, real_shape)
            run_dir = work / variant
            run = {"training": result[1] if result else None}
            init = init_weights(args.init, variant)
            if init:
                run["init"] = phase("validate init", failures, lambda p=init: score(load(p, device), val, 0.1, amp))
            for label, name in (("final", FINAL_WEIGHTS), ("best", BEST_WEIGHTS)):
                path = run_dir / name
                if not path.is_file():
                    continue
                run[label] = phase(f"validate {label}", failures, lambda p=path: score(load(p, device), val, 0.1, amp))
                keep = label == "final" or len(args.variants) == 1
                if keep:
                    suffix = "" if label == "final" else "-best"
                    shutil.copy2(path, args.out / f"{variant}{suffix}.safetensors")
            if (run_dir / LOG_FILE).is_file():
                shutil.copy2(run_dir / LOG_FILE, args.out / f"{variant}-log.csv")
            validation["runs"][variant] = run
            _write_json(args.out / "validation.json", validation | {"failures": failures})
        main_weights = args.out / f"{args.variants[0]}.safetensors"
        if main_weights.is_file():
            model = load(main_weights, device)
            for text in args.bench_sizes:
                size = tuple(int(n) for n in text.split("x"))
                precisions = [False, True] if amp else [False]
                for layout, use_amp, symmetric in itertools.product(LAYOUTS, precisions, [False, True]):
                    model.to(memory_format=LAYOUTS[layout])
                    timing = functools.partial(time_inference, symmetric=symmetric)
                    row = phase(f"inference {text}", failures, timing, model, size, device, use_amp, args.bench_runs)
                    if row:
                        benchmark["inference"].append(row | {"layout": layout})
                        log.info("inference: %s", benchmark["inference"][-1])
            del model
            benchmark["environment"]["simpleitk_importable"] = _simpleitk_importable()
            if not args.no_register:
                rows = phase("register end to end", failures, time_register, main_weights, args.device, work)
                benchmark["register"] = rows or []
                for row in rows or []:
                    log.info("register: %s", row)
        benchmark["failures"] = failures
        _write_json(args.out / "benchmark.json", benchmark)
    validation["failures"] = failures
    _write_json(args.out / "validation.json", validation)
    _check_outputs(args.out)
    for failure in failures:
        log.error("failed: %s", failure)
    return 1 if failures else 0


def _simpleitk_importable() -> bool:
    """Whether SimpleITK can be imported, asked of a child process: this one never imports it."""
    probe = subprocess.run([sys.executable, "-c", "import SimpleITK"], capture_output=True)
    return probe.returncode == 0


def _write_json(path: Path, doc: dict) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(doc), indent=2), encoding="utf-8")


def _check_outputs(out: Path) -> None:
    """What comes back from the GPU machine: at most 8 files of at most 16 MB each, none deeper than ``out``."""
    files = [p for p in out.rglob("*") if p.is_file()]
    big = [f"{p.name} ({p.stat().st_size / 2**20:.1f} MB)" for p in files if p.stat().st_size > MAX_FILE_MB * 2**20]
    if len(files) > MAX_FILES or big:
        log.error("outputs exceed what comes back: %d files (max %d), too large: %s", len(files), MAX_FILES, big)


if __name__ == "__main__":
    raise SystemExit(main())
