import numpy as np
import SimpleITK as sitk

from DTNRegistrationLib.core import imaging


def test_intensity_normalisation_keeps_dark_tissue_apart_from_the_background():
    """A skull-stripped brain: background 0, a thin rim of dark CSF (below the brain's 1st percentile), grey and
    white matter. The rim must stay brighter than the background, or the brain's outline is lost to the
    registration (it was clipped to 0 before)."""
    array = np.zeros((40, 40, 40), np.float32)
    zz, yy, xx = np.mgrid[:40, :40, :40]
    radius = np.sqrt((zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2)
    array[radius < 16] = 30.0  # CSF rim
    array[radius < 15] = 80.0  # grey matter
    array[radius < 10] = 120.0  # white matter
    image = sitk.GetImageFromArray(array)
    brain = sitk.GetImageFromArray((radius < 15).astype(np.uint8))  # a foreground mask without the rim
    out = sitk.GetArrayFromImage(imaging.normalize_intensity(image, brain))
    rim = (radius >= 15) & (radius < 16)
    assert out[radius > 17].max() == 0.0
    assert out[rim].min() > 0.1
    assert out[radius < 10].max() == 1.0 and 0.5 < float(out[(radius >= 10) & (radius < 15)].mean()) < 0.8


def _random_image(spacing: float, origin, direction, size=(48, 40, 44), seed=0) -> sitk.Image:
    """Integer-valued voxels, so that any interpolation between two of them shows as a fraction."""
    array = np.random.default_rng(seed).integers(0, 1000, size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([spacing] * 3)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _box_mask(image: sitk.Image, extent: int) -> sitk.Image:
    """A cube of ``extent`` voxels: odd, it puts the grid's centre on a voxel centre and (grid sizes being even)
    the grid's voxels half-way between the image's."""
    box = np.zeros(image.GetSize()[::-1], np.uint8)
    box[5 : 5 + extent, 5 : 5 + extent, 5 : 5 + extent] = 1
    mask = sitk.GetImageFromArray(box)
    mask.CopyInformation(image)
    return mask


def _inside(image: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """The grid voxels whose centres are inside ``image`` (resampled values there are interpolations)."""
    ones = sitk.Image(image.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(image)
    return sitk.GetArrayFromImage(imaging.resample(ones, grid)) > 0.999


def test_a_work_grid_at_the_image_spacing_samples_the_image_instead_of_interpolating_it():
    """A 2 mm RAS image whose voxel centres fall half-way between those of the LPS grid built around it: moved onto
    its voxel centres (by less than a voxel), the grid copies the image's values exactly."""
    ras = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    image = _random_image(2.0, (91.0, 117.3, -70.6), ras)
    reference = imaging.model_reference(image, 2.0, mask=_box_mask(image, 31))
    inside = _inside(image, reference)
    before = sitk.GetArrayFromImage(imaging.resample(image, reference))[inside]
    assert np.abs(before - np.round(before)).max() > 0.1  # the construction interpolates as built

    snapped = imaging.on_voxel_centres(reference, image)
    shift = np.abs(np.array(snapped.GetOrigin()) - np.array(reference.GetOrigin()))
    assert shift.max() <= 1.0 + 1e-9  # at most half a voxel of the image
    assert snapped.GetSize() == reference.GetSize() and snapped.GetSpacing() == reference.GetSpacing()
    inside = _inside(image, snapped)
    after = sitk.GetArrayFromImage(imaging.resample(image, snapped))[inside]
    assert inside.sum() > 0.5 * inside.size
    np.testing.assert_allclose(after, np.round(after), atol=1e-3)
    assert set(np.unique(np.round(after))) <= set(np.unique(sitk.GetArrayFromImage(image)))


def test_a_finer_image_lands_on_the_voxel_centres_of_the_work_grids_finer_pyramid_level():
    """A 1 mm image and a 2 mm work grid: the grid's 1 mm pyramid level (``finer_grid``) samples the image exactly,
    so each 2 mm voxel sits at the centre of a 2-cube of the image's voxels."""
    image = _random_image(1.0, (-40.3, -35.75, -42.1), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), size=(64, 64, 64))
    reference = imaging.model_reference(image, 2.0, mask=_box_mask(image, 45))
    index = np.array(image.TransformPhysicalPointToContinuousIndex(reference.GetOrigin()))
    assert np.abs(index - np.floor(index) - 0.5).max() > 0.4  # as built, 2 mm voxels centred on 1 mm ones
    snapped = imaging.on_voxel_centres(reference, image)
    fine = imaging.finer_grid(snapped, 2)
    inside = _inside(image, fine)
    values = sitk.GetArrayFromImage(imaging.resample(image, fine))[inside]
    np.testing.assert_allclose(values, np.round(values), atol=1e-3)
    index = np.array(image.TransformPhysicalPointToContinuousIndex(snapped.GetOrigin()))
    np.testing.assert_allclose(index - np.floor(index), 0.5, atol=1e-6)


def test_index_map_follows_sitk_through_an_affine_between_oblique_grids():
    grid = sitk.Image([20, 30, 40], sitk.sitkFloat32)
    grid.SetSpacing((1.0, 1.5, 2.0))
    grid.SetOrigin((3.0, -2.0, 7.0))
    grid.SetDirection(sitk.VersorTransform((0.3, 0.2, 0.9), 0.7).GetMatrix())
    image = sitk.Image([50, 40, 30], sitk.sitkFloat32)
    image.SetSpacing((0.9, 1.1, 1.3))
    image.SetOrigin((-20.0, 5.0, -3.0))
    image.SetDirection((-1.0, 0, 0, 0, 0, 1.0, 0, -1.0, 0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.05, 0.02, -0.01, 0.03, 0.97, 0.04, -0.02, 0.01, 1.02))
    affine.SetTranslation((1.5, -2.5, 0.8))
    affine.SetCenter((4.0, 2.0, -6.0))
    index_map = imaging.index_map(grid, image, affine)
    for index in [(0, 0, 0), (19, 29, 39), (7, 12, 33)]:
        point = affine.TransformPoint(grid.TransformIndexToPhysicalPoint(index))
        expected = image.TransformPhysicalPointToContinuousIndex(point)[::-1]  # array order
        got = index_map[:, :3] @ np.array(index[::-1], float) + index_map[:, 3]
        np.testing.assert_allclose(got, expected, atol=1e-9)
