"""``dtnreg evaluate``: the paper's Table 1, Fig. 2(b) and Fig. 3 on any labelled dataset, baselines side by side.

Input: pairs with label maps (a CSV, a Learn2Reg/OASIS dataset JSON, or an atlas and a folder), a label table and
the methods to compare (``baselines``). Every file is checked before any work. Each (pair, method) is registered,
timed and scored by the same code: Dice and HD95 (mm) per structure, folding (det J <= 0) and SDlogJ of the map.
Each result is cached as JSON in ``OUTPUT/cache`` under a key made of the input files' contents and the method's
settings (for DTN methods also the weights' SHA-256 and the engine source's digest), so an interrupted evaluation
resumes without recomputing finished pairs. Then ``evaluation_report`` writes ``results.csv`` (every number),
``summary.csv``, ``ttests.csv``, the figures and ``report.md``.

Memory: the process's peak resident set size (Linux VmHWM, reset before each method through
``/proc/self/clear_refs``) minus its RSS before the method (after ``malloc_trim``): what that method added at its
peak, torch and ITK included. Where the reset is not possible, the growth of ``getrusage`` max RSS (a lower bound)
is recorded.
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .inputs import PairSpec, load_pair
from .scores import jacobian, score

EVAL_VERSION = 1
DEFAULT_ALPHAS = "0.01,0.03,0.1,0.3,1"


@dataclass
class EvaluationRun:
    """What ``evaluate`` did: the records, the alpha sweep, how many were computed or reused, the files."""

    records: list[dict]
    sweep: list[dict]
    computed: int
    reused: int
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- measuring


def _proc_status() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MB (empty where /proc is not there)."""
    try:
        with open("/proc/self/status") as handle:
            return {k: int(v.split()[0]) / 1024.0 for k, v in (line.split(":", 1) for line in handle) if k in _VM}
    except OSError:
        return {}


_VM = ("VmRSS", "VmHWM")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so that the RSS before a method is not inflated by the last."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn):
    """Run ``fn()``; returns its value and the wall time, the peak RSS and what ``fn`` added at its peak (MB)."""
    _release_free_memory()
    before = _proc_status()
    reset = bool(before) and _reset_peak()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    if reset:
        peak = _proc_status()["VmHWM"]
        stats = {"peak_rss_mb": peak, "peak_extra_mb": max(0.0, peak - before["VmRSS"]), "memory_measure": "VmHWM"}
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        stats = {"peak_rss_mb": maxrss, "peak_extra_mb": maxrss - maxrss_before, "memory_measure": "ru_maxrss growth"}
    return value, {"time_s": seconds, **{k: round(v, 1) if isinstance(v, float) else v for k, v in stats.items()}}


# ---------------------------------------------------------------------------------------------- cache


class ResultCache:
    """One JSON file per (pair, method[, alpha]) in ``OUTPUT/cache``, named by a key of inputs and settings."""

    def __init__(self, output_dir: Path) -> None:
        self.folder = Path(output_dir) / "cache"
        self._digests: dict[Path, str] = {}

    def digest(self, path: Path) -> str:
        """SHA-1 of a file's content (so regenerated but identical inputs still hit the cache)."""
        path = Path(path).resolve()
        if path not in self._digests:
            sha = hashlib.sha1()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    sha.update(chunk)
            self._digests[path] = sha.hexdigest()
        return self._digests[path]

    def key(self, pair: PairSpec, method, alpha: float | None = None) -> str:
        payload = {
            "v": EVAL_VERSION,
            "files": {role: self.digest(path) for role, path in pair.files().items()},
            "method": method.cache_identity(),
            "alpha": alpha,
        }
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def path(self, pair: PairSpec, method, key: str, suffix: str = ".json") -> Path:
        from .baselines import method_file_stem

        pair_stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in pair.name)
        return self.folder / f"{pair_stem}__{method_file_stem(method)}__{key}{suffix}"

    def load(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            return None  # a damaged entry is recomputed

    def save(self, path: Path, record: dict) -> None:
        from .report import write_text

        write_text(path, json.dumps(record, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------- running


def run_one(images, pair: PairSpec, method, key: str, alpha: float | None = None) -> tuple[dict, object]:
    """Register, time and score one pair with one method: the record (JSON-ready) and the method's output."""
    output, cost = measure(lambda: method.run(images, alpha=alpha))
    record = {
        "version": EVAL_VERSION,
        "key": key,
        "pair": pair.name,
        "method": method.label,
        "spec": method.spec,
        "inputs": {role: str(path) for role, path in pair.files().items()},
        **cost,
        **score(output, images),
        "alpha": output.info.get("alpha", alpha),
        "info": _jsonable(output.info),
        "computed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return record, output


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _oriented(image: sitk.Image) -> np.ndarray:
    """The volume in LPS orientation (array k, j, i = S, P, L): axial slices in radiological display."""
    return sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))


class _Progress:
    """A tqdm bar on stderr over all (pair, method) tasks; silent when quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, file=sys.stderr, desc="evaluate", disable=quiet, dynamic_ncols=True)

    def step(self, pair: str, method: str, cached: bool) -> None:
        self.bar.set_postfix_str(f"{pair} / {method}{' (cached)' if cached else ''}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def evaluate(
    pairs: list[PairSpec],
    methods: list,
    output_dir: str | Path,
    *,
    table: dict[int, str] | None = None,
    alphas: tuple[float, ...] = (),
    alpha_pair: str | None = None,
    title: str = "Registration evaluation",
    notes: str = "",
    quiet: bool = False,
) -> EvaluationRun:
    """Evaluate every method on every pair (reusing cached results), then write the CSVs, figures and report."""
    output_dir = Path(output_dir)
    sweep_method, sweep_pair = _sweep_setup(methods, pairs, alphas, alpha_pair)
    _check_writable(output_dir)
    cache = ResultCache(output_dir)
    progress = _Progress(len(pairs) * len(methods) + (len(alphas) if sweep_method else 0), quiet)
    records, computed = [], 0
    try:
        for pair in pairs:
            images = None
            for method in methods:
                key = cache.key(pair, method)
                path = cache.path(pair, method, key)
                record = cache.load(path)
                cached = record is not None
                if not cached:
                    images = images or load_pair(pair)
                    record, _ = run_one(images, pair, method, key)
                    cache.save(path, record)
                    computed += 1
                records.append({**record, "pair": pair.name, "method": method.label})
                progress.step(pair.name, method.label, cached)
        sweep = []
        if sweep_method is not None:
            sweep, swept = _alpha_sweep(cache, sweep_pair, sweep_method, alphas, progress)
            computed += swept
    finally:
        progress.close()
    run = EvaluationRun(records, sweep, computed, len(records) + len(sweep) - computed)
    run.files = write_outputs(output_dir, run, pairs, methods, table or {}, title, notes, sweep_method, sweep_pair)
    return run


def _check_writable(output_dir: Path) -> None:
    try:
        (output_dir / "cache").mkdir(parents=True, exist_ok=True)
        probe = output_dir / "cache" / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(f"output directory {output_dir}: cannot be written ({err.strerror})") from None


def _sweep_setup(methods: list, pairs: list[PairSpec], alphas, alpha_pair: str | None):
    """The alpha-conditioned DTN method and the pair for Fig. 2(b), or (None, None) when there is none."""
    from .baselines import DTNMethod

    if not alphas:
        return None, None
    candidates = [m for m in methods if isinstance(m, DTNMethod) and m.alpha_conditioned]
    if alpha_pair is not None:
        chosen = [p for p in pairs if p.name == alpha_pair]
        if not chosen:
            raise InputError(f"--alpha-pair {alpha_pair!r} is not one of the pairs: {', '.join(p.name for p in pairs)}")
        pair = chosen[0]
    else:
        pair = next((p for p in pairs if p.labelled), pairs[0])
    return (candidates[0], pair) if candidates else (None, None)


def _alpha_sweep(cache: ResultCache, pair: PairSpec, method, alphas, progress) -> tuple[list[dict], int]:
    """Fig. 2(b): the pair registered at each alpha; records plus oriented warped and folding volumes (cached)."""
    images, items, computed = None, [], 0
    for alpha in alphas:
        key = cache.key(pair, method, alpha)
        path = cache.path(pair, method, key, f".alpha{alpha:g}.json")
        volumes = path.with_suffix(".npz")
        record = cache.load(path)
        cached = record is not None and volumes.is_file()
        if not cached:
            images = images or load_pair(pair)
            record, output = run_one(images, pair, method, key, alpha)
            folding = sitk.Cast(_jacobian_image(output, images) <= 0, sitk.sitkUInt8)
            arrays = {"warped": _oriented(output.warped).astype(np.float16), "folding": _oriented(folding)}
            _save_npz(volumes, arrays)
            cache.save(path, record)
            computed += 1
        with np.load(volumes) as data:
            items.append({**record, "alpha": float(alpha), "warped": data["warped"], "folding": data["folding"]})
        progress.step(pair.name, f"{method.label} alpha={alpha:g}", cached)
    return items, computed


def _jacobian_image(output, images) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(jacobian(output, images), np.float32))
    image.CopyInformation(images.fixed)
    return image


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from ..files import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------- outputs


def write_outputs(output_dir: Path, run: EvaluationRun, pairs, methods, table, title, notes, sweep_method, sweep_pair):
    """results.csv, summary.csv, ttests.csv, the figures and report.md; returns their paths."""
    from . import figures as plots
    from . import report as rep

    labels = [m.label for m in methods]
    names = [p.name for p in pairs]
    files = {name: output_dir / name for name in ("results.csv", "summary.csv", "ttests.csv", "report.md")}
    summary = rep.summarise(run.records, labels)
    tests = rep.ttests(run.records, labels, names)
    rep.write_csv(files["results.csv"], rep.csv_rows(run.records, table))
    rep.write_csv(files["summary.csv"], _flat_summary(summary), _SUMMARY_COLUMNS)
    rep.write_csv(files["ttests.csv"], tests, ("a", "b", "n", "mean_difference", "t", "p"))
    figures = {}
    if plots.dice_boxplot(run.records, labels, table, output_dir / "dice_per_structure.png"):
        figures["boxplot"] = files["dice_per_structure.png"] = output_dir / "dice_per_structure.png"
    if run.sweep:
        fixed = _oriented(load_pair(sweep_pair).fixed)
        plots.alpha_figure(fixed, run.sweep, output_dir / "alpha_folding.png")
        figures["alpha"] = files["alpha_folding.png"] = output_dir / "alpha_folding.png"
    context = {
        "title": title,
        "notes": notes,
        "pairs": pairs,
        "methods": methods,
        "summary": summary,
        "tests": tests,
        "figures": {k: v.name for k, v in figures.items()},
        "sweep_label": None if sweep_method is None else f"{sweep_method.label} on {sweep_pair.name}",
        "environment": environment(run.records),
    }
    rep.write_text(files["report.md"], rep.render_report(run.records, run.sweep, table, context))
    return files


_SUMMARY_KEYS = (
    "dsc_all",
    "dsc_pair",
    "folding",
    "folding_percent",
    "sd_log_jacobian",
    "hd95",
    "time",
    "peak_extra_mb",
)
_SUMMARY_COLUMNS = ("method", "pairs") + tuple(f"{k}_{s}" for k in _SUMMARY_KEYS for s in ("mean", "std", "n"))


def _flat_summary(summary: list[dict]) -> list[dict]:
    rows = []
    for row in summary:
        flat = {"method": row["method"], "pairs": row["pairs"]}
        for key in _SUMMARY_KEYS:
            flat.update(dict(zip((f"{key}_mean", f"{key}_std", f"{key}_n"), row[key])))
        rows.append(flat)
    return rows


def environment(records: list[dict]) -> dict:
    """Where the numbers were measured (they depend on it): CPU, threads, library versions."""
    import torch

    devices = sorted({str(r.get("info", {}).get("device")) for r in records if r.get("info", {}).get("device")})
    measures = sorted({str(r.get("memory_measure")) for r in records if r.get("memory_measure")})
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dtn_devices": ", ".join(devices) or "–",
        "memory_measure": ", ".join(measures) or "–",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "antspyx": _ants_version(),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ants_version() -> str:
    try:
        import ants

        return str(getattr(ants, "__version__", "installed"))
    except ImportError:
        return "not installed"


__all__ = ["DEFAULT_ALPHAS", "EvaluationRun", "evaluate"]
