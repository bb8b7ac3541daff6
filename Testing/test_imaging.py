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
