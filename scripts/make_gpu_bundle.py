"""Prepare, on this machine, what the one-command GPU training job needs on a machine without SimpleITK.

    python scripts/make_gpu_bundle.py [--devdata /tmp/dtn-devdata] [--out .gpu]

Writes into ``--out`` (ignored by git, carried to the GPU machine):
- ``real.npz``: the brain-extracted development subjects (ICBM 2009a with tissue labels, the ITK example brain with
  its k-means tissue classes, the ROBEX brain with its brain mask as label 10), affinely aligned to the ICBM brain
  and resampled onto the 2 mm training grid by the same code as ``dtnreg train`` (``data.Preparer``), as one
  SimpleITK-free bundle (``pairs.save_prepared``);
- ``sitk.tar.xz``: SimpleITK for CPython 3.12 on x86-64 Linux (the wheel's files, library stripped, xz-compressed:
  about 28 MB instead of 53), so that the job can also time ``dtnreg register --device cuda`` end to end.
Then checks that everything that travels (the working tree plus this folder) stays under the 64 MiB a call takes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from benchmark_registration import prepare_pairs  # noqa: E402

from DTNRegistrationLib import datasets  # noqa: E402
from DTNRegistrationLib.train import pairs  # noqa: E402
from DTNRegistrationLib.train import volumes as data  # noqa: E402

SPACING_MM = 2.0
SHAPE = (96, 112, 96)  # array order; covers 192 x 224 x 192 mm around the ICBM brain
ROBEX_BRAIN_LABEL = 10  # distinct from the tissue labels 1-3 of the other two subjects
TRAVEL_LIMIT_MIB = 64


def prepare_real(devdata: Path, target: Path, work: Path, spacing_mm: float, shape: tuple[int, int, int]) -> Path:
    files = {p["name"]: p for p in prepare_pairs(devdata, work)}
    itk, robex = files["ITK brain -> ICBM (tissue)"], files["ROBEX brain -> ICBM (brain mask)"]
    robex_label = work / "robex_brain10.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(robex["moving_labels"])) * ROBEX_BRAIN_LABEL, str(robex_label))
    subjects = [
        datasets.Subject(Path(itk["fixed"]), Path(itk["fixed_labels"])),  # ICBM 2009a, tissue
        datasets.Subject(Path(itk["moving"]), Path(itk["moving_labels"])),  # ITK example brain, tissue
        datasets.Subject(Path(robex["moving"]), robex_label),  # ROBEX brain, brain mask
    ]
    names = ["icbm2009a_brain", "itk_brain", "robex_brain"]
    preparer = data.Preparer(subjects[0], spacing_mm, shape, "affine", cache_dir=None)
    volumes = data.prepare_all(preparer, subjects, workers=2)
    for vol, name in zip(volumes, names):
        vol.name = name
    data.remap_labels(volumes)
    description = f"ICBM 2009a, ITK example and ROBEX brains, {spacing_mm:g} mm, aligned to ICBM"
    return pairs.save_prepared(target, pairs.RealData(volumes, description=description))


def pack_simpleitk(out: Path, work: Path) -> Path:
    target = out / "sitk.tar.xz"
    if target.is_file():
        return target
    version = sitk.Version.VersionString().split("-")[0]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(work)]
    command += ["--python-version", "3.12", "--implementation", "cp"]
    command += [arg for p in platforms for arg in ("--platform", p)]
    subprocess.run(command + [f"SimpleITK=={version}"], check=True)
    wheel = next(work.glob("simpleitk-*.whl"), None) or next(work.glob("SimpleITK-*.whl"))
    unpacked = work / "sitk"
    subprocess.run(["unzip", "-q", str(wheel), "-d", str(unpacked)], check=True)
    for library in unpacked.glob("SimpleITK/*.so"):
        subprocess.run(["strip", "--strip-unneeded", str(library)], check=True)
    subprocess.run(["tar", "cJf", str(target), "-C", str(unpacked), "."], check=True)
    return target


def travel_size_mib(bundle: Path) -> float:
    """Bytes of what a device call sends: tracked and untracked-not-ignored files, plus the bundle."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    total = sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())
    total += sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return total / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devdata", type=Path, default=Path("/tmp/dtn-devdata"))
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--no-simpleitk", action="store_true", help="leave out SimpleITK (no end-to-end timing)")
    parser.add_argument("--spacing-mm", type=float, default=SPACING_MM)
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE, help="grid size D H W (multiples of 16)")
    parser.add_argument("--name", default="real.npz", help="file name of the volumes in --out")
    args = parser.parse_args()
    if not (args.devdata / "icbm2009a_t1.nii.gz").is_file():
        fetch = ROOT.parent / "shared" / "data" / "fetch.sh"
        subprocess.run(["bash", str(fetch), str(args.devdata)], check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dtn-gpu-bundle-") as tmp:
        real = prepare_real(args.devdata, args.out / args.name, Path(tmp), args.spacing_mm, tuple(args.shape))
        loaded = pairs.load_prepared(real)
        for vol in loaded.train:
            labels = "none" if vol.labels is None else str(np.unique(vol.labels).tolist())
            print(f"{vol.name}: {vol.image.shape}, labels {labels}")
        if not args.no_simpleitk:
            pack_simpleitk(args.out, Path(tmp))
    size = travel_size_mib(args.out)
    print(f"bundle in {args.out}; what a device call sends: {size:.1f} MiB (limit {TRAVEL_LIMIT_MIB})")
    if size > TRAVEL_LIMIT_MIB - 2:
        print("too large for a device call: remove untracked files or pass --no-simpleitk", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
