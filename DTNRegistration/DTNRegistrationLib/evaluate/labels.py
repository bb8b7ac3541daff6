"""Structure names of ``dtnreg evaluate``: a label table (FreeSurfer LUT, JSON, or numbers) and left/right merging."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError
from ..files import RESOURCES_DIR

LUT_FILE = RESOURCES_DIR / "Labels" / "FreeSurferColorLUT_subset.txt"
SIDE_PREFIXES = (("ctx-lh-", "ctx-"), ("ctx-rh-", "ctx-"), ("left-", ""), ("right-", ""), ("left_", ""), ("right_", ""))


def read_lut(path: str | os.PathLike) -> dict[int, str]:
    """Label names from a FreeSurfer colour table (``number name [R G B A]``, ``#`` comments) or a JSON map."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"label table {path}: file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            return {int(k): str(v) for k, v in json.loads(text).items()}
        except (ValueError, AttributeError) as err:
            raise InputError(f"label table {path}: expected a JSON object {{number: name}} ({err})") from None
    table = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].replace(",", " ").split()
        if len(fields) >= 2 and fields[0].lstrip("-").isdigit():
            table[int(fields[0])] = fields[1]
    if not table:
        raise InputError(f"label table {path}: no 'number name' lines found")
    return table


def load_label_table(spec: str | None = "freesurfer") -> dict[int, str]:
    """``freesurfer`` (the bundled subset of FreeSurfer's table), ``numbers`` (no names), or a table file."""
    if spec in (None, "", "freesurfer"):
        return read_lut(LUT_FILE) if LUT_FILE.is_file() else {}
    if spec == "numbers":
        return {}
    return read_lut(spec)


def label_name(table: dict[int, str], label: int) -> str:
    return table.get(int(label), f"label {int(label)}")


def merged_name(name: str) -> str:
    """The structure's name without its side, so that left and right merge (the paper's Fig. 3)."""
    lower = name.lower()
    for prefix, replacement in SIDE_PREFIXES:
        if lower.startswith(prefix) and len(name) > len(prefix):
            return replacement + name[len(prefix) :]
    return name


__all__ = ["LUT_FILE", "label_name", "load_label_table", "merged_name", "read_lut"]
