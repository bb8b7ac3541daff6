"""Tables, statistics and figures of ``dtnreg evaluate``: the paper's Table 1, Fig. 2(b) and Fig. 3 for any data.

Works on the per (pair, method) records that ``evaluation`` computes (plain dicts, as cached in JSON), so a report
can be redrawn from the cache alone. Everything is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..files import RESOURCES_DIR

LUT_FILE = RESOURCES_DIR / "Labels" / "FreeSurferColorLUT_subset.txt"
SIDE_PREFIXES = (("ctx-lh-", "ctx-"), ("ctx-rh-", "ctx-"), ("left-", ""), ("right-", ""), ("left_", ""), ("right_", ""))
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


# ---------------------------------------------------------------------------------------------- label names


def read_lut(path: str | os.PathLike) -> dict[int, str]:
    """Label names from a FreeSurfer colour table (``number name [R G B A]``, ``#`` comments) or a JSON map."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label table {path}: file not found")
    text = path.read_text(errors="replace")
    if path.suffix.lower() == ".json":
        try:
            return {int(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as err:
            raise InputError(f"label table {path}: expected a JSON object {{number: name}} ({err})") from None
    table = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if len(fields) >= 2 and fields[0].lstrip("-").isdigit():
            table[int(fields[0])] = fields[1]
    if not table:
        raise InputError(f"label table {path}: no 'number name' lines found")
    return table


def load_label_table(spec: str | None = "freesurfer") -> dict[int, str]:
    """``freesurfer`` (the bundled subset of FreeSurfer's table), ``numbers`` (no names), or a table file."""
    if spec in (None, "", "freesurfer"):
        return read_lut(LUT_FILE) if LUT_FILE.is_file() else {}
    if spec == "numbers":
        return {}
    return read_lut(spec)


def label_name(table: dict[int, str], label: int) -> str:
    return table.get(int(label), f"label {int(label)}")


def merged_name(name: str) -> str:
    """The structure's name without its side, so that left and right merge (the paper's Fig. 3)."""
    lower = name.lower()
    for prefix, replacement in SIDE_PREFIXES:
        if lower.startswith(prefix) and len(name) > len(prefix):
            return replacement + name[len(prefix) :]
    return name


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

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    from ..files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    _pyplot().close(fig)


def dice_boxplot(records: list[dict], methods: list[str], table: dict[int, str], path: str | os.PathLike) -> bool:
    """Fig. 3: Dice per structure (left and right merged), one box per method; False when nothing is labelled."""
    per = {m: {} for m in methods}
    order: list[str] = []
    for r in records:
        for name, value in merged_dice(r, table).items():
            per[r["method"]].setdefault(name, []).append(value)
            if name not in order:
                order.append(name)
    if not order:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(order) * len(methods) + 2), 4.2))
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        data = [per[method].get(name, []) for name in order]
        positions = [k + (i - (len(methods) - 1) / 2) * width for k in range(len(order))]
        shown = [(p, d) for p, d in zip(positions, data) if d]
        if not shown:
            continue
        boxes = ax.boxplot(
            [d for _, d in shown],
            positions=[p for p, _ in shown],
            widths=width * 0.9,
            patch_artist=True,
            medianprops={"color": "black"},
        )
        for box in boxes["boxes"]:
            box.set_facecolor(colours(i % 10))
            box.set_alpha(0.75)
        ax.plot([], [], "s", color=colours(i % 10), label=method)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels(order, rotation=35, ha="right")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Dice per structure (left and right merged)")
    fig.tight_layout()
    _save(fig, path)
    return True


def alpha_figure(fixed: np.ndarray, sweep: list[dict], path: str | os.PathLike) -> None:
    """Fig. 2(b): the warped moving image for each alpha, voxels with det J <= 0 in red.

    ``fixed`` and each ``sweep`` item's ``warped`` / ``folding`` are LPS-oriented volumes (k, j, i); the axial
    slice shown is the one with the most folding at the smallest alpha (the middle one when nothing folds).
    """
    plt = _pyplot()
    folds = sweep[0]["folding"].reshape(sweep[0]["folding"].shape[0], -1).sum(1)
    k = int(np.argmax(folds)) if folds.any() else fixed.shape[0] // 2
    fig, axes = plt.subplots(1, len(sweep) + 1, figsize=(2.6 * (len(sweep) + 1), 3.2))
    axes[0].imshow(fixed[k], cmap="gray")
    axes[0].set_title("fixed", fontsize=9)
    for ax, item in zip(axes[1:], sweep):
        ax.imshow(item["warped"][k], cmap="gray")
        ys, xs = np.nonzero(item["folding"][k])
        ax.scatter(xs, ys, s=3, c="red", marker="s", linewidths=0)
        ax.set_title(f"alpha={item['alpha']:g}\n|J|<=0: {item['folding_count']} voxels", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"Warped moving image, folding voxels in red (axial slice {k})", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


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


__all__ = [
    "alpha_figure",
    "alpha_table",
    "csv_rows",
    "dice_boxplot",
    "label_name",
    "load_label_table",
    "merged_name",
    "pair_table",
    "paired_ttest",
    "read_lut",
    "structure_table",
    "summarise",
    "table1",
    "ttest_table",
    "ttests",
    "write_csv",
    "write_text",
]


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
