"""Truncated and corrupt image files are refused with the file's name and the reason, in every format written here.

Each file is written by SimpleITK, then cut short. Without the check, SimpleITK reads a truncated NIfTI file
as if nothing were wrong (the missing voxels become zeros).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DTNRegistrationLib.core.file_checks import data_problem
from DTNRegistrationLib.core.imaging import read_image, read_labels
from DTNRegistrationLib.errors import InputError

SHAPE = (12, 14, 16)  # z, y, x
NBYTES = int(np.prod(SHAPE)) * 2  # int16
# (file name, compressed, name of the file holding the voxel data)
FORMATS = {
    "nii": ("image.nii", False, "image.nii"),
    "nii.gz": ("image.nii.gz", True, "image.nii.gz"),
    "nrrd raw": ("image.nrrd", False, "image.nrrd"),
    "nrrd gzip": ("image.nrrd", True, "image.nrrd"),
    "nhdr raw": ("image.nhdr", False, "image.raw"),
    "nhdr gzip": ("image.nhdr", True, "image.raw.gz"),
    "mha raw": ("image.mha", False, "image.mha"),
    "mha zlib": ("image.mha", True, "image.mha"),
    "mhd raw": ("image.mhd", False, "image.raw"),
    "mhd zlib": ("image.mhd", True, "image.zraw"),
}


def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(1, 3000, SHAPE).astype(np.int16)


def write(folder: Path, fmt: str, array: np.ndarray | None = None) -> tuple[Path, Path]:
    """The image written by SimpleITK in ``fmt``: (the path to read, the file holding its voxel data)."""
    name, compressed, data_name = FORMATS[fmt]
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(volume() if array is None else array)
    image.SetSpacing((1.5, 1.5, 2.0))
    sitk.WriteImage(image, str(folder / name), compressed)
    return folder / name, folder / data_name


def data_start(data_file: Path, fmt: str) -> int:
    """Where the voxel data (or its compressed stream) begins in the data file."""
    content = data_file.read_bytes()
    if fmt == "nii":
        return int(struct.unpack("<f", content[108:112])[0])
    if fmt in ("nii.gz", "nhdr gzip"):
        return 10  # the fixed part of the gzip header; SimpleITK stores no file name
    if fmt.startswith(("nhdr", "mhd")):
        return 0
    if fmt.startswith("nrrd"):
        return content.index(b"\n\n") + 2
    return content.index(b"ElementDataFile = LOCAL\n") + len("ElementDataFile = LOCAL\n")


def cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_intact_files_read(tmp_path, fmt):
    path, _ = write(tmp_path, fmt)
    assert data_problem(path) is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), volume().astype(np.float32))


@pytest.mark.parametrize("point", ["half", "data start + 1 byte", "last byte missing"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_truncated_files_are_refused_with_name_and_reason(tmp_path, fmt, point):
    path, data_file = write(tmp_path, fmt)
    size = data_file.stat().st_size
    points = {"half": size // 2, "data start + 1 byte": data_start(data_file, fmt) + 1, "last byte missing": size - 1}
    cut(data_file, points[point])
    with pytest.raises(InputError) as caught:
        read_image(path, "moving image")
    prefix = f"moving image {path}: "
    message = str(caught.value)
    assert message.startswith(prefix) and "\n" not in message
    detached = f"data file {data_file.name}: " if data_file != path else ""  # a detached data file is named too
    assert message[len(prefix) :].startswith(detached + "truncated: ")


def test_truncated_label_map_is_refused(tmp_path):
    path, _ = write(tmp_path, "nii.gz", (volume() % 4).astype(np.int16))
    reference = read_image(path)
    cut(path, path.stat().st_size // 3)
    with pytest.raises(InputError, match=r"fixed labels .*image\.nii\.gz: truncated"):
        read_labels(path, reference, "fixed labels")


def test_raw_byte_counts_are_stated(tmp_path):
    path, _ = write(tmp_path, "mha raw")
    start = data_start(path, "mha raw")
    cut(path, start + 100)
    assert data_problem(path) == f"truncated: the header promises {NBYTES:,} bytes of voxel data, the file has 100"


def test_corrupt_compressed_data_is_refused(tmp_path):
    path, _ = write(tmp_path, "nii.gz")
    content = bytearray(path.read_bytes())
    content[-8] ^= 0xFF  # the CRC-32 of the gzip trailer: the data no longer matches it
    path.write_bytes(bytes(content))
    problem = data_problem(path)
    assert problem.startswith("corrupt: the compressed data fails its integrity check")
    content[-8] ^= 0xFF
    content[len(content) // 2 : len(content) // 2 + 64] = bytes(64)  # a damaged block in the middle
    path.write_bytes(bytes(content))
    assert data_problem(path).startswith("corrupt: the compressed data")
    with pytest.raises(InputError, match="corrupt"):
        read_image(path)


def test_complete_gzip_stream_with_too_little_data_is_refused(tmp_path):
    """A valid gzip file of a truncated NIfTI file: the stream is intact, the decompressed length is short."""
    plain, _ = write(tmp_path, "nii")
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(plain.read_bytes()[:-500]))
    expected = plain.stat().st_size
    assert data_problem(short) == (
        f"incomplete: the data decompresses to {expected - 500:,} bytes but the header promises {expected:,}"
    )


def test_uncompressed_file_named_nii_gz_is_checked_as_nii(tmp_path):
    plain, _ = write(tmp_path, "nii")
    renamed = tmp_path / "plain.nii.gz"
    renamed.write_bytes(plain.read_bytes())
    assert data_problem(renamed) is None and read_image(renamed).GetSize() == SHAPE[::-1]
    cut(renamed, 400)
    assert data_problem(renamed).startswith("truncated: the header promises")


def test_concatenated_gzip_members_are_followed(tmp_path):
    plain, _ = write(tmp_path, "nii")
    content = plain.read_bytes()
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(content[:1000]) + gzip.compress(content[1000:]))
    assert data_problem(two) is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(two))), volume())


def nifti2(array: np.ndarray, spacing: float = 1.5) -> bytes:
    """A minimal NIfTI-2 file (int16, scanner-aligned), built by hand from nifti2.h's layout.

    SimpleITK 2.5 (ITK 5.4's nifti1_io) neither writes nor reads NIfTI-2; the check still covers it for readers
    that do (and for SimpleITK builds to come).
    """
    header = bytearray(540)
    struct.pack_into("<i8s", header, 0, 540, b"n+2\0\r\n\x1a\n")
    struct.pack_into("<hh", header, 12, 4, 16)
    struct.pack_into("<8q", header, 16, 3, *array.shape[::-1], 1, 1, 1, 1)
    struct.pack_into("<8d", header, 104, 1.0, spacing, spacing, spacing, 1, 1, 1, 1)
    struct.pack_into("<qd", header, 168, 544, 1.0)
    struct.pack_into("<ii", header, 344, 0, 1)  # qform 0, sform 1
    for row in range(3):
        srow = [0.0] * 4
        srow[row] = spacing
        struct.pack_into("<4d", header, 400 + 32 * row, *srow)
    struct.pack_into("<i", header, 500, 2)  # millimetres
    return bytes(header) + bytes(4) + array.astype("<i2").tobytes()


def test_nifti2_truncation_is_detected(tmp_path):
    path = tmp_path / "two.nii"
    path.write_bytes(nifti2(volume()))
    assert data_problem(path) is None
    cut(path, 544 + NBYTES // 2)
    assert data_problem(path) == f"truncated: the header promises {544 + NBYTES:,} bytes (header and voxel data), " + (
        f"the file has {544 + NBYTES // 2:,}"
    )
    gz = tmp_path / "two.nii.gz"
    gz.write_bytes(gzip.compress(nifti2(volume()))[:-1])
    assert data_problem(gz).startswith("truncated: the compressed data ends before its end-of-stream marker")


def test_vector_metaimage_counts_its_channels(tmp_path):
    vector = sitk.Compose([sitk.GetImageFromArray(volume())] * 3)
    path = tmp_path / "field.mha"
    sitk.WriteImage(vector, str(path))
    assert data_problem(path) is None
    cut(path, path.stat().st_size - NBYTES)  # two of the three channels' bytes remain
    assert f"promises {3 * NBYTES:,} bytes of voxel data, the file has {2 * NBYTES:,}" in data_problem(path)


def test_missing_detached_data_file_is_named(tmp_path):
    path, data_file = write(tmp_path, "mhd raw")
    data_file.unlink()
    with pytest.raises(InputError) as caught:
        read_image(path, "fixed image")
    assert str(caught.value) == f"fixed image {path}: the data file {data_file} named in its header is missing"


def test_formats_not_checked_read_as_before(tmp_path):
    path = tmp_path / "image.vtk"
    sitk.WriteImage(sitk.GetImageFromArray(volume()), str(path))
    assert data_problem(path) is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), volume().astype(np.float32))
