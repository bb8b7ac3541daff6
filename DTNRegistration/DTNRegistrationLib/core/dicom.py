"""Reading a DICOM series from a folder, refusing what would silently give a wrong volume.

ITK's series reader (through GDCM) skips a file it cannot parse and, when slices are missing, stretches the slice
spacing to cover the gap with only a warning on stderr: a truncated export or a lost slice becomes a volume of the
wrong geometry. Here both are errors that name the file or the gap.

A folder holding one series is read as it is; one with several is named as ``FOLDER/<SeriesInstanceUID>``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

# Slice positions may differ from a uniform spacing by this share of it (scanners round positions to ~0.01 mm).
SPACING_TOLERANCE = 0.05
_DESCRIPTION_TAG = "0008|103e"
_POSITION_TAG = "0020|0032"


def series_location(path: Path) -> tuple[Path, str | None] | None:
    """``(folder, series UID or None)`` when ``path`` names a folder or ``FOLDER/<SeriesInstanceUID>``; else None."""
    if path.is_dir():
        return path, None
    if not path.exists() and path.parent.is_dir() and looks_like_uid(path.name):
        return path.parent, path.name
    return None


def read_series(folder: Path, series_uid: str | None, what: str) -> sitk.Image:
    """The series' volume; ``InputError`` when the folder has none, several (and none was named), unreadable DICOM
    files, or slices missing."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's warnings on stderr: the checks here say it better
    try:
        return _read_series(folder, series_uid, what)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _read_series(folder: Path, series_uid: str | None, what: str) -> sitk.Image:
    label = f"{what} {folder}"
    try:
        uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as err:
        raise InputError(f"{label}: the folder cannot be scanned for DICOM files ({_last_line(err)})") from None
    series = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}  # sorted by GDCM
    _refuse_unreadable(folder, series, label)
    if not uids:
        raise InputError(f"{label}: a folder without a DICOM series (give an image file or a DICOM folder)")
    if series_uid is None:
        if len(uids) > 1:
            listing = "; ".join(_describe(uid, files) for uid, files in series.items())
            raise InputError(f"{label}: holds {len(uids)} DICOM series, name one as {folder}/<series UID>: {listing}")
        series_uid = uids[0]
    elif series_uid not in series:
        raise InputError(f"{label}: no DICOM series {series_uid} there (it has {', '.join(uids)})")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series[series_uid])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{label}: DICOM series {series_uid} cannot be read ({_last_line(err)})") from None
    _refuse_gaps(reader, image, f"{label}: DICOM series {series_uid}")
    return image


def looks_like_uid(name: str) -> bool:
    """Whether ``name`` has a DICOM UID's form: numbers joined by dots."""
    parts = name.split(".")
    return len(parts) > 1 and all(part.isdigit() for part in parts)


def _refuse_unreadable(folder: Path, series: dict[str, tuple], label: str) -> None:
    """A file with the DICOM signature that belongs to no series is one GDCM could not parse: truncated or corrupt."""
    grouped = {os.path.normpath(f) for files in series.values() for f in files}
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.name.upper() != "DICOMDIR" and os.path.normpath(entry) not in grouped:
            if is_dicom_file(entry):
                raise InputError(f"{label}: DICOM file {entry.name} cannot be read (truncated or corrupt)")


def is_dicom_file(path: Path) -> bool:
    """Whether the file carries DICOM's "DICM" signature after its 128-byte preamble."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _refuse_gaps(reader: sitk.ImageSeriesReader, image: sitk.Image, label: str) -> None:
    """Slice positions along the slice normal must step by one spacing: a gap means slices are missing."""
    count = image.GetSize()[2]
    if count < 2 or not reader.HasMetaDataKey(0, _POSITION_TAG):
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    try:
        positions = [float(np.dot(_floats(reader.GetMetaData(i, _POSITION_TAG)), normal)) for i in range(count)]
    except (RuntimeError, ValueError):
        return  # positions missing or unreadable: nothing to check against
    steps = np.abs(np.diff(positions))
    expected = float(np.median(steps))
    worst = int(np.argmax(np.abs(steps - expected)))
    if expected <= 0 or abs(steps[worst] - expected) > SPACING_TOLERANCE * expected:
        raise InputError(
            f"{label}: slices missing or unevenly spaced: {steps[worst]:.3g} mm between slices {worst + 1} and "
            f"{worst + 2} of {count}, against {expected:.3g} mm elsewhere"
        )


def _floats(text: str) -> np.ndarray:
    return np.array([float(part) for part in text.strip().split("\\")], dtype=float)


def _describe(uid: str, files: tuple) -> str:
    description = ""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(files[0])
        reader.ReadImageInformation()
        if reader.HasMetaDataKey(_DESCRIPTION_TAG):
            description = reader.GetMetaData(_DESCRIPTION_TAG).strip()
    except RuntimeError:
        pass
    return f"{uid} ({description + ', ' if description else ''}{len(files)} files)"


def _last_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else "unknown error"
