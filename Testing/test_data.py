"""Training data: discovery, the dataset JSON, preparation cache, pair sampling, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch

from DTNRegistrationLib import datasets
from DTNRegistrationLib.errors import DataError
from DTNRegistrationLib.train import pairs as pair_sources
from DTNRegistrationLib.train import synth
from DTNRegistrationLib.train import volumes as data
from DTNRegistrationLib.train.config import DatasetSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SHAPE = (32, 32, 32)


def write_head(path: Path, seed: int, labels_path: Path | None = None, size=(24, 26, 22), spacing=2.5) -> Path:
    """A tiny synthetic 'head': an ellipsoid with an inner structure, and optionally its label map."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in reversed(size)], indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2
    inner = (x / 0.35) ** 2 + ((y - 0.1 * seed % 0.3) / 0.4) ** 2 + (z / 0.3) ** 2
    labels = (r < 1).astype(np.int16) + (inner < 1).astype(np.int16)
    image = 100.0 * (labels == 1) + 180.0 * (labels == 2) + rng.normal(0, 3, labels.shape)
    img = sitk.GetImageFromArray(image.astype(np.float32))
    img.SetSpacing([spacing] * 3)
    img.SetOrigin([float(seed), -3.0, 2.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    if labels_path is not None:
        lab = sitk.GetImageFromArray(labels)
        lab.CopyInformation(img)
        labels_path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(lab, str(labels_path))
    return path


def spec(**kw) -> DatasetSpec:
    kw.setdefault("shape", SHAPE)
    kw.setdefault("align", "none")
    kw.setdefault("workers", 1)
    return DatasetSpec(**kw)


def make_json(tmp_path: Path, n_train: int = 3, n_val: int = 2, pairs: bool = True) -> Path:
    root = tmp_path / "ds"
    training, validation = [], []
    for i in range(n_train + n_val):
        write_head(root / "imagesTr" / f"S{i}.nii.gz", i, root / "labelsTr" / f"S{i}.nii.gz")
        entry = {"image": f"./imagesTr/S{i}.nii.gz", "label": f"./labelsTr/S{i}.nii.gz"}
        (training if i < n_train else validation).append(entry)
    doc = {"name": "tiny", "training": training + validation}
    if pairs:
        doc["registration_val"] = [
            {"moving": validation[i]["image"], "fixed": validation[i - 1]["image"]} for i in range(len(validation))
        ]
    else:
        doc["training"] = training
        doc["validation"] = validation
    path = root / "dataset.json"
    path.write_text(json.dumps(doc))
    return path


# ---------------------------------------------------------------------------------------------- errors


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        data.load_real_data(spec(images_dir=str(tmp_path / "empty")))


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        datasets.subjects_from_folder(tmp_path / "nope")


def test_unreadable_image_is_refused(tmp_path):
    folder = tmp_path / "imgs"
    write_head(folder / "good.nii.gz", 0)
    (folder / "broken.nii.gz").write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"broken\.nii\.gz"):
        data.load_real_data(spec(images_dir=str(folder), cache_dir=str(tmp_path / "cache")))


def test_label_geometry_mismatch_is_refused(tmp_path):
    folder, labels = tmp_path / "imgs", tmp_path / "labels"
    write_head(folder / "a.nii.gz", 0)
    write_head(tmp_path / "other.nii.gz", 0, labels / "a.nii.gz", size=(20, 20, 20))
    with pytest.raises(DataError, match=r"a\.nii\.gz"):
        data.load_real_data(spec(images_dir=str(folder), labels_dir=str(labels)))


def test_json_missing_files_are_listed(tmp_path):
    path = make_json(tmp_path)
    doc = json.loads(path.read_text())
    doc["training"].append({"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/ghost.nii.gz"})
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"2 listed file\(s\) not found(.|\n)*ghost\.nii\.gz"):
        datasets.read_dataset_json(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not valid JSON"), ('{"training": []}', "no 'training'"), ('{"training": [{"x": 1}]}', "'image'")],
)
def test_bad_json_is_refused(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        datasets.read_dataset_json(path)


def test_no_data_at_all_is_refused():
    with pytest.raises(ValueError, match="no training data"):
        pair_sources.MixedSource(None, None, 0.5)


def test_atlas_without_images_is_refused(tmp_path):
    with pytest.raises(DataError, match="atlas needs"):
        data.load_real_data(spec(atlas=str(write_head(tmp_path / "atlas.nii.gz", 0))))


# ---------------------------------------------------------------------------------------------- loading


def test_folder_skips_label_like_names_and_prepares_onto_the_grid(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(2):
        write_head(folder / f"sub{i}_t1.nii.gz", i)
    write_head(folder / "sub0_brainmask.nii.gz", 0)
    real = data.load_real_data(spec(images_dir=str(folder), cache_dir=str(tmp_path / "cache")))
    assert [v.name for v in real.train] == ["sub0_t1", "sub1_t1"]
    for vol in real.train:
        assert vol.image.shape == SHAPE and vol.image.dtype == np.float32
        assert 0.0 <= float(vol.image.min()) and float(vol.image.max()) <= 1.0
        assert float(vol.image.max()) > 0.5  # the head is inside the grid


def test_cache_is_used_and_keyed_by_mtime(tmp_path, monkeypatch):
    folder, cache = tmp_path / "imgs", tmp_path / "cache"
    path = write_head(folder / "a.nii.gz", 0)
    write_head(folder / "b.nii.gz", 1)
    first = data.load_real_data(spec(images_dir=str(folder), cache_dir=str(cache)))
    assert len(list(cache.glob("*.image.npy"))) == 2

    def fail(self, subject):
        raise AssertionError("prepared again despite the cache")

    monkeypatch.setattr(data.Preparer, "prepare", fail)
    again = data.load_real_data(spec(images_dir=str(folder), cache_dir=str(cache)))
    assert np.array_equal(first.train[0].image, again.train[0].image)
    monkeypatch.undo()
    write_head(path, 5)  # a new file: new mtime, new key; it is the template too, so b's key changes as well
    data.load_real_data(spec(images_dir=str(folder), cache_dir=str(cache)))
    assert len(list(cache.glob("*.image.npy"))) == 4


def test_json_layout_pairs_labels_and_relative_paths(tmp_path):
    real = data.load_real_data(spec(dataset_json=str(make_json(tmp_path)), cache_dir=str(tmp_path / "c")))
    assert len(real.train) == 3  # the two validation images are set aside
    assert len(real.val_pairs) == 2
    for moving, fixed in real.val_pairs:
        assert moving.labels is not None and fixed.labels is not None
        assert set(np.unique(moving.labels)) <= {0, 1, 2}


def test_json_validation_list_without_pairs(tmp_path):
    real = data.load_real_data(spec(dataset_json=str(make_json(tmp_path, pairs=False))))
    assert len(real.train) == 3 and len(real.val_pairs) == 1


def test_labels_are_remapped_to_contiguous_ids():
    vols = [
        pair_sources.Volume("a", np.zeros(2), np.array([0, 4, 1000])),
        pair_sources.Volume("b", np.zeros(2), np.array([4, 4])),
    ]
    assert data.remap_labels(vols) == [0, 4, 1000]
    assert vols[0].labels.tolist() == [0, 1, 2] and vols[1].labels.tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------- sampling


def test_real_pairs_are_deterministic_and_augmented(tmp_path):
    real = data.load_real_data(spec(dataset_json=str(make_json(tmp_path))))
    source = pair_sources.RealPairSource(real)
    a = source.sample(synth.make_generator(0), batch=2)
    b = source.sample(synth.make_generator(0), batch=2)
    assert a.moving.shape == (2, 1, *SHAPE) and torch.equal(a.moving, b.moving)
    assert a.moving_labels is not None and a.moving_labels.dtype == torch.int64
    originals = [torch.from_numpy(np.asarray(v.image)) for v in real.train]
    assert not any(torch.equal(a.moving[0, 0], o) for o in originals)


def test_atlas_mode_keeps_the_atlas_in_place(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(2):
        write_head(folder / f"s{i}.nii.gz", i)
    atlas = write_head(tmp_path / "atlas.nii.gz", 3, tmp_path / "atlas_labels.nii.gz")
    real = data.load_real_data(
        spec(images_dir=str(folder), atlas=str(atlas), atlas_labels=str(tmp_path / "atlas_labels.nii.gz"))
    )
    source = pair_sources.RealPairSource(real, augment=False)
    pair = source.sample(synth.make_generator(0))
    assert torch.equal(pair.fixed[0, 0], torch.from_numpy(np.asarray(real.atlas.image)))


def test_mixed_source_draws_both_kinds(tmp_path):
    assert data.load_real_data(spec()) is None
    folder = tmp_path / "imgs"
    write_head(folder / "a.nii.gz", 0)
    real = data.load_real_data(spec(images_dir=str(folder)))
    mixed = pair_sources.MixedSource(
        pair_sources.RealPairSource(real, augment=False), pair_sources.SynthPairSource(SHAPE), 0.5
    )
    gen = synth.make_generator(0)
    kinds = set()
    for _ in range(8):
        mixed.sample(gen)
        kinds.add(mixed.last)
    assert kinds == {"real", "synthetic"}


def test_validation_pairs_include_synthetic_ones():
    pairs = pair_sources.validation_pairs(None, SHAPE, 2, seed=1)
    assert [name for name, _ in pairs] == ["synthetic-0", "synthetic-1"]
    assert pairs[0][1].fixed_labels is not None
