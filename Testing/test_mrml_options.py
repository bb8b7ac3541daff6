"""The panel's cross-contrast and cavity options through the Logic and the child process's command line
(slicer-core: real MRML nodes, no registration run)."""

from __future__ import annotations

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


def test_a_bad_similarity_or_an_empty_left_out_region_is_refused(scene_inputs):
    context, moving, fixed, labels = scene_inputs
    logic = mrml.RegistrationLogic(context=context)
    with pytest.raises(ValueError, match="unknown refinement similarity 'nmi'"):
        logic.prepare(moving, fixed, refine_similarity="nmi")
    empty = ss.add_volume_from_array(context, np.zeros(labels.shape, np.uint16), ss.MOVING_IJK_TO_RAS, "e", True)
    with pytest.raises(ValueError, match="does not cover any voxel of the moving volume"):
        logic.prepare(moving, fixed, moving_exclusion_node=empty)
