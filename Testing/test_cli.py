"""The dtnreg command line: the output contract, formats, batch use, exit codes and all-or-nothing outputs."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import write_phantom_pair

from DTNRegistrationLib.cli import commands as cli
from DTNRegistrationLib.core import models

SHAPE = (32, 40, 36)
OUTPUTS = ["warped", "displacement", "jacobian", "folding", "warped_labels"]  # the default: no inverse


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_pair_files(tmp_path_factory.mktemp("cli"))


def write_pair_files(root):
    """The phantom pair of conftest at this module's shape."""
    return write_phantom_pair(root, SHAPE)


def run(files, out, *extra) -> int:
    return cli.main(
        ["register", "--moving", str(files / "moving.nii.gz"), "--fixed", str(files / "fixed.nii.gz")]
        + ["--output-dir", str(out), "--model", str(files / "tiny.safetensors"), "--quiet", "--refine", "0", *extra]
    )


def test_register_writes_the_contract(files, tmp_path):
    out = tmp_path / "out"
    labels = [
        "--moving-labels",
        str(files / "moving_labels.nii.gz"),
        "--fixed-labels",
        str(files / "fixed_labels.nii.gz"),
    ]
    assert run(files, out, *labels) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.nii.gz" for n in OUTPUTS] + ["report.json"])
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["sha256"] == models.sha256_file(files / "tiny.safetensors")
    assert set(report["metrics"]["dice"]) == {"1", "2", "3"}
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    fixed_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(files / "fixed_labels.nii.gz")))
    for label, dice in report["metrics"]["dice"].items():  # the report scores the labels that were written
        a, b = written == int(label), fixed_labels == int(label)
        assert dice == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
    assert report["metrics"]["dice_mean"] == pytest.approx(np.mean(list(report["metrics"]["dice"].values())))
    assert {"affine", "network", "total"} <= set(report["timings_s"])
    assert report["versions"]["torch"] == torch.__version__ and report["device"] == "cpu"
    # what the outputs were made from, for `dtnreg batch` to recognise them
    assert sorted(report["outputs"]) == sorted(f"{n}.nii.gz" for n in OUTPUTS)
    moving = report["input_files"]["moving"]
    assert moving["path"] == str((files / "moving.nii.gz").resolve())
    assert moving["bytes"] == (files / "moving.nii.gz").stat().st_size and report["input_files"]["mask"] is None
    assert report["options"] == {
        "alpha": None,
        "refine": 0,
        "preset": None,
        "refine_similarity": "auto",
        "affine": True,
        "format": ".nii.gz",
        "outputs": ["displacement", "folding", "jacobian", "warped"],
    }
    # the displacement alone reproduces warped.nii.gz
    moving, fixed = sitk.ReadImage(str(files / "moving.nii.gz")), sitk.ReadImage(str(files / "fixed.nii.gz"))
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    )
    again = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(warped), atol=1e-5)


@pytest.mark.parametrize("extension", [".nrrd", ".mha"])
def test_other_formats_give_the_same_result(files, tmp_path, extension):
    for name in ("moving", "fixed"):
        sitk.WriteImage(sitk.ReadImage(str(files / f"{name}.nii.gz")), str(tmp_path / f"{name}{extension}"))
    args = [
        "register",
        "--moving",
        str(tmp_path / f"moving{extension}"),
        "--fixed",
        str(tmp_path / f"fixed{extension}"),
    ]
    common = ["--model", str(files / "tiny.safetensors"), "--quiet", "--refine", "0", "--format", extension]
    assert cli.main(args + ["--output-dir", str(tmp_path / "a"), *common]) == 0
    assert run(files, tmp_path / "b") == 0
    a = sitk.ReadImage(str(tmp_path / "a" / f"warped{extension}"))
    b = sitk.ReadImage(str(tmp_path / "b" / "warped.nii.gz"))
    np.testing.assert_allclose(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b), atol=1e-5)


def test_four_d_singleton_image_is_accepted(files, tmp_path):
    volume = sitk.ReadImage(str(files / "moving.nii.gz"))
    series = sitk.JoinSeries([volume])
    sitk.WriteImage(series, str(tmp_path / "moving4d.nii.gz"))
    args = ["register", "--moving", str(tmp_path / "moving4d.nii.gz"), "--fixed", str(files / "fixed.nii.gz")]
    common = ["--output-dir", str(tmp_path / "o"), "--model", str(files / "tiny.safetensors"), "--quiet"]
    assert cli.main(args + common + ["--refine", "0"]) == 0
    assert run(files, tmp_path / "three_d") == 0  # the same volume as a 3-D file registers the same way
    for name in ("warped.nii.gz", "displacement.nii.gz"):  # to round-off: the affine's threads sum in any order
        np.testing.assert_allclose(
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o" / name))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "three_d" / name))),
            atol=1e-6,
        )


def _write_series(folder):
    """Two volumes in one 4-D file (a time series, or diffusion): which one to register is not dtnreg's to guess."""
    volume = sitk.GetImageFromArray(np.random.default_rng(0).random(SHAPE).astype(np.float32))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(folder / "series.nii.gz"))
    return folder / "series.nii.gz"


def _write(path, array, spacing=(2.0, 2.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _with_nan() -> np.ndarray:
    array = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    array[5, 6, 7] = np.nan
    return array


def _truncated(folder):
    """A NIfTI file cut to half its compressed bytes: SimpleITK alone would read it, the rest zero-filled."""
    path = _write(folder / "cut.nii.gz", np.random.default_rng(0).random(SHAPE).astype(np.float32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


BAD_INPUTS = {
    "missing": (lambda d: d / "nope.nii.gz", "file not found"),
    "unreadable": (lambda d: (d / "junk.nii.gz").write_bytes(b"not an image") and d / "junk.nii.gz", "cannot be read"),
    "two_d": (lambda d: _write(d / "flat.nrrd", np.random.rand(30, 30).astype(np.float32), (1.0, 1.0)), "2-D image"),
    "constant": (lambda d: _write(d / "const.nii.gz", np.ones(SHAPE, np.float32)), "is constant"),
    "nan": (lambda d: _write(d / "nan.mha", _with_nan()), "NaN or Inf"),
    "four_d": (_write_series, "a 4-D image with 2 volumes; give a single 3-D volume"),
    "truncated": (_truncated, "cut.nii.gz: truncated: the compressed data ends before its end-of-stream marker"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_moving_image_exits_2_and_leaves_nothing(files, tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    bad = make(tmp_path)
    out = tmp_path / "out"
    code = cli.main(
        ["register", "--moving", str(bad), "--fixed", str(files / "fixed.nii.gz"), "--output-dir", str(out)]
        + ["--model", str(files / "tiny.safetensors"), "--quiet"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and str(bad) in err and len(err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_bad_labels_exit_2(files, tmp_path, capsys):
    fractional = _write(tmp_path / "frac.nii.gz", np.random.rand(*SHAPE).astype(np.float32))
    other_grid = _write(tmp_path / "grid.nii.gz", np.zeros((8, 8, 8), np.uint8))
    for path, message in ((fractional, "not an integer label map"), (other_grid, "does not match its image")):
        code = run(files, tmp_path / "out", "--moving-labels", str(path))
        assert code == 2 and message in capsys.readouterr().err
        assert not any((tmp_path / "out").iterdir())


def test_unwritable_output_dir_exits_2(files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert run(files, blocker / "out") == 2
    assert "cannot be written" in capsys.readouterr().err


def test_cuda_absent_exits_2(files, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    assert run(files, tmp_path / "out", "--device", "cuda") == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not any((tmp_path / "out").iterdir())


def test_failure_while_writing_leaves_no_partial_output(files, tmp_path, monkeypatch):
    """Ctrl-C after the first file was written: the staging folder is removed, nothing is left."""
    real_write = sitk.WriteImage
    calls = []

    def write_then_interrupt(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", write_then_interrupt)
    assert run(files, tmp_path / "out") == 1
    assert len(calls) >= 2 and list((tmp_path / "out").iterdir()) == []


def test_unknown_model_exits_2(files, tmp_path, capsys):
    code = cli.main(
        ["register", "--moving", str(files / "moving.nii.gz"), "--fixed", str(files / "fixed.nii.gz")]
        + ["--output-dir", str(tmp_path / "o"), "--model", "no-such-model", "--quiet"]
    )
    assert code == 2 and "unknown model 'no-such-model'" in capsys.readouterr().err


def test_scene_option_writes_an_mrb_that_loads_back(files, tmp_path):
    slicer_scene = pytest.importorskip("slicer_scene", reason="slicer-core (MRML) is not importable here")
    scene_path = tmp_path / "scenes" / "result.mrb"
    labels = ["--moving-labels", str(files / "moving_labels.nii.gz")]
    assert run(files, tmp_path / "out", *labels, "--scene", str(scene_path)) == 0
    assert scene_path.is_file() and not (tmp_path / "out" / "result.mrb").exists()
    context = slicer_scene.headless_scene()
    assert context.scene.ReadFromMRB(str(scene_path))
    names = {context.scene.GetNthNode(i).GetName() for i in range(context.scene.GetNumberOfNodes())}
    assert {"moving", "fixed", "moving to fixed DTN transform", "moving warped to fixed"} <= names


def test_only_the_outputs_asked_for_are_written_and_float_maps_are_valid_gzip(files, tmp_path):
    out = tmp_path / "o"
    assert (
        run(files, out, "--outputs", "displacement,inverse", "--moving-labels", str(files / "moving_labels.nii.gz"))
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == ["displacement.nii.gz", "inverse_displacement.nii.gz", "report.json", "warped_labels.nii.gz"]
    with gzip.open(out / "displacement.nii.gz", "rb") as handle:  # stored blocks, but a gzip stream all the same
        assert len(handle.read()) > 3 * 4 * np.prod(SHAPE)
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert field.GetSize() == SHAPE[::-1] and field.GetNumberOfComponentsPerPixel() == 3
    with pytest.raises(SystemExit) as exit_info:
        run(files, tmp_path / "bad", "--outputs", "warped,everything")
    assert exit_info.value.code == 2


def test_the_folding_file_marks_the_folds_that_the_report_counts(files, tmp_path, rough_network_field):
    """A rough velocity (the network's safeguard bypassed) folds the map; the written folding map is exactly
    det J <= 0 of the written Jacobian, and the report counts its voxels."""
    out = tmp_path / "out"
    assert run(files, out) == 0
    folding = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "folding.nii.gz")))
    jacobian = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["folding_count"] == int(folding.sum()) > 100
    np.testing.assert_array_equal(folding == 1, jacobian <= 0)


def test_presets_reach_the_report(files, tmp_path):
    assert (
        cli.main(
            ["register", "--moving", str(files / "moving.nii.gz"), "--fixed", str(files / "fixed.nii.gz"), "--quiet"]
            + ["--output-dir", str(tmp_path / "a"), "--model", str(files / "tiny.safetensors"), "--preset", "fast"]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "a" / "report.json").read_text())["metrics"]
    assert metrics["preset"] == "fast" and metrics["refine_levels_mm"] == [4.0, 2.0]
    taken = metrics["refine_steps_taken"]
    assert len(taken) == 2 and 0 < sum(taken) <= metrics["refine_steps"]


def test_refinement_options_reach_the_report(files, tmp_path):
    assert run(files, tmp_path / "o", "--refine", "2", "--refine-similarity", "ncc") == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["metrics"]["refine_steps"] == 2 and report["metrics"]["refine_similarity"] == "ncc"
    assert report["metrics"]["start"].startswith(("network", "identity")) and "refine" in report["timings_s"]


def test_moving_mask_and_auto_similarity_reach_the_report_and_a_slab_warns_even_quiet(files, tmp_path, capsys):
    moving = sitk.ReadImage(str(files / "moving.nii.gz"))
    hole = np.ones(SHAPE, np.uint8)
    hole[12:18, 14:20, 12:18] = 0  # a "cavity" left out
    mask = sitk.GetImageFromArray(hole)
    mask.CopyInformation(moving)
    sitk.WriteImage(mask, str(files / "moving_mask.nii.gz"))
    sitk.WriteImage(moving[:, :, 10:22], str(tmp_path / "slab.nii.gz"))
    assert run(files, tmp_path / "m", "--refine", "1", "--moving-mask", str(files / "moving_mask.nii.gz")) == 0
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["input_files"]["moving_mask"]["path"] == str((files / "moving_mask.nii.gz").resolve())
    assert report["metrics"]["refine_similarity"].startswith("ncc (auto: increasing share")
    assert report["metrics"]["moving_mask_excluded"]["fixed_voxels"] > 0
    capsys.readouterr()
    slab = ["register", "--moving", str(tmp_path / "slab.nii.gz"), "--fixed", str(files / "fixed.nii.gz"), "--quiet"]
    assert cli.main(slab + ["--output-dir", str(tmp_path / "s"), "--model", str(files / "tiny.safetensors")]) == 0
    assert "dtnreg: warning: the moving image's field of view covers only" in capsys.readouterr().err
    sitk.WriteImage(mask[:, :, 10:22], str(tmp_path / "slab_mask.nii.gz"))
    assert run(files, tmp_path / "c", "--moving-mask", str(tmp_path / "slab_mask.nii.gz")) == 2
    err = capsys.readouterr().err
    assert "moving mask" in err and "does not match its image's geometry" in err


# ----------------------------------------------------------------------------------------------------------------
# --progress-format jsonl: what a parent process (the Slicer module) reads
# ----------------------------------------------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict]:
    lines = text.splitlines()
    assert lines, "nothing on stdout"
    return [json.loads(line) for line in lines]  # every line is one JSON object: nothing else on stdout


def test_jsonl_progress_one_line_per_stage_and_step(files, tmp_path, capsys):
    out = tmp_path / "out"
    labels = ["--moving-labels", str(files / "moving_labels.nii.gz")]
    assert run(files, out, "--refine", "3", "--progress-format", "jsonl", "--format", ".nrrd", *labels) == 0
    captured = capsys.readouterr()
    lines = _json_lines(captured.out)
    assert lines[0]["message"] == "started" and lines[0]["pid"] > 0
    fractions = [line["fraction"] for line in lines]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    steps = [line["message"] for line in lines if line["message"].startswith("refining: step")]
    assert [s.split(",")[0] for s in steps] == ["refining: step 1/3", "refining: step 2/3", "refining: step 3/3"]
    for stage in ("loading model", "affine initialisation", "propagating labels"):
        assert any(line["message"] == stage for line in lines), stage
    done = lines[-1]
    assert done["message"] == "done" and done["output_dir"] == str(out.resolve())
    assert done["report"] == str(out.resolve() / "report.json") and "warped_labels.nrrd" in done["files"]
    assert "refining" not in captured.err  # no progress bar on stderr in this mode

    # The files read back into a result equal to what was written, affine included.
    from DTNRegistrationLib.core import result as result_files

    back = result_files.read_result(out, ".nrrd")
    report = json.loads((out / "report.json").read_text())
    assert back.displacement.GetPixelID() == sitk.sitkVectorFloat64
    assert back.metrics == report["metrics"] and back.device == "cpu" and back.alpha == report["alpha"]
    # the affine read back is the engine's: the same alignment made in-process maps points to the same places
    from DTNRegistrationLib.core import alignment

    moving = sitk.ReadImage(str(files / "moving.nii.gz"), sitk.sitkFloat32)
    fixed = sitk.ReadImage(str(files / "fixed.nii.gz"), sitk.sitkFloat32)
    engine = alignment.align(moving, fixed, affine=True).transform
    for index in [(0, 0, 0), (5, 17, 30), tuple(n - 1 for n in fixed.GetSize())]:
        point = fixed.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(back.affine.TransformPoint(point), engine.TransformPoint(point), atol=1e-3)
    # the propagated labels are the moving labels carried through the written displacement
    moving_labels = sitk.ReadImage(str(files / "moving_labels.nii.gz"))
    carried = sitk.Resample(
        moving_labels,
        back.warped,
        sitk.DisplacementFieldTransform(sitk.Image(back.displacement)),
        sitk.sitkNearestNeighbor,
        0,
        moving_labels.GetPixelID(),
    )
    assert sitk.GetArrayFromImage(back.warped_labels).any()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back.warped_labels), sitk.GetArrayFromImage(carried))
    again = sitk.Resample(moving, back.warped, sitk.DisplacementFieldTransform(back.displacement))
    np.testing.assert_allclose(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(back.warped), atol=1e-4)


def test_jsonl_error_is_one_json_line_with_its_exit_code(files, tmp_path, capsys):
    code = run(files, tmp_path / "out", "--moving-labels", str(tmp_path / "nope.nii.gz"), "--progress-format", "jsonl")
    lines = _json_lines(capsys.readouterr().out)
    assert code == 2
    assert lines[-1]["exit_code"] == 2 and lines[-1]["kind"] == "input"
    assert "nope.nii.gz" in lines[-1]["error"] and "\n" not in lines[-1]["error"]


def test_read_result_names_a_missing_file(tmp_path):
    from DTNRegistrationLib import errors
    from DTNRegistrationLib.core import result

    with pytest.raises(errors.RegistrationFailed, match="no readable report"):
        result.read_result(tmp_path)
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(errors.RegistrationFailed, match="warped.nrrd"):
        result.read_result(tmp_path)


def test_errors_are_one_class_each_wherever_imported():
    from DTNRegistrationLib import errors
    from DTNRegistrationLib.core import imaging, models, registration

    assert imaging.InputError is errors.InputError and models.ModelError is errors.ModelError
    assert errors.DataError is errors.DataError and registration.Cancelled is errors.Cancelled
    assert issubclass(errors.DataError, errors.InputError)
