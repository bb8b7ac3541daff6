"""The panel's cross-contrast and cavity options through the Logic and the child process's command line
(slicer-core: real MRML nodes, no registration run)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

try:
    import slicer  # noqa: F401  (slicer-core: real MRML, headless)
except ImportError as err:  # pragma: no cover - depends on the environment
    pytest.skip(
        f"SKIPPING THE MRML OPTION TESTS: `import slicer` failed ({err}). Install slicer-core (Python >= 3.10).",
        allow_module_level=True,
    )

import SimpleITK as sitk  # noqa: N813
import slicer_scene as ss

from DTNRegistrationLib import mrml
from DTNRegistrationLib.cli.arguments import build_parser, registration_options
from DTNRegistrationLib.errors import InputError
from DTNRegistrationLib.options import RegistrationOptions

# Enough to satisfy `dtnreg register`'s required arguments; the files are never opened by the parser.
REGISTER_PREFIX = ["register", "--moving", "m.nii.gz", "--fixed", "f.nii.gz", "--output-dir", "out"]


@pytest.fixture
def scene_inputs():
    context = ss.headless_scene()
    moving, fixed, segmentation, labels = ss.make_test_volumes(context)
    return context, moving, fixed, labels


def test_a_left_out_region_reaches_the_engine_as_the_moving_mask_and_the_similarity_as_asked(scene_inputs, tmp_path):
    """The panel names what to leave out (a cavity); the engine gets its complement as ``--moving-mask``, on the
    moving volume's grid, and the chosen similarity as ``--refine-similarity``."""
    context, moving, fixed, labels = scene_inputs
    cavity = np.zeros(labels.shape, np.uint16)
    cavity[4:8, 5:9, 6:10] = 1
    cavity_node = ss.add_volume_from_array(context, cavity, ss.MOVING_IJK_TO_RAS, "cavity", labelmap=True)
    logic = mrml.RegistrationLogic(context=context)
    job = logic.prepare(moving, fixed, refine_similarity="ngf", moving_exclusion_node=cavity_node)
    mask = sitk.GetArrayFromImage(job.moving_mask)
    assert mask.shape == sitk.GetArrayFromImage(job.moving).shape
    assert int((mask == 0).sum()) == int(cavity.sum()) and int(mask.sum()) == mask.size - int(cavity.sum())
    runner = mrml.RegistrationRunner(job, temp_root=tmp_path)
    runner.folder = tmp_path
    command = runner.command()
    assert command[command.index("--refine-similarity") + 1] == "ngf"
    written = sitk.ReadImage(command[command.index("--moving-mask") + 1])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), mask)
    plain = runner.__class__(logic.prepare(moving, fixed), temp_root=tmp_path)
    plain.folder = tmp_path / "plain"
    plain.folder.mkdir()
    plain_command = plain.command()
    assert "--moving-mask" not in plain_command and "--refine-similarity" not in plain_command
    assert "--mask" not in plain_command


def test_a_bad_similarity_or_an_empty_left_out_region_is_refused(scene_inputs):
    context, moving, fixed, labels = scene_inputs
    logic = mrml.RegistrationLogic(context=context)
    with pytest.raises(ValueError, match="unknown refinement similarity 'nmi'"):
        logic.prepare(moving, fixed, refine_similarity="nmi")
    empty = ss.add_volume_from_array(context, np.zeros(labels.shape, np.uint16), ss.MOVING_IJK_TO_RAS, "e", True)
    with pytest.raises(ValueError, match="does not cover any voxel of the moving volume"):
        logic.prepare(moving, fixed, moving_exclusion_node=empty)


@pytest.mark.parametrize(
    "options",
    [
        RegistrationOptions(),
        RegistrationOptions(alpha=0.37, affine=False, device="cpu"),
        RegistrationOptions(preset="accurate", refine_similarity="ngf"),
        RegistrationOptions(preset="fast", device="cuda"),
        RegistrationOptions(device="cuda:1"),
        RegistrationOptions(refine=0, refine_similarity="mind", outputs=("warped", "inverse")),
        RegistrationOptions(refine=7, alpha=1e-3, refine_similarity="mse", outputs=("displacement",)),
        RegistrationOptions(alpha=0.1 + 0.2, refine=7, preset="accurate", affine=False, model="weights.safetensors"),
        RegistrationOptions(preset="longitudinal", refine=5),
    ],
    ids=[
        "defaults",
        "alpha-no-affine",
        "accurate-ngf",
        "fast-cuda",
        "second-gpu",
        "refine0-mind-outputs",
        "refine7-mse",
        "mixed",
        "longitudinal-refine",
    ],
)
def test_options_round_trip_through_the_command_lines_own_parser(options):
    """What the panel asks for is what the child process parses: ``arguments()`` read back by ``dtnreg register``'s
    real parser gives the same options."""
    args = build_parser().parse_args([*REGISTER_PREFIX, *options.arguments()])
    # Not carried by arguments(), legitimately: the model (the runner adds it, made absolute, since a relative path
    # depends on the working directory; see test_runner_command_carries_the_fixed_mask_and_every_option), and a
    # preset once a step count is given (--refine replaces its schedule), unless it chooses the alignment (rigid).
    dropped = options.refine is not None and not options.rigid
    expected = dataclasses.replace(options, model=None, preset=None if dropped else options.preset)
    parsed = registration_options(args)
    assert parsed == expected and parsed.rigid == options.rigid


@pytest.mark.parametrize("device", ["tpu", "cuda1", "cuda:", "cuda:x", "gpu"])
def test_an_unknown_device_is_a_usage_error_naming_it(device, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*REGISTER_PREFIX, "--device", device])
    assert exit_info.value.code == 2 and f"unknown device '{device}'" in capsys.readouterr().err
    with pytest.raises(InputError, match="unknown device"):
        RegistrationOptions(device=device)


def test_runner_command_carries_the_fixed_mask_and_every_option(scene_inputs, tmp_path, monkeypatch):
    """A fixed mask reaches the child as ``--mask PATH`` holding the mask on the fixed grid; the whole command line,
    parsed by the command line's own parser, gives back the job's options (a relative model path made absolute:
    the child runs in another working directory)."""
    context, moving, fixed, labels = scene_inputs
    fixed_image = mrml.volume_to_image(fixed)
    region = np.zeros(sitk.GetArrayViewFromImage(fixed_image).shape, np.uint16)
    region[3:9, 4:12, 5:11] = 7  # any non-zero value is "inside"
    mask_node = ss.add_volume_from_array(context, region, ss.FIXED_IJK_TO_RAS, "brain mask", labelmap=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"not read here")
    model = "weights.safetensors"
    logic = mrml.RegistrationLogic(context=context)
    job = logic.prepare(
        moving,
        fixed,
        alpha=0.37,
        device="cpu",
        model=model,
        refine=7,
        refine_similarity="ngf",
        affine=False,
        mask_node=mask_node,
    )
    runner = mrml.RegistrationRunner(job, temp_root=tmp_path)
    runner.folder = tmp_path / "run"
    runner.folder.mkdir()
    command = runner.command()
    assert command[1:4] == ["-m", "DTNRegistrationLib.cli", "register"]
    args = build_parser().parse_args(command[3:])
    assert args.mask is not None, command
    written = sitk.ReadImage(args.mask)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), (region > 0).astype(np.uint8))
    assert written.GetSize() == fixed_image.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), fixed_image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(written.GetSpacing(), fixed_image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(written.GetDirection(), fixed_image.GetDirection(), atol=1e-9)
    assert job.options == RegistrationOptions(
        alpha=0.37, device="cpu", model=model, refine=7, refine_similarity="ngf", affine=False
    )
    absolute = str((tmp_path / model).resolve())
    assert registration_options(args) == dataclasses.replace(job.options, model=absolute)
    assert args.moving_mask is None and args.progress_format == "jsonl"
