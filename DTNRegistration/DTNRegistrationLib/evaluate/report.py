"""Tables and statistics of ``dtnreg evaluate``: the paper's Table 1 for any data (the figures: ``figures``).

Works on the per (pair, method) records that ``evaluation`` computes (plain dicts, as cached in JSON), so a report
can be redrawn from the cache alone. Everything is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .labels import label_name, merged_name

CSV_COLUMNS = (
    "pair",
    "method",
    "spec",
    "structure_id",
    "structure",
    "merged_structure",
    "dice",
    "hd95_mm",
    "pair_mean_dice",
    "pair_mean_hd95_mm",
    "folding_count",
    "folding_percent",
    "folding_region_voxels",
    "sd_log_jacobian",
    "jacobian_min",
    "time_s",
    "peak_rss_mb",
    "peak_extra_mb",
    "alpha",
)


# ---------------------------------------------------------------------------------------------- statistics


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int]:
    """Two-sided paired t-test (``scipy.stats.ttest_rel``) of ``a`` against ``b`` over the entries finite in both:
    ``(t, p, n)``; NaN below two pairs, and ``p = 1`` (or 0) when every difference is the same zero (or not)."""
    from scipy import stats

    x, y = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    n = int(d.size)
    if n < 2:
        return float("nan"), float("nan"), n
    if float(d.std(ddof=1)) == 0.0:  # scipy would divide by zero
        return (0.0, 1.0, n) if float(d.mean()) == 0.0 else (math.copysign(math.inf, float(d.mean())), 0.0, n)
    result = stats.ttest_rel(x[keep], y[keep])
    return float(result.statistic), float(result.pvalue), n


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


# ---------------------------------------------------------------------------------------------- tables


def dice_values(record: dict) -> list[float]:
    return [s["dice"] for s in record.get("structures", {}).values() if s["dice"] is not None]


def merged_dice(record: dict, table: dict[int, str]) -> dict[str, float]:
    """Per merged structure, the mean Dice of its sides in this pair (one value per pair and structure)."""
    groups: dict[str, list[float]] = {}
    for label, values in sorted(record.get("structures", {}).items(), key=lambda kv: int(kv[0])):
        if values["dice"] is not None:
            groups.setdefault(merged_name(label_name(table, int(label))), []).append(values["dice"])
    return {name: float(np.mean(v)) for name, v in groups.items()}


def summarise(records: list[dict], methods: list[str]) -> list[dict]:
    """One row per method: the Table 1 numbers and the costs."""
    rows = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        rows.append(
            {
                "method": method,
                "pairs": len(mine),
                "dsc_all": _mean_std([d for r in mine for d in dice_values(r)]),
                "dsc_pair": _mean_std([r["mean_dice"] for r in mine]),
                "folding": _mean_std([r["folding_count"] for r in mine]),
                "folding_percent": _mean_std([r["folding_percent"] for r in mine]),
                "sd_log_jacobian": _mean_std([r["sd_log_jacobian"] for r in mine]),
                "hd95": _mean_std([r["mean_hd95_mm"] for r in mine]),
                "time": _mean_std([r["time_s"] for r in mine]),
                "peak_extra_mb": _mean_std([r["peak_extra_mb"] for r in mine]),
            }
        )
    return rows


def ttests(records: list[dict], methods: list[str], pairs: list[str]) -> list[dict]:
    """Paired t-tests of the per-pair mean Dice between every two methods."""
    by = {(r["pair"], r["method"]): r.get("mean_dice") for r in records}
    rows = []
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            x = [_nan(by.get((p, a))) for p in pairs]
            y = [_nan(by.get((p, b))) for p in pairs]
            t, p, n = paired_ttest(x, y)
            diff = _mean_std([u - v for u, v in zip(x, y) if np.isfinite(u) and np.isfinite(v)])[0]
            rows.append({"a": a, "b": b, "n": n, "mean_difference": diff, "t": t, "p": p})
    return rows


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


def csv_rows(records: list[dict], table: dict[int, str]) -> list[dict]:
    """Every number: one row per pair x method x structure (pair-level numbers repeated)."""
    rows = []
    for r in records:
        base = {
            "pair": r["pair"],
            "method": r["method"],
            "spec": r["spec"],
            "pair_mean_dice": r.get("mean_dice"),
            "pair_mean_hd95_mm": r.get("mean_hd95_mm"),
            **{k: r.get(k) for k in ("folding_count", "folding_percent", "folding_region_voxels")},
            **{k: r.get(k) for k in ("sd_log_jacobian", "jacobian_min", "time_s", "peak_rss_mb", "peak_extra_mb")},
            "alpha": r.get("alpha"),
        }
        structures = sorted(r.get("structures", {}).items(), key=lambda kv: int(kv[0]))
        if not structures:
            rows.append(base)
        for label, values in structures:
            name = label_name(table, int(label))
            rows.append(
                {
                    **base,
                    "structure_id": int(label),
                    "structure": name,
                    "merged_structure": merged_name(name),
                    "dice": values["dice"],
                    "hd95_mm": values["hd95_mm"],
                }
            )
    return rows


def write_csv(path: str | os.PathLike, rows: list[dict], columns: Sequence[str] = CSV_COLUMNS) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    write_text(path, buffer.getvalue())


def _csv_value(value):
    if isinstance(value, float):
        return "" if not np.isfinite(value) else f"{value:.6g}"
    return "" if value is None else value


def write_text(path: str | os.PathLike, text: str) -> None:
    from ..files import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 0.5 * 10**-digits):
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _p(value: float) -> str:
    return "–" if not np.isfinite(value) else (f"{value:.2e}" if value < 1e-3 else f"{value:.3f}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def table1(summary: list[dict]) -> list[str]:
    """The paper's Table 1 layout (methods as columns), extended with SDlogJ, HD95, time and memory."""
    header = ["", ""] + [row["method"] for row in summary]
    spec = [
        ("DSC", "dsc_all", 3),
        ("DSC per pair", "dsc_pair", 3),
        ("\\|J\\|<=0 (voxels)", "folding", 1),
        ("\\|J\\|<=0 (%)", "folding_percent", 4),
        ("SDlogJ", "sd_log_jacobian", 3),
        ("HD95 (mm)", "hd95", 2),
        ("time (s)", "time", 2),
        ("peak memory (MB)", "peak_extra_mb", 0),
    ]
    rows = []
    for title, key, digits in spec:
        rows.append([title, "Avg."] + [_fmt(r[key][0], digits) for r in summary])
        rows.append(["", "Std."] + [_fmt(r[key][1], digits) for r in summary])
    return _table(header, rows)


def structure_table(records: list[dict], methods: list[str], table: dict[int, str]) -> list[str]:
    per: dict[str, dict[str, list[float]]] = {}
    for r in records:
        for name, value in merged_dice(r, table).items():
            per.setdefault(name, {}).setdefault(r["method"], []).append(value)
    rows = []
    for name, values in per.items():
        cells = []
        for m in methods:
            mean, std, n = _mean_std(values.get(m, []))
            cells.append(f"{_fmt(mean)} ± {_fmt(std)}" if n else "–")
        rows.append([name] + cells)
    return _table(["structure (L+R merged)"] + methods, rows) if rows else []


def pair_table(records: list[dict], methods: list[str], pairs: list[str]) -> list[str]:
    by = {(r["pair"], r["method"]): r for r in records}
    rows = []
    for pair in pairs:
        cells = []
        for m in methods:
            r = by.get((pair, m))
            cells.append("–" if r is None else f"{_fmt(r.get('mean_dice'))} / {r['folding_count']}")
        rows.append([pair] + cells)
    return _table(["pair (mean Dice / \\|J\\|<=0 voxels)"] + methods, rows)


def ttest_table(rows: list[dict]) -> list[str]:
    body = [[r["a"], r["b"], str(r["n"]), _fmt(r["mean_difference"], 4), _fmt(r["t"], 2), _p(r["p"])] for r in rows]
    return _table(["A", "B", "pairs", "mean Dice A − B", "t", "p (two-sided)"], body)


def alpha_table(sweep: list[dict]) -> list[str]:
    body = [
        [f"{s['alpha']:g}", str(s["folding_count"]), _fmt(s["folding_percent"], 4), _fmt(s.get("mean_dice"))]
        for s in sweep
    ]
    return _table(["alpha", "\\|J\\|<=0 (voxels)", "\\|J\\|<=0 (%)", "mean Dice"], body)


def render_report(records: list[dict], sweep: list[dict], table: dict[int, str], context: dict) -> str:
    """The Markdown report: Table 1, t-tests, Fig. 3 and its table, per-pair numbers, Fig. 2(b), definitions."""
    methods = [m.label for m in context["methods"]]
    pairs = [p.name for p in context["pairs"]]
    labelled = sum(1 for p in context["pairs"] if p.labelled)
    lines = [f"# {context['title']}", ""]
    if context.get("notes"):
        lines += [context["notes"].strip(), ""]
    lines += [
        f"{len(pairs)} pairs ({labelled} with label maps) x {len(methods)} methods, written by `dtnreg evaluate`. "
        "Every number is in `results.csv` (one row per pair x method x structure).",
        "",
        "Methods: " + "; ".join(f"**{m.label}** (`{m.spec}`)" for m in context["methods"]) + ".",
        "",
        "## Table 1: accuracy, regularity and cost",
        "",
        *table1(context["summary"]),
        "",
        "DSC: mean and standard deviation over all (pair, structure) Dice values; *DSC per pair*: over the pairs' "
        "mean Dice. \\|J\\|<=0: voxels of the fixed grid (inside the fixed mask where one is given) where the "
        "Jacobian determinant of the fixed-to-moving map is <= 0, per pair. Standard deviations are sample ones "
        "(n - 1).",
        "",
        "## Paired t-tests (per-pair mean Dice)",
        "",
        *ttest_table(context["tests"]),
        "",
    ]
    if "boxplot" in context["figures"]:
        lines += [
            "## Dice per structure (Fig. 3)",
            "",
            f"![Dice per structure]({context['figures']['boxplot']})",
            "",
            "Left and right structures (FreeSurfer names `Left-X` / `Right-X`) are merged: each pair contributes "
            "the mean of its two sides.",
            "",
            *structure_table(records, methods, table),
            "",
        ]
    lines += ["## Per pair", "", *pair_table(records, methods, pairs), ""]
    if sweep:
        lines += [
            "## Smoothness weight alpha (Fig. 2(b))",
            "",
            f"{context['sweep_label']}, one registration per alpha.",
            "",
            f"![Warped image and folding per alpha]({context['figures']['alpha']})",
            "",
            *alpha_table(sweep),
            "",
        ]
    lines += _definitions(context["environment"])
    return "\n".join(lines) + "\n"


def _definitions(env: dict) -> list[str]:
    return [
        "## Definitions and environment",
        "",
        "- Every method's result is the full fixed-to-moving map on the fixed image's grid (an ITK displacement "
        "field, mm); Dice, HD95, folding and SDlogJ are computed from it by the same code for all methods. "
        "SyN's forward transforms are composed into one field by `ants.apply_transforms(compose=...)`; its labels "
        "are warped by `ants.apply_transforms` (nearest neighbour).",
        "- HD95: per structure, max of the two directed 95th percentiles of the distances (mm) between the "
        "surface voxels of the warped and the fixed label (voxel centres, SimpleITK Maurer distance maps).",
        "- SDlogJ: standard deviation of log(det J), det J clipped to [1e-9, 1e9].",
        "- time: wall-clock seconds of the method alone (reading images and scoring excluded; the DTN's time "
        "includes its affine initialisation and, for refinement, the optimisation).",
        f"- peak memory: {env['memory_measure']}: the process's peak resident memory during the method minus its "
        "resident memory before it, freed heap returned to the OS first (torch and ITK allocations included).",
        f"- machine: {env['machine']}, {env['cpus']} CPUs, torch threads {env['torch_threads']}; DTN device(s): "
        f"{env['dtn_devices']}; Python {env['python']}, torch {env['torch']}, SimpleITK {env['SimpleITK']}, "
        f"antspyx {env['antspyx']}.",
    ]


__all__ = [
    "alpha_table",
    "csv_rows",
    "merged_dice",
    "pair_table",
    "paired_ttest",
    "render_report",
    "structure_table",
    "summarise",
    "table1",
    "ttest_table",
    "ttests",
    "write_csv",
    "write_text",
]
