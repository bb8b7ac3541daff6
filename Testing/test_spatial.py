import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import blob_volume, smooth_displacement

from DTNRegistrationLib.core import spatial


def test_zero_field_warp_is_exact():
    image = torch.rand(1, 1, 12, 14, 16)
    assert torch.equal(spatial.warp(image, torch.zeros(1, 3, 12, 14, 16)), image)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_translation_matches_simpleitk_convention(axis):
    """u = +t along one axis samples the moving image at x + t, i.e. the blob moves by -t, as sitk.Resample does."""
    shape, shift = (24, 28, 32), 3.0
    volume = blob_volume(shape, radius=5)
    u = torch.zeros(1, 3, *shape)
    u[0, axis] = shift
    ours = spatial.warp(torch.from_numpy(volume)[None, None], u)[0, 0].numpy()

    image = sitk.GetImageFromArray(volume)
    offset = [0.0, 0.0, 0.0]
    offset[2 - axis] = shift  # sitk's x, y, z are array axes 2, 1, 0
    reference = sitk.Resample(image, image, sitk.TranslationTransform(3, offset), sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(ours, sitk.GetArrayFromImage(reference), atol=1e-5)
    # the blob's centre of mass moved by -shift along the axis
    com = [(np.indices(shape)[a] * ours).sum() / ours.sum() for a in range(3)]
    assert com[axis] == pytest.approx(shape[axis] / 2 - shift, abs=0.05)


def test_exp_v_composed_with_exp_minus_v_is_identity():
    """Bound: max |exp(v) o exp(-v) - id| < 0.05 voxel inside the volume for a smooth field of 3-voxel amplitude."""
    shape = (32, 32, 32)
    v = torch.from_numpy(smooth_displacement(shape, 3.0, seed=1))[None]
    forward, backward = spatial.integrate(v), spatial.inverse(v)
    residual = spatial.compose(forward, backward)[0, :, 4:-4, 4:-4, 4:-4]
    assert residual.abs().max() < 0.05
    assert forward.abs().max() > 2.0  # the field is not trivially small


def test_integration_of_zero_and_constant_fields():
    assert torch.equal(spatial.integrate(torch.zeros(1, 3, 8, 8, 8)), torch.zeros(1, 3, 8, 8, 8))
    constant = torch.zeros(1, 3, 16, 16, 16)
    constant[:, 1] = 1.5  # the flow of a constant velocity is the same translation
    out = spatial.integrate(constant)[0, 1, 4:-4, 4:-4, 4:-4]
    assert torch.allclose(out, torch.full_like(out, 1.5), atol=1e-5)


def test_resize_field_rescales_magnitudes():
    u = torch.zeros(1, 3, 8, 10, 12)
    u[:, 0], u[:, 1], u[:, 2] = 1.0, 2.0, -1.0
    up = spatial.resize_field(u, (16, 20, 24))
    assert up.shape == (1, 3, 16, 20, 24)
    assert torch.allclose(up[:, 0], torch.full_like(up[:, 0], 2.0))
    assert torch.allclose(up[:, 1], torch.full_like(up[:, 1], 4.0))
    assert torch.allclose(up[:, 2], torch.full_like(up[:, 2], -2.0))


def test_nearest_warp_keeps_label_values():
    labels = torch.randint(0, 5, (1, 1, 10, 10, 10), dtype=torch.int32)
    u = torch.from_numpy(smooth_displacement((10, 10, 10), 1.3))[None]
    out = spatial.warp(labels, u, mode="nearest")
    assert out.dtype == torch.int32
    assert set(out.unique().tolist()) <= set(labels.unique().tolist())


def test_warp_rejects_mismatched_grids():
    with pytest.raises(ValueError, match="differ"):
        spatial.warp(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 9))


def test_gradient_flows_through_a_zero_field():
    """Optimising from exactly zero (refinement, training) must see the image gradient."""
    image = torch.from_numpy(blob_volume((16, 16, 16), radius=4))[None, None]
    u = torch.zeros(1, 3, 16, 16, 16, requires_grad=True)
    spatial.warp(image, u).sum().backward()
    assert u.grad.abs().sum() > 0
