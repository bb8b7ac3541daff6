"""`dtnreg batch`: many pairs with one loaded model, safe for a cohort and for a cluster's job array.

- Every pair writes into ``<output-dir>/<name>/``; a name that is not a plain folder name is refused for that pair.
- A pair that fails (any error; Ctrl-C still stops the run) is recorded and the batch goes on.
- ``batch_summary.csv`` lists every pair: status ``ok``, ``failed``, ``skipped`` (outputs already complete and
  verified) or ``pending`` (not reached yet: the run was interrupted). It is rewritten after each pair.
- ``--shard K/N`` (K from 1 to N) takes the pairs whose 0-based CSV index i has ``i % N == K - 1``; its summary is
  ``batch_summary-shard-K-of-N.csv``, and ``dtnreg batch-merge`` joins the shards' summaries.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from ..core import dicom
from ..core.outputs import file_fingerprint
from ..errors import InputError, ModelError
from .arguments import requested_options

SUMMARY = "batch_summary.csv"
SHARD_SUMMARY = "batch_summary-shard-{k}-of-{n}.csv"
SHARD_SUMMARY_PATTERN = re.compile(r"batch_summary-shard-(\d+)-of-(\d+)\.csv")
FIELDS = ("index", "name", "shard", "status", "seconds", "dice_mean", "error", "moving", "fixed")
ROLES = ("moving", "fixed", "moving_labels", "fixed_labels", "mask", "moving_mask")
EXIT_PAIRS_FAILED = 3


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"K/N"`` -> (K, N), 1 <= K <= N; no shard is ``(1, 1)``."""
    if text is None:
        return 1, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise InputError(f"--shard {text!r}: expected K/N, e.g. 3/10 (shard K of N, K from 1 to N)")
    k, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"--shard {text}: K must be from 1 to N={n} (shards are numbered from 1, as --array=1-N)")
    return k, n


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a pair's folder inside the output directory, or None."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        return (
            f"pair name {name!r} is not a plain folder name (no '/', '\\', '..' or absolute path): "
            "its outputs would not stay inside --output-dir"
        )
    if name.startswith("."):
        return f"pair name {name!r} starts with '.': hidden names are kept for staging folders"
    if name == SUMMARY or SHARD_SUMMARY_PATTERN.fullmatch(name):
        return f"pair name {name!r} is the batch summary's file name"
    return None


def batch_rows(args) -> list[dict]:
    """Every pair of the batch in CSV (or command-line) order, with its index and output folder name."""
    if args.pairs:
        from ..evaluate.inputs import pairs_from_csv  # the same CSV layout as `dtnreg evaluate`

        specs = pairs_from_csv(args.pairs)
        rows = [{role: None if getattr(s, role) is None else str(getattr(s, role)) for role in ROLES} for s in specs]
        names = [s.name.replace("->", "_to_") for s in specs]
    elif args.fixed and args.moving:
        rows = [{"moving": m, "fixed": args.fixed} for m in args.moving]
        names = [f"{i:03d}_{_moving_name(m)}" for i, m in enumerate(args.moving)]
    else:
        raise InputError("batch needs --pairs CSV, or --fixed ATLAS with --moving IMAGES")
    return [{**dict.fromkeys(ROLES), **row, "index": i, "name": names[i]} for i, row in enumerate(rows)]


def _moving_name(path: str) -> str:
    """A short name for a moving image: the file name without extensions; for ``FOLDER/<series UID>`` (a DICOM
    series) the folder's name and the UID's last part, since every UID starts alike."""
    path = Path(path)
    if dicom.looks_like_uid(path.name):
        return f"{path.parent.name}_{path.name.rsplit('.', 1)[-1]}"
    return path.name.split(".")[0]


def input_fingerprints(files: dict[str, str | None]) -> dict:
    return {role: file_fingerprint(files.get(role)) for role in ROLES}


def check_done(folder: Path, row: dict, options: dict, model_sha256: str) -> tuple[dict | None, str | None]:
    """(the pair's report, None) if its outputs are complete and were made from these inputs, model and options;
    else (None, why not), the reason being None when there is no report at all."""
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, "its report.json cannot be read"
    if not isinstance(report, dict) or not report.get("outputs"):
        return None, "its report.json lists no outputs"
    try:
        fingerprints = input_fingerprints(row)
    except OSError:
        return None, None  # an input is missing: reading it will say so
    model = report.get("model")
    checks = (
        (isinstance(model, dict) and model.get("sha256") == model_sha256, "its outputs were made with another model"),
        (report.get("options") == options, "its outputs were made with other options"),
        (report.get("input_files") == fingerprints, "its outputs were made from other or modified input files"),
        (all((folder / name).is_file() for name in report["outputs"]), "some of its output files are missing"),
    )
    for passed, reason in checks:
        if not passed:
            return None, reason
    return report, None


def _record(row: dict, shard: str, status: str, seconds: float, dice=None, error: str = "") -> dict:
    return {
        "index": row["index"],
        "name": row["name"],
        "shard": shard,
        "status": status,
        "seconds": f"{seconds:.1f}",
        "dice_mean": "" if dice is None else f"{dice:.4f}",
        "error": error,
        "moving": row["moving"],
        "fixed": row["fixed"],
    }


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if isinstance(err, (InputError, ModelError)) else f"{type(err).__name__}: {text}"


def run_batch(args, rows: list[dict], loaded, run_pair: Callable[..., object]) -> int:
    """Register this shard's ``rows`` (from ``batch_rows``), skipping verified ones; 0 if none failed, else
    ``EXIT_PAIRS_FAILED``. ``run_pair`` is the command line's read-register-write of one pair."""
    k, n = parse_shard(args.shard)
    rows = [row for row in rows if row["index"] % n == k - 1]
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"output directory {out}: cannot be written ({err.strerror})") from None
    summary = out / (SUMMARY if args.shard is None else SHARD_SUMMARY.format(k=k, n=n))
    shard = f"{k}/{n}"
    options = requested_options(args)
    records = [_record(row, shard, "pending", 0.0) for row in rows]
    write_summary(summary, records)
    for i, row in enumerate(rows):
        records[i] = _run_one(args, loaded, run_pair, row, out, shard, options)
        write_summary(summary, records)
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed")}
    print(
        f"{counts['ok']} registered, {counts['skipped']} skipped (already done), {counts['failed']} failed"
        f" of {len(rows)} pairs{'' if args.shard is None else f' (shard {shard})'}; summary: {summary}",
        file=sys.stderr,
    )
    return EXIT_PAIRS_FAILED if counts["failed"] else 0


def _run_one(args, loaded, run_pair, row: dict, out: Path, shard: str, options: dict) -> dict:
    """One pair, never raising except for Ctrl-C (KeyboardInterrupt is not an Exception)."""
    start = time.perf_counter()
    name = row["name"]
    try:
        problem = name_problem(name)
        if problem:
            raise InputError(problem)
        done, why_not = check_done(out / name, row, options, loaded.sha256)
        if why_not and not args.quiet:
            print(f"dtnreg: pair {name}: registering again ({why_not})", file=sys.stderr)
        if done is not None:
            if not args.quiet:
                print(
                    f"dtnreg: pair {name}: skipped (done before from these inputs, model and options)", file=sys.stderr
                )
            dice = (done.get("metrics") or {}).get("dice_mean")
            return _record(row, shard, "skipped", time.perf_counter() - start, dice)
        files = {role: row[role] for role in ROLES[2:]}
        result = run_pair(args, loaded, row["moving"], row["fixed"], out / name, **files)
        dice = result.metrics.get("dice_mean")
        return _record(row, shard, "ok", time.perf_counter() - start, dice)
    except Exception as err:  # noqa: BLE001 - one bad pair must not stop the cohort
        message = _one_line(err)
        print(f"dtnreg: pair {name}: failed: {message}", file=sys.stderr)
        return _record(row, shard, "failed", time.perf_counter() - start, error=message)


def write_summary(path: Path, records: list[dict]) -> None:
    """Write the CSV atomically (a temporary file renamed), so a reader never sees half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(records)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def merge_summaries(output_dir: str | os.PathLike) -> int:
    """Join ``batch_summary-shard-K-of-N.csv`` (all K of one N) into ``batch_summary.csv``, in CSV order."""
    out = Path(output_dir)
    found: dict[int, dict[int, Path]] = {}
    for path in out.glob("batch_summary-shard-*-of-*.csv") if out.is_dir() else ():
        match = SHARD_SUMMARY_PATTERN.fullmatch(path.name)
        if match:
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not found:
        raise InputError(f"output directory {out}: no shard summaries (batch_summary-shard-K-of-N.csv) to merge")
    if len(found) > 1:
        raise InputError(
            f"output directory {out}: summaries of different shardings (N = {sorted(found)}); remove the stale ones"
        )
    n, shards = next(iter(found.items()))
    missing = [k for k in range(1, n + 1) if k not in shards]
    if missing:
        raise InputError(f"output directory {out}: no summary from shard(s) {', '.join(map(str, missing))} of {n}")
    records = [row for k in sorted(shards) for row in _read_summary(shards[k])]
    indices = [int(row["index"]) for row in records]
    if len(set(indices)) != len(indices):
        raise InputError(f"output directory {out}: the shard summaries list the same pair more than once")
    records.sort(key=lambda row: int(row["index"]))
    write_summary(out / SUMMARY, records)
    counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "skipped", "failed", "pending")}
    print(
        f"{len(records)} pairs from {n} shards: "
        + ", ".join(f"{v} {s}" for s, v in counts.items())
        + f"; summary: {out / SUMMARY}",
        file=sys.stderr,
    )
    return EXIT_PAIRS_FAILED if counts["failed"] or counts["pending"] else 0


def _read_summary(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise InputError(f"{path}: not a batch summary (columns {', '.join(FIELDS)} expected)")
        return list(reader)
