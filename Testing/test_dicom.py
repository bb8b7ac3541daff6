"""DICOM series as inputs: a folder (or FOLDER/<series UID>) reads as the volume it holds, with its geometry, and
a series with a lost slice or an unreadable file is refused instead of becoming a volume of the wrong shape."""

from __future__ import annotations

import json
import locale
import os

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_phantom_pair

from DTNRegistrationLib.cli import commands as cli
from DTNRegistrationLib.core import imaging
from DTNRegistrationLib.errors import InputError

T1_UID = "1.2.826.0.1.3680043.2.1125.7.1"
T2_UID = "1.2.826.0.1.3680043.2.1125.7.2"


def write_series(image: sitk.Image, folder, uid: str, description: str) -> list:
    """``image`` as one int16 DICOM file per slice, with the tags a scanner writes for the geometry. The file
    names run against the slice order, so a reader that sorted by name would stack the volume upside down."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    row_and_column = (d[0], d[3], d[6], d[1], d[4], d[7])
    tags = {
        "0008|0060": "MR",
        "0008|103e": description,
        "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
        "0020|000e": uid,
        "0020|0037": "\\".join(f"{v:.6f}" for v in row_and_column),
        "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",
        "0018|0050": str(image.GetSpacing()[2]),
    }
    volume = sitk.Cast(image, sitk.sitkInt16)
    depth = image.GetDepth()
    paths = []
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer leaves LC_CTYPE at "C" (ASCII) behind it
    for k in range(depth):
        slice_ = volume[:, :, k]
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0008|0018", f"{uid}.{k + 1}")
        path = folder / f"{description[:2]}{depth - k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slice_)
        paths.append(path)
    locale.setlocale(locale.LC_ALL, saved_locale)
    return paths


def oblique_volume(seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random((9, 14, 12)) * 1000).astype(np.int16))
    image.SetSpacing((0.9, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    rotation = sitk.VersorTransform((0.3, 0.2, 1.0), 0.4)  # an oblique acquisition
    image.SetDirection(rotation.GetMatrix())
    return image


def test_a_dicom_folder_reads_as_its_volume_with_its_geometry(tmp_path):
    volume = oblique_volume()
    write_series(volume, tmp_path / "t1", T1_UID, "T1 MPRAGE")
    read = imaging.read_image(tmp_path / "t1", "moving image")
    assert read.GetSize() == volume.GetSize()
    np.testing.assert_allclose(read.GetSpacing(), volume.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(read.GetOrigin(), volume.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(read.GetDirection(), volume.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(volume).astype(np.float32))


def test_a_folder_with_several_series_names_them_and_reads_the_one_asked_for(tmp_path):
    t1, t2 = oblique_volume(0), oblique_volume(1)
    write_series(t1, tmp_path / "exam", T1_UID, "T1 MPRAGE")
    write_series(t2, tmp_path / "exam", T2_UID, "T2 TSE")
    with pytest.raises(InputError) as error:
        imaging.read_image(tmp_path / "exam", "fixed image")
    message = str(error.value)
    assert "holds 2 DICOM series" in message and "T1 MPRAGE, 9 files" in message and "T2 TSE, 9 files" in message
    read = imaging.read_image(tmp_path / "exam" / T2_UID)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(t2))
    with pytest.raises(InputError, match=f"no DICOM series 1.2.3 there .*{T1_UID}"):
        imaging.read_image(tmp_path / "exam" / "1.2.3")


@pytest.mark.parametrize("lost", [1, 4, 7])
def test_a_series_with_a_lost_slice_is_refused_not_stretched(tmp_path, lost):
    paths = write_series(oblique_volume(), tmp_path / "t1", T1_UID, "T1 MPRAGE")
    paths[lost].unlink()  # ITK would read 8 slices 2.8 mm apart, with a warning on stderr
    with pytest.raises(InputError, match=rf"slices missing .*5 mm between slices {lost} and {lost + 1} of 8"):
        imaging.read_image(tmp_path / "t1")


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_a_truncated_slice_file_is_refused_by_name(tmp_path, cut):
    paths = write_series(oblique_volume(), tmp_path / "t1", T1_UID, "T1 MPRAGE")
    os.truncate(paths[3], int(paths[3].stat().st_size * cut))  # GDCM would leave it out of the series
    with pytest.raises(InputError, match=f"DICOM file {paths[3].name} cannot be read"):
        imaging.read_image(tmp_path / "t1")


def test_one_slice_or_an_empty_folder_says_what_to_give_instead(tmp_path):
    paths = write_series(oblique_volume(), tmp_path / "t1", T1_UID, "T1 MPRAGE")
    with pytest.raises(InputError, match="one DICOM slice; give the folder that holds its series"):
        imaging.read_image(paths[0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="a folder without a DICOM series"):
        imaging.read_image(tmp_path / "empty")


def test_register_from_dicom_folders_matches_the_same_volumes_from_nifti(tmp_path):
    files = write_phantom_pair(tmp_path, (32, 40, 36))
    as_nifti = {}
    for role, uid in (("moving", T1_UID), ("fixed", T2_UID)):
        volume = sitk.Cast(sitk.ReadImage(str(files / f"{role}.nii.gz")) * 1000, sitk.sitkInt16)  # DICOM is integer
        as_nifti[role] = files / f"{role}_int16.nii.gz"
        sitk.WriteImage(volume, str(as_nifti[role]))
        write_series(volume, files / "exam", uid, role)
    as_dicom = {"moving": files / "exam" / T1_UID, "fixed": files / "exam" / T2_UID}

    def register(inputs, out):
        argv = ["register", "--moving", str(inputs["moving"]), "--fixed", str(inputs["fixed"])]
        argv += ["--output-dir", str(out), "--model", str(files / "tiny.safetensors"), "--quiet", "--refine", "2"]
        return cli.main(argv + ["--moving-labels", str(files / "moving_labels.nii.gz")])

    assert register(as_nifti, tmp_path / "nifti") == 0
    assert register(as_dicom, tmp_path / "dicom") == 0
    for name in ("warped", "jacobian", "warped_labels"):
        a, b = (sitk.ReadImage(str(tmp_path / run / f"{name}.nii.gz")) for run in ("nifti", "dicom"))
        np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a), rtol=1e-4, atol=1e-3)
    report = json.loads((tmp_path / "dicom" / "report.json").read_text())
    fixed = report["input_files"]["fixed"]
    exam_files = list((files / "exam").iterdir())
    assert fixed["path"] == str(as_dicom["fixed"].resolve())
    assert fixed["bytes"] == sum(p.stat().st_size for p in exam_files)
    # a lost slice is a clear exit-2 error, and nothing is written
    (files / "exam" / "fi0010.dcm").unlink()  # a slice in the middle of the fixed series
    assert register(as_dicom, tmp_path / "lost") == 2
    assert not (tmp_path / "lost").exists() or not any((tmp_path / "lost").iterdir())


def test_batch_names_a_dicom_series_by_its_folder_and_uid():
    import argparse

    from DTNRegistrationLib.cli.batch import batch_rows

    moving = ["scans/sub-01_T1w.nii.gz", f"exam/{T1_UID}", "dicom/sub-02"]
    rows = batch_rows(argparse.Namespace(pairs=None, fixed="atlas.nii.gz", moving=moving))
    assert [row["name"] for row in rows] == ["000_sub-01_T1w", "001_exam_1", "002_sub-02"]
