"""Is all the voxel data an image header promises really there?

SimpleITK reads a truncated NIfTI file without an error and fills the missing voxels with zeros, and reports a
cut-short MetaImage as "No such file or directory". These checks compare the byte count the header promises with
what the file holds, using only the standard library: a size comparison for raw data, one streaming decompression
for gzip/zlib data (which also verifies the stream's checksum). Formats and header variants not handled here
give ``None``, and the file is left to SimpleITK as before.

Handled: ``.nii`` and ``.nii.gz`` (NIfTI-1 and NIfTI-2, single file), ``.nrrd`` and ``.nhdr`` (raw or gzip data,
attached or in one detached file), ``.mha`` and ``.mhd`` (raw or zlib-compressed data, inline or in one detached file).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

READ_CHUNK = 1 << 20
# cap on the decompressed bytes per step: a zero-filled volume compresses ~1000:1
MAX_INFLATE_STEP = 1 << 24
MAX_TEXT_HEADER = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
GZIP_WBITS = 16 + zlib.MAX_WBITS
ZLIB_OR_GZIP_WBITS = 32 + zlib.MAX_WBITS  # MetaIO inflates with automatic header detection

# NIfTI datatype code -> bytes per voxel (nifti1.h); 1-bit DT_BINARY is left to SimpleITK
NIFTI_BYTES = {
    2: 1,
    4: 2,
    8: 4,
    16: 4,
    32: 8,
    64: 8,
    128: 3,
    256: 1,
    512: 2,
    768: 4,
    1024: 8,
    1280: 8,
    1536: 16,
    1792: 16,
    2048: 32,
    2304: 4,
}
NRRD_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), 2),
    **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int"), 8),
    **dict.fromkeys(("int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int"), 8),
    **dict.fromkeys(("uint64", "uint64_t", "double"), 8),
    "float": 4,
}
# MetaIO's MET_ValueTypeSize: MET_LONG is 4 bytes there
META_BYTES = {
    **dict.fromkeys(("MET_ASCII_CHAR", "MET_CHAR", "MET_UCHAR"), 1),
    **dict.fromkeys(("MET_SHORT", "MET_USHORT"), 2),
    **dict.fromkeys(("MET_INT", "MET_UINT", "MET_LONG", "MET_ULONG", "MET_FLOAT"), 4),
    **dict.fromkeys(("MET_LONG_LONG", "MET_ULONG_LONG", "MET_DOUBLE"), 8),
}


def data_problem(path: str | os.PathLike) -> str | None:
    """Why the file's voxel data is incomplete or corrupt, as a short phrase; ``None`` if complete or not checked.

    Raises ``OSError`` when the file (or a data file its header names) cannot be opened.
    """
    path = Path(path)
    name = path.name.lower()
    for suffix, check in CHECKS:
        if name.endswith(suffix):
            return check(path)
    return None


# --- NIfTI ---------------------------------------------------------------------------------------------------


def nifti_extent(header: bytes) -> int | None:
    """vox_offset + voxel bytes of a single-file NIfTI-1 or NIfTI-2 header (either byte order), else None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            if header[344:348] != b"n+1\0":  # "ni1": the data is in a separate .img file
                return None
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            offset = struct.unpack(endian + "f", header[108:112])[0]
            return _nifti_bytes(dims, datatype, offset)
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            if header[4:8] != b"n+2\0":
                return None
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            return _nifti_bytes(dims, datatype, offset)
    return None


def _nifti_bytes(dims: tuple[int, ...], datatype: int, offset: float) -> int | None:
    rank = dims[0]
    if not 1 <= rank <= 7 or datatype not in NIFTI_BYTES or not math.isfinite(offset) or offset < 0:
        return None
    sizes = dims[1 : rank + 1]
    if min(sizes) < 1:
        return None
    return int(offset) + math.prod(sizes) * NIFTI_BYTES[datatype]


def _check_nii(path: Path) -> str | None:
    with open(path, "rb") as handle:
        extent = nifti_extent(handle.read(540))
    return None if extent is None else _short_file(path.stat().st_size, extent, whole_file=True)


def _check_nii_gz(path: Path) -> str | None:
    with open(path, "rb") as handle:
        if handle.read(2) != GZIP_MAGIC:  # ITK also reads an uncompressed file named .nii.gz
            return _check_nii(path)
        handle.seek(0)
        inflated = inflate(handle, GZIP_WBITS, keep=540, members=True)
    extent = nifti_extent(inflated.head)
    return inflated.problem(extent)


# --- NRRD ----------------------------------------------------------------------------------------------------


def _check_nrrd(path: Path) -> str | None:
    with open(path, "rb") as handle:
        text, data_start = read_text_header(handle, _nrrd_header_end)
    fields = {}
    for line in text.splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and not value.startswith("=") and not line.startswith("#"):
            fields[key.strip().lower().replace(" ", "")] = value.strip()
    encoding = fields.get("encoding", "").lower()
    encoding = {"gz": "gzip"}.get(encoding, encoding)
    nbytes = _nrrd_bytes(fields)
    if nbytes is None or encoding not in ("raw", "gzip"):
        return None
    skip = _int(fields.get("byteskip", "0"))
    if skip is None or _int(fields.get("lineskip", "0")) != 0:
        return None
    data_file = fields.get("datafile")
    if data_file is None:
        if data_start is None:
            return f"truncated: the file ends in its header, before the {nbytes:,} bytes of voxel data it promises"
        return _data_problem(path, data_start, skip, nbytes, encoding == "gzip")
    if data_file.split()[0] == "LIST" or len(data_file.split()) > 1:  # lists and numbered series: not checked
        return None
    return _detached(path, data_file, lambda target: _data_problem(target, 0, skip, nbytes, encoding == "gzip"))


def _nrrd_header_end(buffer: bytes) -> int | None:
    end = buffer.find(b"\n\n")
    if end >= 0:
        return end + 2
    end = buffer.find(b"\r\n\r\n")
    return None if end < 0 else end + 4


def _nrrd_bytes(fields: dict[str, str]) -> int | None:
    element = NRRD_BYTES.get(fields.get("type", "").lower())
    sizes = [_int(s) for s in fields.get("sizes", "").split()]
    if element is None or not sizes or any(s is None or s < 1 for s in sizes):
        return None
    return math.prod(sizes) * element


def _data_problem(path: Path, start: int, skip: int, nbytes: int, compressed: bool) -> str | None:
    """NRRD data from ``start``: raw, with ``skip`` bytes first (-1: the data is the file's last bytes), or gzip."""
    if not compressed:
        return _short_file(path.stat().st_size - start - max(skip, 0), nbytes)
    if skip < 0:  # not valid with gzip; teem refuses it
        return None
    with open(path, "rb") as handle:
        handle.seek(start)
        return inflate(handle, GZIP_WBITS, members=True).problem(skip + nbytes)


# --- MetaImage -----------------------------------------------------------------------------------------------


def _check_meta(path: Path) -> str | None:
    with open(path, "rb") as handle:
        text, data_start = read_text_header(handle, _meta_header_end)
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    nbytes = _meta_bytes(fields)
    data_file = fields.get("elementdatafile")
    if nbytes is None or data_file is None or data_start is None:
        return None
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if data_file.upper() == "LOCAL":
        return _meta_data_problem(path, data_start, nbytes, compressed)
    if data_file.upper() == "LIST" or "%" in data_file:  # file lists and numbered slices: not checked
        return None
    skip = _int(fields.get("headersize", "0"))
    if skip is None or (skip < 0 and compressed):
        return None
    return _detached(path, data_file, lambda target: _meta_detached_problem(target, skip, nbytes, compressed))


def _meta_header_end(buffer: bytes) -> int | None:
    """ElementDataFile is the last header field; the data starts after its line."""
    at = buffer.find(b"ElementDataFile")
    end = -1 if at < 0 else buffer.find(b"\n", at)
    return None if end < 0 else end + 1


def _meta_bytes(fields: dict[str, str]) -> int | None:
    element = META_BYTES.get(fields.get("elementtype", "").upper())
    sizes = [_int(s) for s in fields.get("dimsize", "").split()]
    channels = _int(fields.get("elementnumberofchannels", "1"))
    if element is None or not sizes or any(s is None or s < 1 for s in sizes) or channels is None or channels < 1:
        return None
    return math.prod(sizes) * channels * element


def _meta_data_problem(path: Path, start: int, nbytes: int, compressed: bool) -> str | None:
    if not compressed:
        return _short_file(path.stat().st_size - start, nbytes)
    with open(path, "rb") as handle:
        handle.seek(start)
        return inflate(handle, ZLIB_OR_GZIP_WBITS).problem(nbytes)


def _meta_detached_problem(path: Path, skip: int, nbytes: int, compressed: bool) -> str | None:
    if skip < 0:  # HeaderSize = -1: the data is the file's last bytes
        return _short_file(path.stat().st_size, nbytes)
    return _meta_data_problem(path, skip, nbytes, compressed)


# --- shared --------------------------------------------------------------------------------------------------


class Inflated:
    """What a streaming decompression found: the bytes out, the first ``keep`` of them, and any stream error."""

    def __init__(self, total: int, head: bytes, error: str | None) -> None:
        self.total, self.head, self.error = total, head, error

    def problem(self, expected: int | None) -> str | None:
        """The stream's error (with how far it got), or too few bytes for ``expected``; None when complete."""
        counts = f"{self.total:,} bytes decompressed" + (
            "" if expected is None else f"; the header promises {expected:,}"
        )
        if self.error == "ends early":
            return f"truncated: the compressed data ends before its end-of-stream marker ({counts})"
        if self.error is not None:
            return f"corrupt: {self.error} ({counts})"
        if expected is not None and self.total < expected:
            return f"incomplete: the data decompresses to {self.total:,} bytes but the header promises {expected:,}"
        return None


def inflate(handle: BinaryIO, wbits: int, keep: int = 0, members: bool = False) -> Inflated:
    """Decompress from the handle's position to the end of the stream, counting bytes and discarding them.

    zlib verifies the gzip CRC-32 (or the zlib Adler-32) and length at the end of each stream. With ``members``,
    concatenated gzip members are followed as gzip readers do; other trailing bytes are ignored.
    """
    total, head = 0, b""
    inflater = zlib.decompressobj(wbits)
    data = handle.read(READ_CHUNK)
    while True:
        try:
            out = inflater.decompress(data, MAX_INFLATE_STEP)
        except zlib.error as err:
            return Inflated(total, head, _zlib_reason(err))
        total += len(out)
        if len(head) < keep:
            head += out[: keep - len(head)]
        if inflater.eof:
            rest = inflater.unused_data
            rest += handle.read(max(0, 2 - len(rest)))
            if not (members and rest[:2] == GZIP_MAGIC):
                return Inflated(total, head, None)
            inflater, data = zlib.decompressobj(wbits), rest
            continue
        data = inflater.unconsumed_tail or handle.read(READ_CHUNK)
        if not data and not out:  # the input is exhausted and zlib has nothing left to give: no end of stream
            return Inflated(total, head, "ends early")


def _zlib_reason(err: zlib.error) -> str:
    reason = str(err).split(":", 1)[-1].strip()
    if "check" in reason:  # "incorrect data check" / "incorrect length check"
        return f"the compressed data fails its integrity check (zlib: {reason})"
    return f"the compressed data cannot be decoded (zlib: {reason})"


def read_text_header(handle: BinaryIO, find_end: Callable[[bytes], int | None]) -> tuple[str, int | None]:
    """The text header (up to ``find_end``'s offset, or all that was read) and where the data starts (or None)."""
    buffer = b""
    while len(buffer) < MAX_TEXT_HEADER:
        chunk = handle.read(1 << 16)
        buffer += chunk
        end = find_end(buffer)
        if end is not None:
            return buffer[:end].decode("latin-1"), end
        if not chunk:
            break
    return buffer.decode("latin-1"), None


def _detached(header: Path, name: str, check: Callable[[Path], str | None]) -> str | None:
    """Run ``check`` on a data file named in a header (relative to the header's folder)."""
    target = Path(name) if Path(name).is_absolute() else header.parent / name
    if not target.is_file():
        return f"the data file {target} named in its header is missing"
    problem = check(target)
    return None if problem is None else f"data file {target.name}: {problem}"


def _short_file(have: int, expected: int, whole_file: bool = False) -> str | None:
    """Raw data: ``have`` bytes against the ``expected`` count (``whole_file``: both include the header)."""
    if have >= expected:
        return None
    what = "bytes (header and voxel data)" if whole_file else "bytes of voxel data"
    return f"truncated: the header promises {expected:,} {what}, the file has {max(have, 0):,}"


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


CHECKS: tuple[tuple[str, Callable[[Path], str | None]], ...] = (
    (".nii.gz", _check_nii_gz),
    (".nii", _check_nii),
    (".nrrd", _check_nrrd),
    (".nhdr", _check_nrrd),
    (".mha", _check_meta),
    (".mhd", _check_meta),
)
