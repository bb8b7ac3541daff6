"""The ``dtnreg`` command line: register | batch | batch-merge | demo | train | benchmark | evaluate.

Exit codes: 0 success, 2 bad input (one line on stderr naming the file and the problem), 3 (batch, batch-merge)
some pairs failed or are still pending while the others were done, 1 anything else.

``--progress-format jsonl`` is for programs that run the engine as a child process (the Slicer module): one JSON
object a line on stdout, ``{"fraction": 0.41, "message": "refining: step 1/25, ..."}`` for each stage and each
refinement step; the first line carries the process id (``pid``), the last one of each pair ``output_dir`` and
``report``, and a failure ``error`` (one line), ``kind`` and ``exit_code``. Nothing else is written to stdout.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError, ModelError
from ..files import RESOURCES_DIR, image_stem
from .arguments import build_parser, registration_options, requested_options

SAMPLES_DIR = RESOURCES_DIR / "Samples"
SAMPLE = {
    "moving": SAMPLES_DIR / "moving_itk_head_brain.nii.gz",
    "fixed": SAMPLES_DIR / "fixed_icbm2009a_t1_2mm.nii.gz",
    "moving_labels": SAMPLES_DIR / "moving_itk_head_tissue.nii.gz",
    "fixed_labels": SAMPLES_DIR / "fixed_icbm2009a_tissue_2mm.nii.gz",
}


class _Progress:
    """A tqdm bar on stderr fed by the engine's progress callback."""

    def __init__(self, quiet: bool, label: str = "") -> None:
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(
                total=100, file=sys.stderr, desc=label, bar_format="{desc} {bar} {percentage:3.0f}% {postfix}"
            )

    def __call__(self, fraction: float, message: str) -> None:
        if self.bar is not None:
            self.bar.n = int(round(100 * fraction))
            self.bar.set_postfix_str(message, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def emit_json(**fields) -> None:
    """One JSON line on stdout, flushed at once: a parent process reads it while the engine runs."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class _JsonProgress:
    """The engine's progress callback as JSON lines on stdout (``--progress-format jsonl``)."""

    def __call__(self, fraction: float, message: str) -> None:
        emit_json(fraction=round(float(fraction), 4), message=str(message))

    def close(self) -> None:
        pass


def _progress(args, label: str):
    if getattr(args, "progress_format", "bar") == "jsonl":
        return _JsonProgress()
    return _Progress(args.quiet, label)


def _run_pair(
    args, loaded, moving, fixed, output_dir, moving_labels=None, fixed_labels=None, mask=None, scene=None, **more
):
    """Read, register and write one pair; returns the result. Nothing is left behind on failure."""
    from ..core import alignment, imaging, outputs
    from .batch import input_fingerprints

    extension = outputs.check_extension(args.format)
    stage = outputs.StagedOutput(output_dir)
    progress = _progress(args, Path(moving).name)
    try:
        moving_img = imaging.read_image(moving, "moving image")
        fixed_img = imaging.read_image(fixed, "fixed image")
        m_labels = imaging.read_labels(moving_labels, moving_img, "moving labels") if moving_labels else None
        f_labels = imaging.read_labels(fixed_labels, fixed_img, "fixed labels") if fixed_labels else None
        mask_img = imaging.read_labels(mask, fixed_img, "mask") if mask else None
        moving_mask = more.get("moving_mask")
        moving_mask_img = imaging.read_labels(moving_mask, moving_img, "moving mask") if moving_mask else None
        named = {"moving": moving, "fixed": fixed, "moving_labels": moving_labels, "fixed_labels": fixed_labels}
        named.update(mask=mask, moving_mask=moving_mask)
        inputs = {key: None if value is None else str(value) for key, value in named.items()}
        # what these outputs were made from, taken before the work: `dtnreg batch` skips a pair when it matches
        provenance = {"input_files": input_fingerprints(inputs), "options": requested_options(args)}
        options = registration_options(args)
        images = dict(moving_labels=m_labels, fixed_labels=f_labels, mask=mask_img, moving_mask=moving_mask_img)
        start = dict(affine=options.affine, rigid=options.rigid, progress=progress)
        prepared = alignment.align(moving_img, fixed_img, **images, **start)
        loaded = loaded.result() if isinstance(loaded, Future) else loaded
        from ..core import registration  # torch: loaded by now

        result = registration.register(
            moving_img,
            fixed_img,
            **images,
            model=loaded,
            inverse="inverse" in options.outputs,
            progress=progress,
            prepared=prepared,
            **options.register_keywords(),
        )
        outputs.write_result(result, stage, extension, inputs, provenance, options.outputs)
        if scene:
            from ..mrml import write_scene_from_files

            names = (image_stem(moving), image_stem(fixed))
            write_scene_from_files(moving_img, fixed_img, result, stage.path(Path(scene).name), m_labels, names=names)
        written = stage.commit()
        if scene and Path(scene).parent.resolve() != Path(output_dir).resolve():
            Path(scene).parent.mkdir(parents=True, exist_ok=True)
            Path(output_dir, Path(scene).name).replace(scene)
        progress.close()
        if isinstance(progress, _JsonProgress):
            out = Path(output_dir).resolve()
            names = [path.name for path in written]
            emit_json(fraction=1.0, message="done", output_dir=str(out), report=str(out / "report.json"), files=names)
        for warning in result.metrics.get("warnings", []):  # also with --quiet: a result to check, not progress
            print(f"dtnreg: warning: {warning}", file=sys.stderr)
        if not args.quiet:
            _summary(result, written)
        return result
    except BaseException:
        progress.close()
        stage.discard()
        raise


def _summary(result, written) -> None:
    m = result.metrics
    line = f"folding {m['folding_count']} voxels ({m['folding_percent']:.4f} %), {result.timings['total']:.1f} s"
    if m.get("dice_mean") is not None:
        line += f", mean Dice {m['dice_mean']:.3f}"
    print(f"{line}; wrote {len(written)} files to {written[0].parent}", file=sys.stderr)


def _load(args):
    from ..core.models import load_model

    return load_model(args.model)


def _load_in_background(args) -> Future:
    """Import torch and load the weights in a thread (about 1.5 s) while the main thread reads and aligns the
    images: SimpleITK releases the GIL, so on two cores the two overlap. Errors surface at ``result()``."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtnreg-load")
    loading = pool.submit(_load, args)
    pool.shutdown(wait=False)  # the task runs on; the pool takes no more
    return loading


def cmd_register(args) -> int:
    _run_pair(
        args,
        _load_in_background(args),
        args.moving,
        args.fixed,
        args.output_dir,
        args.moving_labels,
        args.fixed_labels,
        args.mask,
        args.scene,
        moving_mask=args.moving_mask,
    )
    return 0


def cmd_batch(args) -> int:
    from .batch import batch_rows, parse_shard, run_batch

    parse_shard(args.shard)  # bad input is reported once, before the model is loaded
    requested_options(args)
    rows = batch_rows(args)
    return run_batch(args, rows, _load(args), _run_pair)


def cmd_batch_merge(args) -> int:
    from .batch import merge_summaries

    return merge_summaries(args.output_dir)


def cmd_demo(args) -> int:
    from ..core import imaging
    from .figures import summary_figure

    missing = [str(p) for p in SAMPLE.values() if not p.is_file()]
    if missing:
        raise InputError(f"bundled sample missing: {', '.join(missing)}")
    result = _run_pair(
        args,
        _load(args),
        SAMPLE["moving"],
        SAMPLE["fixed"],
        args.output_dir,
        SAMPLE["moving_labels"],
        SAMPLE["fixed_labels"],
    )
    figure = Path(args.output_dir) / "summary.png"
    summary_figure(result, imaging.read_image(SAMPLE["moving"]), imaging.read_image(SAMPLE["fixed"]), figure)
    print(f"figure: {figure}", file=sys.stderr)
    return 0


def cmd_benchmark(args) -> int:
    from ..evaluate.benchmark import run_benchmark

    run_benchmark(args)
    return 0


def cmd_train(args) -> int:
    try:
        from ..train.cli import main as train_main
    except ImportError as err:
        raise InputError(f"training is not available: {err}") from None
    return int(train_main(args) or 0)


def cmd_evaluate(args) -> int:
    try:
        from ..evaluate.cli import main as evaluate_main
    except ImportError as err:
        raise InputError(f"evaluation is not available: {err}") from None
    return int(evaluate_main(args))


COMMANDS = {
    "register": cmd_register,
    "batch": cmd_batch,
    "batch-merge": cmd_batch_merge,
    "demo": cmd_demo,
    "benchmark": cmd_benchmark,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    jsonl = getattr(args, "progress_format", "bar") == "jsonl"
    if jsonl:
        emit_json(fraction=0.0, message="started", pid=os.getpid())
    try:
        return COMMANDS[args.command](args)
    except InputError as err:
        return _fail(jsonl, f"dtnreg: error: {err}", 2, "input")
    except ModelError as err:
        return _fail(jsonl, f"dtnreg: error: {err}", 2, "model")
    except KeyboardInterrupt:
        return _fail(jsonl, "dtnreg: interrupted; no partial output was kept", 1, "interrupted")
    except MemoryError:
        return _fail(jsonl, "dtnreg: failed: out of memory (host RAM); try a smaller image or fewer steps", 1, "memory")
    except Exception as err:  # noqa: BLE001 - the contract: one line, exit 1
        if _gpu_out_of_memory(err):
            return _fail(jsonl, "dtnreg: failed: the GPU ran out of memory; try --device cpu", 1, "memory")
        return _fail(jsonl, f"dtnreg: failed: {type(err).__name__}: {err}", 1, "failed")


def _gpu_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, asked of torch only where it is loaded (a run that failed before needing it
    did not import it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def _fail(jsonl: bool, line: str, code: int, kind: str) -> int:
    """The one-line reason on stderr (and, for a parent process, on stdout as JSON); returns the exit code."""
    line = " ".join(line.split())  # one line, whatever the exception's text
    if jsonl and kind not in ("input", "model"):  # a parent keeps stderr as its log: the traceback goes there
        traceback.print_exc(file=sys.stderr)
    print(line, file=sys.stderr)
    if jsonl:
        emit_json(error=line.removeprefix("dtnreg: "), kind=kind, exit_code=code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
