"""Cross-contrast registration: normalised gradient fields and MIND-SSC descriptors, the ``auto`` choice, and a
known deformation across contrasts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import known_deformation_labels, phantom_labels, register_pair, zero_velocity_model

from DTNRegistrationLib.core import losses, metrics, modality, refinement, registration

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (40, 48, 44)  # (z, y, x), 2 mm voxels
# Background, then the phantom's labels 1..3: a T1-like contrast and a T2-like one (order of 1..3 permuted).
T1_LIKE = np.array([0.0, 0.45, 0.8, 0.25])
T2_LIKE = np.array([0.0, 0.35, 0.15, 0.9])


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-40.0, -50.0, -30.0))
    return image


def _contrast(labels: np.ndarray, table: np.ndarray, seed: int) -> np.ndarray:
    return (table[labels] + np.random.default_rng(seed).normal(0, 0.01, labels.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return zero_velocity_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def cross_pair():
    """A T1-like fixed phantom and a T2-like moving one under a known smooth diffeomorphism."""
    fixed_labels, moving_labels = known_deformation_labels(SHAPE)
    return {
        "fixed": _image(_contrast(fixed_labels, T1_LIKE, 0)),
        "moving": _image(_contrast(moving_labels, T2_LIKE, 1)),
        "fixed_labels": _image(fixed_labels.astype(np.int32)),
        "moving_labels": _image(moving_labels.astype(np.int32)),
        "moving_labels_array": moving_labels,
        "fixed_labels_array": fixed_labels,
    }


def test_mind_descriptors_describe_structure_not_contrast():
    """The same anatomy in two contrasts gives nearly the same descriptors; the same contrast moved by 2 voxels
    gives clearly different ones (what makes them a similarity at all)."""
    labels = phantom_labels(SHAPE)
    t1 = torch.from_numpy(_contrast(labels, T1_LIKE, 0))[None, None]
    t2 = torch.from_numpy(_contrast(labels, T2_LIKE, 1))[None, None]
    shifted = torch.roll(t1, shifts=2, dims=4)
    d1, d2, ds = modality.mind_ssc(t1), modality.mind_ssc(t2), modality.mind_ssc(shifted)
    assert d1.shape == (1, modality.MIND_CHANNELS, *SHAPE)
    assert float((t1 - t2).abs().mean()) > float((t1 - shifted).abs().mean())  # in intensity, contrast differs more
    across_contrast = float((d1 - d2).abs().mean())
    across_shift = float((d1 - ds).abs().mean())
    assert across_contrast < 0.5 * across_shift, (across_contrast, across_shift)


def test_normalised_gradients_agree_across_contrasts_and_not_across_a_shift():
    labels = phantom_labels(SHAPE)
    t1 = torch.from_numpy(_contrast(labels, T1_LIKE, 0))[None, None]
    t2 = torch.from_numpy(_contrast(labels, T2_LIKE, 1))[None, None]
    shifted = torch.roll(t1, shifts=2, dims=4)
    gradient = torch.stack(torch.gradient(t1[:, 0], dim=(1, 2, 3)), dim=1).norm(dim=1, keepdim=True)
    edges = (gradient > 0.05).float()  # where it is measured: flat tissue has no direction (distance 1 there)
    across_contrast = float(modality.ngf_distance(t2, t1, edges))
    across_shift = float(modality.ngf_distance(shifted, t1, edges))
    assert across_contrast < 0.1 < 0.5 < across_shift, (across_contrast, across_shift)


@pytest.mark.parametrize("name, channels", [("ngf", 3), ("mind", modality.MIND_CHANNELS)])
def test_what_is_computed_once_per_level_scores_as_the_images_themselves(name, channels):
    """The refinement's shortcut (the fixed field or both descriptor stacks computed once) gives the similarity
    computed from the images, at the identity."""
    labels = phantom_labels(SHAPE)
    moving = torch.from_numpy(_contrast(labels, T2_LIKE, 1))[None, None]
    fixed = torch.from_numpy(_contrast(labels, T1_LIKE, 0))[None, None]
    prepared_moving, prepared_fixed, stats = losses.prepare_similarity(name, moving, fixed)
    assert stats is None and prepared_fixed.shape[1] == channels
    zero = torch.zeros(1, 3, *(n // 2 for n in SHAPE))
    shortcut = losses.registration_objective(zero, prepared_moving, prepared_fixed, alpha=0.1, similarity=name)
    direct = losses.registration_objective(zero, moving, fixed, alpha=0.1, similarity=name)
    torch.testing.assert_close(shortcut, direct)


def test_a_cross_contrast_known_deformation_is_recovered(cross_pair, tiny_model, monkeypatch):
    """T2-like onto T1-like under a known deformation: auto picks NGF and recovers it, as does MIND, better than
    local NCC (the similarity used for every pair before) does with its preset's smoothness; and clearly better
    than NCC at their own smoothness weight, so that only the similarity differs."""
    before = metrics.mean_dice(cross_pair["moving_labels_array"], cross_pair["fixed_labels_array"])
    auto = register_pair(cross_pair, tiny_model)
    ncc = register_pair(cross_pair, tiny_model, refine_similarity="ncc")
    monkeypatch.setitem(refinement.PRESETS, "fast", dataclasses.replace(refinement.PRESETS["fast"], smoothness=1.0))
    mind = register_pair(cross_pair, tiny_model, refine_similarity="mind")
    ncc_same_weight = register_pair(cross_pair, tiny_model, refine_similarity="ncc")
    assert auto.metrics["refine_similarity"].startswith("ngf (auto: increasing share")
    assert ncc.metrics["refine_alpha"] > ncc_same_weight.metrics["refine_alpha"] == auto.metrics["refine_alpha"]
    runs = (("auto", auto), ("mind", mind), ("ncc", ncc), ("ncc, same weight", ncc_same_weight))
    dice = {name: r.metrics["dice_mean"] for name, r in runs}
    assert dice["auto"] > before + 0.08 and dice["mind"] > before + 0.08, (before, dice)
    assert dice["auto"] > dice["ncc"], dice
    assert min(dice["auto"], dice["mind"]) > dice["ncc, same weight"] + 0.03, dice
    assert auto.metrics["folding_percent"] <= 0.01 and mind.metrics["folding_percent"] <= 0.01


@pytest.mark.parametrize(
    "table, expected",
    [
        (T2_LIKE, "ngf (auto: increasing share"),
        (T1_LIKE**1.5 * 3.0 + 0.1, "ncc (auto: increasing share"),  # same contrast, other scanner scale
    ],
)
def test_auto_decides_from_the_pair_both_ways(tiny_model, table, expected):
    labels = phantom_labels(SHAPE)
    fixed = _image(_contrast(labels, T1_LIKE, 0))
    moving = _image(_contrast(labels, table, 1))
    result = registration.register(moving, fixed, model=tiny_model, refine=0, device="cpu", inverse=False)
    assert result.metrics["refine_similarity"].startswith(expected), result.metrics["refine_similarity"]


def test_the_contrast_test_on_arrays():
    """A monotone increasing relation (any scale, with noise) is one contrast; a decreasing or a non-monotone one
    (CSF dark in both, grey and white matter swapped: FLAIR against T1, rank correlation near 0) is another.
    Tissue shares as in a brain: CSF 15 %, grey matter 45 %, white matter 40 %."""
    rng = np.random.default_rng(0)
    tissue = rng.choice([1, 2, 3], size=(30, 30, 30), p=[0.15, 0.45, 0.4])
    t1 = np.array([0.0, 0.2, 0.5, 0.8])[tissue] + rng.normal(0, 0.02, tissue.shape)
    region = np.ones(tissue.shape, bool)
    for table, expected in (
        ([0.0, 0.1, 0.6, 0.9], "ncc"),  # same order
        ([0.0, 0.9, 0.5, 0.2], "ngf"),  # T2-like: reversed
        ([0.0, 0.1, 0.8, 0.5], "ngf"),  # FLAIR-like: CSF dark, grey brighter than white
    ):
        other = np.array(table)[tissue] + rng.normal(0, 0.02, tissue.shape)
        assert modality.choose_similarity(other, t1, region, "ncc")[0] == expected, table
    rho, eta = modality.intensity_dependence(t1**3, t1, region)
    assert rho == pytest.approx(1.0) and eta == pytest.approx(1.0, abs=0.01)
    name, why = modality.choose_similarity(t1, t1, np.zeros(t1.shape, bool), "ncc")
    assert name == "ncc" and "too little intensity dependence" in why
    unrelated = rng.uniform(size=t1.shape)
    assert "too little" in modality.choose_similarity(unrelated, t1, region, "ncc")[1]


def test_an_explicit_similarity_is_reported_as_asked_and_unknown_ones_are_refused(cross_pair, tiny_model):
    result = registration.register(
        cross_pair["moving"], cross_pair["fixed"], model=tiny_model, refine=0, refine_similarity="mind", device="cpu"
    )
    assert result.metrics["refine_similarity"] == "mind"
    with pytest.raises(registration.InputError, match="unknown refinement similarity 'nmi'.*'auto'"):
        registration.register(cross_pair["moving"], cross_pair["fixed"], model=tiny_model, refine_similarity="nmi")
