"""dtnreg batch: outputs stay inside --output-dir, a bad pair does not stop the cohort, resume, shards and merging."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from test_cli import write_pair_files

from DTNRegistrationLib.cli import batch
from DTNRegistrationLib.cli import commands as cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_pair_files(tmp_path_factory.mktemp("batch"))


def write_csv(path, rows, columns=("moving", "fixed", "moving_labels", "fixed_labels", "name")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def labelled(files, name, moving=None):
    moving = moving or files / "moving.nii.gz"
    return [moving, files / "fixed.nii.gz", files / "moving_labels.nii.gz", files / "fixed_labels.nii.gz", name]


def run_batch(files, pairs, out, *extra) -> int:
    common = ["--model", str(files / "tiny.safetensors"), "--quiet", "--refine", "0"]
    return cli.main(["batch", "--pairs", str(pairs), "--output-dir", str(out), *common, *extra])


def summary(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def statuses(path) -> dict[str, str]:
    return {row["name"]: row["status"] for row in summary(path)}


def test_batch_from_csv_and_atlas_writes_a_summary(files, tmp_path):
    pairs = write_csv(tmp_path / "pairs.csv", [labelled(files, "p1"), labelled(files, "p2")])
    assert run_batch(files, pairs, tmp_path / "b") == 0
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"p1", "p2", "batch_summary.csv"}
    assert (tmp_path / "b" / "p2" / "warped_labels.nii.gz").is_file()
    rows = summary(tmp_path / "b" / "batch_summary.csv")
    assert [(r["index"], r["name"], r["status"], r["error"]) for r in rows] == [
        ("0", "p1", "ok", ""),
        ("1", "p2", "ok", ""),
    ]
    report = json.loads((tmp_path / "b" / "p1" / "report.json").read_text())
    assert float(rows[0]["dice_mean"]) == pytest.approx(report["metrics"]["dice_mean"], abs=1e-4)
    assert float(rows[0]["seconds"]) > 0

    atlas = ["batch", "--fixed", str(files / "fixed.nii.gz"), "--moving", str(files / "moving.nii.gz")]
    atlas += [str(files / "nope.nii.gz"), "--output-dir", str(tmp_path / "c")]
    code = cli.main(atlas + ["--model", str(files / "tiny.safetensors"), "--quiet", "--refine", "0"])
    assert code == batch.EXIT_PAIRS_FAILED == 3  # one pair failed, the other was done
    rows = summary(tmp_path / "c" / "batch_summary.csv")
    assert [r["status"] for r in rows] == ["ok", "failed"] and rows[1]["dice_mean"] == ""
    assert rows[1]["error"] == f"moving image {files / 'nope.nii.gz'}: file not found"


ESCAPING = ["../escaped", "a/../../x", "sub/dir", "..", ".hidden", "batch_summary.csv", "a\\..\\..\\y"]


@pytest.mark.parametrize("name", ESCAPING + ["/absolute/path"])
def test_unsafe_names_are_refused(name):
    assert batch.name_problem(name) is not None


@pytest.mark.parametrize("name", ["sub-01_to_atlas", "p1", "a..b", "OAS1_0001#2", "x y"])
def test_plain_names_are_accepted(name):
    assert batch.name_problem(name) is None


def test_names_escaping_the_output_dir_fail_that_pair_only(files, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    absolute = tmp_path / "absolute"
    names = ESCAPING + [str(absolute), "good"]
    pairs = write_csv(work / "pairs.csv", [labelled(files, name) for name in names])
    out = work / "out"
    assert run_batch(files, pairs, out) == 3
    # nothing outside the output folder: not beside it, not above it, not at the absolute path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in work.iterdir()) == ["out", "pairs.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["batch_summary.csv", "good"]
    rows = {r["name"]: r for r in summary(out / "batch_summary.csv")}
    assert rows["good"]["status"] == "ok"
    for name in ESCAPING[:3] + [str(absolute)]:
        assert rows[name]["status"] == "failed" and "not a plain folder name" in rows[name]["error"]


def test_a_pair_failing_with_any_error_does_not_stop_the_batch(files, tmp_path, capsys):
    """A complex-valued image: SimpleITK itself raises while reading it (not an InputError)."""
    real = sitk.GetImageFromArray(np.random.default_rng(0).random((36, 40, 32)).astype(np.float32))
    sitk.WriteImage(sitk.RealAndImaginaryToComplex(real, real), str(tmp_path / "complex.nii"))
    rows = [labelled(files, "first"), labelled(files, "complex", tmp_path / "complex.nii"), labelled(files, "last")]
    pairs = write_csv(tmp_path / "pairs.csv", rows)
    assert run_batch(files, pairs, tmp_path / "out") == 3
    rows = summary(tmp_path / "out" / "batch_summary.csv")
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "complex" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert not any((tmp_path / "out" / "complex").iterdir())  # nothing half-written for the failed pair
    assert "dtnreg: pair complex: failed:" in capsys.readouterr().err


def test_ctrl_c_stops_the_batch_and_leaves_the_rest_pending(files, tmp_path, monkeypatch):
    pairs = write_csv(tmp_path / "pairs.csv", [labelled(files, f"p{i}") for i in range(3)])
    real_write, written = sitk.WriteImage, []

    def interrupt_in_second_pair(image, path, *args):
        written.append(path)
        if "/p1/" in path:
            raise KeyboardInterrupt
        return real_write(image, path, *args)

    monkeypatch.setattr(sitk, "WriteImage", interrupt_in_second_pair)
    assert run_batch(files, pairs, tmp_path / "out") == 1
    assert statuses(tmp_path / "out" / "batch_summary.csv") == {"p0": "ok", "p1": "pending", "p2": "pending"}
    assert not (tmp_path / "out" / "p2").exists() and not any((tmp_path / "out" / "p1").iterdir())


def test_resume_skips_verified_pairs_and_redoes_the_rest(files, tmp_path):
    own = tmp_path / "moving_copy.nii.gz"
    shutil.copy(files / "moving.nii.gz", own)
    pairs = write_csv(tmp_path / "pairs.csv", [labelled(files, "same"), labelled(files, "edited", own)])
    out = tmp_path / "out"
    assert run_batch(files, pairs, out) == 0
    warped = out / "same" / "warped.nii.gz"
    before = warped.stat().st_mtime_ns
    assert run_batch(files, pairs, out) == 0
    assert statuses(out / "batch_summary.csv") == {"same": "skipped", "edited": "skipped"}
    assert warped.stat().st_mtime_ns == before
    rows = summary(out / "batch_summary.csv")
    assert rows[0]["dice_mean"] != ""  # the Dice of a skipped pair comes from its report

    os.utime(own, ns=(own.stat().st_atime_ns, own.stat().st_mtime_ns + 10**9))  # the input was touched
    (out / "same" / "jacobian.nii.gz").unlink()  # an output went missing
    assert run_batch(files, pairs, out) == 0
    assert statuses(out / "batch_summary.csv") == {"same": "ok", "edited": "ok"}

    assert run_batch(files, pairs, out, "--alpha", "0.3") == 0  # other options: everything again
    assert statuses(out / "batch_summary.csv") == {"same": "ok", "edited": "ok"}
    assert run_batch(files, pairs, out, "--alpha", "0.3") == 0
    assert statuses(out / "batch_summary.csv") == {"same": "skipped", "edited": "skipped"}


def test_a_report_from_another_model_is_not_taken_as_done(files, tmp_path):
    pairs = write_csv(tmp_path / "pairs.csv", [labelled(files, "p")])
    assert run_batch(files, pairs, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "p" / "report.json").read_text())
    row = batch.batch_rows(cli.build_parser().parse_args(["batch", "--pairs", str(pairs), "--output-dir", "x"]))[0]
    folder = tmp_path / "out" / "p"
    assert batch.check_done(folder, row, report["options"], report["model"]["sha256"]) == (report, None)
    assert batch.check_done(folder, row, report["options"], "0" * 64) == (
        None,
        "its outputs were made with another model",
    )
    (folder / "report.json").unlink()
    assert batch.check_done(folder, row, report["options"], report["model"]["sha256"]) == (None, None)


def test_shards_split_the_cohort_and_their_summaries_merge(files, tmp_path, capsys):
    rows = [labelled(files, "a"), labelled(files, "b", files / "nope.nii.gz"), labelled(files, "c")]
    pairs = write_csv(tmp_path / "pairs.csv", rows)
    out = tmp_path / "out"
    assert run_batch(files, pairs, out, "--shard", "1/2") == 0  # pairs 0 and 2
    assert sorted(p.name for p in out.iterdir()) == ["a", "batch_summary-shard-1-of-2.csv", "c"]
    capsys.readouterr()
    assert cli.main(["batch-merge", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"dtnreg: error: output directory {out}: no summary from shard(s) 2 of 2"

    assert run_batch(files, pairs, out, "--shard", "2/2") == 3  # pair 1, whose moving image is missing
    assert statuses(out / "batch_summary-shard-2-of-2.csv") == {"b": "failed"}
    assert cli.main(["batch-merge", "--output-dir", str(out)]) == 3
    merged = summary(out / "batch_summary.csv")
    assert [(r["index"], r["name"], r["shard"], r["status"]) for r in merged] == [
        ("0", "a", "1/2", "ok"),
        ("1", "b", "2/2", "failed"),
        ("2", "c", "1/2", "ok"),
    ]


@pytest.mark.parametrize("shard", ["0/4", "5/4", "1/0", "a/b", "3", "1/2/3"])
def test_bad_shard_exits_2_with_one_line(files, tmp_path, capsys, shard):
    pairs = write_csv(tmp_path / "pairs.csv", [labelled(files, "p")])
    assert run_batch(files, pairs, tmp_path / "out", "--shard", shard) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dtnreg: error: --shard ") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_format_exits_2_before_any_pair(files, tmp_path, capsys):
    pairs = write_csv(tmp_path / "pairs.csv", [labelled(files, "p"), labelled(files, "q")])
    assert run_batch(files, pairs, tmp_path / "out", "--format", ".png") == 2
    err = capsys.readouterr().err.strip()
    assert err == "dtnreg: error: output format '.png' is not supported; choose one of .nii.gz, .nii, .nrrd, .mha, .mhd"
    assert not (tmp_path / "out").exists()
