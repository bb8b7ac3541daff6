"""dtnreg evaluate: hand-checked metrics and statistics, a tiny end-to-end evaluation, resume, bad input."""

from __future__ import annotations

import csv
import json
import locale
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import phantom_labels, write_phantom_pair

from DTNRegistrationLib.cli import commands as cli
from DTNRegistrationLib.core import models, registration
from DTNRegistrationLib.errors import InputError
from DTNRegistrationLib.evaluate import baselines
from DTNRegistrationLib.evaluate.baselines import Identity, parse_method, parse_methods
from DTNRegistrationLib.evaluate.inputs import (
    PairSpec,
    check_pairs,
    pairs_from_atlas,
    pairs_from_csv,
    pairs_from_dataset_json,
)
from DTNRegistrationLib.evaluate.labels import load_label_table, merged_name
from DTNRegistrationLib.evaluate.report import merged_dice, paired_ttest
from DTNRegistrationLib.evaluate.run import evaluate
from DTNRegistrationLib.evaluate.scores import hd95, surface

SHAPE = (24, 28, 26)

# ---------------------------------------------------------------------------------------------- metrics


def test_surface_of_a_cube_is_its_shell():
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    shell = surface(cube)
    assert shell.sum() == 26 and not shell[2, 2, 2]


def test_hd95_hand_computed_anisotropic():
    # A: 20 voxels along i (x) at j = 0. B: the same, but its last voxel moved to j = 5. Spacing x 2, y 3, z 1 mm.
    # A -> B: 19 zeros and 2 mm (A's last voxel to B's (18, 0)); P95 = 0.05 * 2 = 0.1 (linear interpolation).
    # B -> A: 19 zeros and 15 mm (B's (19, 5) to A's (19, 0)); P95 = 0.05 * 15 = 0.75. HD95 = max = 0.75 mm.
    a = np.zeros((3, 8, 22), bool)
    b = np.zeros_like(a)
    a[1, 0, :20] = True
    b[1, 0, :19] = True
    b[1, 5, 19] = True
    assert hd95(a, b, spacing=(2.0, 3.0, 1.0)) == pytest.approx(0.75, abs=1e-4)  # float32 distance maps
    assert hd95(b, a, spacing=(2.0, 3.0, 1.0)) == pytest.approx(0.75, abs=1e-4)  # float32 distance maps


def test_hd95_points_empty_and_identical():
    a = np.zeros((6, 4, 4), bool)
    b = np.zeros_like(a)
    a[1, 2, 2] = True
    b[3, 2, 2] = True
    assert hd95(a, b, spacing=(1.0, 1.0, 2.5)) == pytest.approx(5.0)  # two voxels 2 slices apart, 2.5 mm each
    assert math.isnan(hd95(a, np.zeros_like(a)))
    assert hd95(phantom_labels(SHAPE) == 1, phantom_labels(SHAPE) == 1) == 0.0


def test_left_right_names_merge():
    table = load_label_table("freesurfer")
    assert table[17] == "Left-Hippocampus" and table[53] == "Right-Hippocampus" and table[24] == "CSF"
    assert merged_name("Left-Hippocampus") == merged_name("Right-Hippocampus") == "Hippocampus"
    assert merged_name("Right-Cerebral-White-Matter") == "Cerebral-White-Matter"
    assert merged_name("ctx-lh-insula") == "ctx-insula" and merged_name("CSF") == "CSF"
    record = {"structures": {"17": {"dice": 0.8}, "53": {"dice": 0.6}, "24": {"dice": 0.5}}}
    assert merged_dice(record, table) == pytest.approx({"Hippocampus": 0.7, "CSF": 0.5})


def test_paired_ttest_hand_computed():
    # d = a - b = (-1, 0, -2): mean -1, sd 1, t = -1 / (1 / sqrt 3) = -sqrt 3; df 2: p = 1 - |t| / sqrt(2 + t^2).
    t, p, n = paired_ttest([1, 2, 3], [2, 2, 5])
    assert n == 3 and t == pytest.approx(-math.sqrt(3)) and p == pytest.approx(1 - math.sqrt(3 / 5))
    assert paired_ttest([1, 2, float("nan")], [1, 2, 3])[2] == 2


def test_paired_ttest_of_equal_differences():
    assert paired_ttest([1, 2, 3], [1, 2, 3])[:2] == (0.0, 1.0)
    assert paired_ttest([2, 3, 4], [1, 2, 3])[1] == 0.0


# ---------------------------------------------------------------------------------------------- end to end


def _write(array: np.ndarray, path, spacing=(2.0, 2.0, 2.0)) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two phantom pairs (one shifted, one identical) as files with a CSV, and a tiny random DTN."""
    root = write_phantom_pair(tmp_path_factory.mktemp("evaluation"), SHAPE, model_spacing_mm=4.0)
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["moving", "fixed", "moving_labels", "fixed_labels", "name"])
        writer.writerow(["moving.nii.gz", "fixed.nii.gz", "moving_labels.nii.gz", "fixed_labels.nii.gz", "shifted"])
        writer.writerow(["fixed.nii.gz", "fixed.nii.gz", "fixed_labels.nii.gz", "fixed_labels.nii.gz", "same"])
    (root / "lut.txt").write_text("# tiny table\n1 Left-Outer\n2 Right-Outer\n3 Blob\n")
    return root


class CountingIdentity(Identity):
    """The identity method, counting how often it really runs."""

    calls = 0

    def run(self, pair, alpha=None):
        CountingIdentity.calls += 1
        return super().run(pair, alpha)


def test_end_to_end_report_csv_figures_and_resume(dataset, tmp_path):
    pairs = pairs_from_csv(dataset / "pairs.csv")
    check_pairs(pairs)
    identity = CountingIdentity("identity", {})
    dtn = parse_method(f"dtn:{dataset / 'tiny.safetensors'}", "cpu")
    table = load_label_table(str(dataset / "lut.txt"))
    out = tmp_path / "eval"
    run = evaluate(pairs, [identity, dtn], out, table=table, alphas=(0.05, 0.5), quiet=True)
    assert (run.computed, run.reused, CountingIdentity.calls) == (6, 0, 2)

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 2 * 3  # pairs x methods x structures
    same = {r["structure"]: r for r in rows if r["pair"] == "same" and r["method"] == "identity"}
    assert {float(r["dice"]) for r in same.values()} == {1.0} and {float(r["hd95_mm"]) for r in same.values()} == {0}
    shifted = [float(r["dice"]) for r in rows if r["pair"] == "shifted" and r["method"] == "identity"]
    assert all(0 < d < 1 for d in shifted)
    # the DTN rows hold what the engine gives on that pair (the default method: the network alone, after the affine)
    pair = next(p for p in pairs if p.name == "shifted")
    read = {k: sitk.ReadImage(str(getattr(pair, k))) for k in ("moving", "fixed", "moving_labels", "fixed_labels")}
    direct = registration.register(
        sitk.Cast(read["moving"], sitk.sitkFloat32),
        sitk.Cast(read["fixed"], sitk.sitkFloat32),
        moving_labels=read["moving_labels"],
        fixed_labels=read["fixed_labels"],
        model=dtn.loaded,
        refine=0,
    )
    dtn_shifted = [float(r["dice"]) for r in rows if r["pair"] == "shifted" and r["method"] == dtn.label]
    # to a few voxels: the affine's threads sum in any order, and one voxel is 5e-4 of a structure's Dice here
    assert sorted(dtn_shifted) == pytest.approx(sorted(direct.metrics["dice"].values()), abs=5e-3)
    assert {r["merged_structure"] for r in rows} == {"Outer", "Blob"}
    assert all(float(r["folding_count"]) >= 0 and float(r["time_s"]) >= 0 for r in rows)

    report = (out / "report.md").read_text()
    assert "Table 1" in report and "(dice_per_structure.png)" in report and "(alpha_folding.png)" in report
    for figure in ("dice_per_structure.png", "alpha_folding.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = {r["method"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert set(summary) == {"identity", dtn.label} and summary["identity"]["pairs"] == "2"

    cache = sorted((out / "cache").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in cache}
    again = evaluate(pairs, [identity, dtn], out, table=table, alphas=(0.05, 0.5), quiet=True)
    assert (again.computed, again.reused, CountingIdentity.calls) == (0, 6, 2)
    assert {p: p.stat().st_mtime_ns for p in cache} == stamps

    next(p for p in cache if p.name.startswith("shifted__identity")).unlink()  # as if interrupted there
    third = evaluate(pairs, [identity, dtn], out, table=table, alphas=(), quiet=True)
    assert (third.computed, CountingIdentity.calls) == (1, 3)


def test_the_affine_method_recovers_a_shift(tmp_path):
    """A head-sized phantom (the module's small one is too coarse for an affine on 4 mm copies: 16 voxels across)."""
    root = write_phantom_pair(tmp_path, (64, 80, 72))
    (root / "pairs.csv").write_text(
        "moving,fixed,moving_labels,fixed_labels\nmoving.nii.gz,fixed.nii.gz,moving_labels.nii.gz,fixed_labels.nii.gz\n"
    )
    pairs = pairs_from_csv(root / "pairs.csv")
    evaluate(pairs, [Identity("identity", {}), parse_method("affine", "cpu")], root / "eval", alphas=(), quiet=True)
    rows = list(csv.DictReader(open(root / "eval" / "results.csv")))
    dice = {m: np.mean([float(r["dice"]) for r in rows if r["method"] == m]) for m in ("identity", "affine")}
    assert dice["identity"] < 0.9 and dice["affine"] > 0.98, dice


def test_an_engine_change_is_a_new_dtn_method_for_the_cache(dataset, tmp_path):
    same, changed = tmp_path / "same", tmp_path / "changed"
    for copy in (same, changed):
        shutil.copytree(baselines.ENGINE_DIR, copy)
    with open(changed / "refinement.py", "a") as handle:
        handle.write("\n# a changed schedule\n")
    assert baselines.engine_digest(same) == baselines.engine_digest()
    assert baselines.engine_digest(changed) != baselines.engine_digest()
    dtn = parse_method(f"dtn:{dataset / 'tiny.safetensors'}", "cpu")
    assert dtn.cache_identity()["engine"] == baselines.engine_digest()


def test_dataset_json_and_atlas_inputs(dataset, tmp_path):
    doc = {
        "training": [
            {"image": str(dataset / "fixed.nii.gz"), "label": str(dataset / "fixed_labels.nii.gz")},
            {"image": str(dataset / "moving.nii.gz"), "label": str(dataset / "moving_labels.nii.gz")},
        ],
        "registration_val": [{"moving": str(dataset / "moving.nii.gz"), "fixed": str(dataset / "fixed.nii.gz")}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    (pair,) = pairs_from_dataset_json(tmp_path / "dataset.json")
    assert pair.labelled and pair.moving_labels.name == "moving_labels.nii.gz" and pair.name == "moving->fixed"
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    shutil.copy(dataset / "moving.nii.gz", images / "s1.nii.gz")
    shutil.copy(dataset / "moving_labels.nii.gz", labels / "s1.nii.gz")
    (pair,) = pairs_from_atlas(dataset / "fixed.nii.gz", images, dataset / "fixed_labels.nii.gz", labels)
    assert pair.labelled and pair.fixed == dataset / "fixed.nii.gz" and pair.moving_labels == labels / "s1.nii.gz"
    check_pairs([pair])


def test_cli_evaluate_runs(dataset, tmp_path):
    out = tmp_path / "cli"
    argv = ["evaluate", "--pairs", str(dataset / "pairs.csv"), "--methods", "identity", "--output-dir", str(out)]
    assert cli.main(argv + ["--label-table", "numbers", "--alphas", "", "--quiet"]) == 0
    assert (out / "report.md").is_file() and not (out / "alpha_folding.png").exists()


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_files_and_mismatched_labels_fail_before_any_work(dataset, tmp_path, capsys):
    _write(np.zeros((10, 10, 10), np.uint8), tmp_path / "small_labels.nii.gz")
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "moving,fixed,moving_labels,fixed_labels\n"
        f"{dataset / 'moving.nii.gz'},{dataset / 'fixed.nii.gz'},{tmp_path / 'small_labels.nii.gz'},"
        f"{dataset / 'fixed_labels.nii.gz'}\n"
        f"{tmp_path / 'absent.nii.gz'},{dataset / 'fixed.nii.gz'},,\n"
    )
    out = tmp_path / "never"
    argv = ["evaluate", "--pairs", str(bad), "--methods", "identity", "--output-dir", str(out), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "absent.nii.gz: file not found" in err
    assert "moving labels" in err and "does not match its moving image (size (10, 10, 10) vs (26, 28, 24))" in err
    assert not out.exists()


def test_bad_method_specs_are_refused():
    with pytest.raises(InputError, match="unknown method"):
        parse_method("voxelmorph")
    with pytest.raises(InputError, match="not KEY=VALUE"):
        parse_method("identity:fast")
    with pytest.raises(InputError, match="unknown option"):
        parse_method("affine:refine=3")
    with pytest.raises(InputError, match="share the label"):
        parse_methods(["identity", "identity"])
    with pytest.raises(models.ModelError, match="not found"):
        parse_method("dtn:/no/such/weights.safetensors")
    with pytest.raises(InputError, match="no pairs"):
        check_pairs([])
    with pytest.raises(InputError, match="file not found"):
        check_pairs([PairSpec("x", Path("/no/such.nii.gz"), Path("/no/such.nii.gz"))])


def test_text_outputs_are_utf8_whatever_the_locale(tmp_path):
    """A report with a minus sign and a patient folder with an accent, written under an ASCII locale (GDCM's DICOM
    writer leaves one behind; a Windows code page refuses the minus too): UTF-8 on disk, no UnicodeEncodeError."""
    from DTNRegistrationLib.evaluate.report import write_text

    saved = locale.setlocale(locale.LC_ALL)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        text = "| A \u2212 B | /data/M\u00fcller |\n"
        write_text(tmp_path / "report.md", text)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    assert (tmp_path / "report.md").read_bytes() == text.encode("utf-8")
