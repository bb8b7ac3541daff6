"""Regenerate docs/results.md: the shipped model and its baselines on the development data and synthetic pairs.

    python scripts/make_results.py                      # the registry's default model
    python scripts/make_results.py --model /tmp/w.safetensors --baseline /tmp/vmdif.safetensors

Needs the development images (``../shared/data/fetch.sh /tmp/dtn-devdata``; run here when they are missing) and
antspyx for SyN (``pip install '.[syn]'``). Everything runs at 2 mm on the CPU: 6.6 minutes on 2 cores from scratch
(measured while a training run shared the cores); ``--refine 20`` adds about 30 s per pair. Intermediate data and
the evaluation caches live in ``--work-dir``, so a rerun after a new model only recomputes the model's rows. The
transformer-free baseline is any registered model of variant ``none`` or ``--baseline``; without one the tables
say so.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_samples import tissue_from_probabilities, to_2mm  # noqa: E402

from DTNRegistrationLib import files  # noqa: E402
from DTNRegistrationLib.core import imaging, models  # noqa: E402
from DTNRegistrationLib.evaluate import inputs as evaluation_inputs  # noqa: E402
from DTNRegistrationLib.evaluate import run as evaluation  # noqa: E402
from DTNRegistrationLib.evaluate.baselines import parse_methods  # noqa: E402
from DTNRegistrationLib.evaluate.labels import load_label_table  # noqa: E402
from DTNRegistrationLib.train import synth  # noqa: E402

FETCH = ROOT.parent / "shared" / "data" / "fetch.sh"
DOCS = ROOT / "docs"
BRAIN = 10  # label of whole-brain masks in the development set (tissue maps use 1 CSF, 2 GM, 3 WM)
DEV_LUT = "1 CSF\n2 Grey-Matter\n3 White-Matter\n10 Brain\n"
SYNTH_SEED = 9001  # training samples synthetic pairs from seed 0 (and validates on seed 12345)
SYNTH_SHAPE = (96, 112, 96)  # the training grid, 2 mm
ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0)


# ---------------------------------------------------------------------------------------------- development data


def _write_once(image: sitk.Image, path: Path) -> Path:
    """Write unless present: the evaluation cache is keyed by file contents, so inputs stay byte-identical."""
    if not path.is_file():
        sitk.WriteImage(image, str(path), True)
    return path


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _masked(image: sitk.Image, mask: np.ndarray) -> sitk.Image:
    return _like(np.where(mask, sitk.GetArrayFromImage(image), 0).astype(np.float32), image)


def prepare_dev(src: Path, out: Path) -> Path:
    """2 mm copies of the development subjects with their labels; returns the pairs CSV."""
    out.mkdir(parents=True, exist_ok=True)
    f = {}
    t1 = sitk.ReadImage(str(src / "icbm2009a_t1.nii.gz"))
    tissue = tissue_from_probabilities(
        t1, sitk.ReadImage(str(src / "icbm2009a_gm.nii.gz")), sitk.ReadImage(str(src / "icbm2009a_wm.nii.gz"))
    )
    icbm = to_2mm(sitk.Cast(t1, sitk.sitkFloat32), sitk.sitkLinear)
    icbm_tissue = to_2mm(tissue, sitk.sitkNearestNeighbor)
    f["icbm"] = _write_once(icbm, out / "icbm_t1.nii.gz")
    f["icbm_tissue"] = _write_once(icbm_tissue, out / "icbm_tissue.nii.gz")
    f["icbm_brain"] = _write_once(_brain(icbm_tissue), out / "icbm_brain.nii.gz")

    head = imaging.read_image(src / "itk_head_t1.nii.gz")  # 2 x 2 x 3 mm already: kept on its own grid
    brain = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "itk_head_brain.nii.gz"))) > 0
    kmeans = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "itk_head_kmeans.nii.gz")))
    classes = np.zeros(256, np.uint8)
    classes[[4, 5, 6]] = [1, 2, 3]  # k-means classes inside the brain: CSF, GM, WM (as scripts/make_samples.py)
    f["itk"] = _write_once(_masked(head, brain), out / "itk_brain_t1.nii.gz")
    itk_tissue = _like(np.where(brain, classes[kmeans], 0).astype(np.uint8), head)
    f["itk_tissue"] = _write_once(itk_tissue, out / "itk_tissue.nii.gz")
    f["itk_brain"] = _write_once(_like((brain * BRAIN).astype(np.uint8), head), out / "itk_brain.nii.gz")

    robex = to_2mm(imaging.read_image(src / "robex_head_t1.nii.gz"), sitk.sitkLinear)
    robex_mask = to_2mm(imaging.read_labels(src / "robex_head_brainmask.nii.gz"), sitk.sitkNearestNeighbor)
    inside = sitk.GetArrayFromImage(robex_mask) > 0
    f["robex"] = _write_once(_masked(robex, inside), out / "robex_brain_t1.nii.gz")
    f["robex_head"] = _write_once(robex, out / "robex_head_t1.nii.gz")
    f["robex_brain"] = _write_once(_like((inside * BRAIN).astype(np.uint8), robex), out / "robex_brain.nii.gz")
    pydeface = to_2mm(imaging.read_image(src / "pydeface_meanhead_t1.nii.gz"), sitk.sitkLinear)
    f["pydeface"] = _write_once(pydeface, out / "pydeface_head_t1.nii.gz")
    (out / "labels.txt").write_text(DEV_LUT, encoding="utf-8")
    return _pairs_csv(out / "pairs.csv", _dev_pairs(f))


def _brain(tissue: sitk.Image) -> sitk.Image:
    return _like(((sitk.GetArrayFromImage(tissue) > 0) * BRAIN).astype(np.uint8), tissue)


def _dev_pairs(f: dict[str, Path]) -> list[dict]:
    """Tissue-labelled pairs (ICBM, ITK), brain-mask pairs with ROBEX, and the held-out pydeface head (no labels)."""

    def pair(name, moving, fixed, labels, mask):
        m_lab, f_lab = (f"{moving}_{labels}", f"{fixed}_{labels}") if labels else (None, None)
        return {
            "name": name,
            "moving": f[moving],
            "fixed": f[fixed],
            "moving_labels": f.get(m_lab),
            "fixed_labels": f.get(f_lab),
            "mask": f[mask],
        }

    return [
        pair("itk->icbm (tissue)", "itk", "icbm", "tissue", "icbm_brain"),
        pair("icbm->itk (tissue)", "icbm", "itk", "tissue", "itk_brain"),
        pair("robex->icbm (brain)", "robex", "icbm", "brain", "icbm_brain"),
        pair("icbm->robex (brain)", "icbm", "robex", "brain", "robex_brain"),
        pair("itk->robex (brain)", "itk", "robex", "brain", "robex_brain"),
        pair("robex->itk (brain)", "robex", "itk", "brain", "itk_brain"),
        pair("pydeface head->robex head (held out, no labels)", "pydeface", "robex_head", None, "robex_brain"),
    ]


def _pairs_csv(path: Path, rows: list[dict]) -> Path:
    columns = ["name", "moving", "fixed", "moving_labels", "fixed_labels", "mask"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else str(row[k]) for k in columns})
    return path


# ---------------------------------------------------------------------------------------------- synthetic benchmark


def prepare_synthetic(out: Path, count: int) -> Path:
    """``count`` synthetic pairs with known labels from synth.py, seeds SYNTH_SEED + i; returns the pairs CSV."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        seed = SYNTH_SEED + i
        names = {k: out / f"synth{seed}_{k}.nii.gz" for k in ("moving", "fixed", "moving_labels", "fixed_labels")}
        if not all(p.is_file() for p in names.values()):
            pair = synth.synth_pair(synth.make_generator(seed), SYNTH_SHAPE, 1)
            arrays = {
                "moving": pair.moving[0, 0].numpy().astype(np.float32),
                "fixed": pair.fixed[0, 0].numpy().astype(np.float32),
                "moving_labels": pair.moving_labels[0, 0].numpy().astype(np.uint8),
                "fixed_labels": pair.fixed_labels[0, 0].numpy().astype(np.uint8),
            }
            for key, array in arrays.items():
                image = sitk.GetImageFromArray(array)
                image.SetSpacing((2.0, 2.0, 2.0))
                image.SetOrigin(tuple(-(n - 1) for n in reversed(SYNTH_SHAPE)))  # centred, LPS, 2 mm
                sitk.WriteImage(image, str(names[key]), True)
        rows.append({"name": f"synthetic seed {seed}", **names})
    return _pairs_csv(out / "pairs.csv", rows)


# ---------------------------------------------------------------------------------------------- methods


def transformer_free_models() -> list[str]:
    """Registered models of variant ``none`` (the VM_dif-like baseline), by name."""
    found = []
    for name, entry in models.registry().get("models", {}).items():
        try:
            _, config, _, _ = models.read_weights(models.MODELS_DIR / entry["file"])
        except models.ModelError:
            continue
        if config.variant == "none":
            found.append(name)
    return found


def method_specs(args, synthetic: bool) -> list[str]:
    """The compared methods; synthetic pairs share one grid and one pose, so no affine stage there."""
    no_affine = ":affine=0" if synthetic else ""
    model = f"dtn:{args.model}"
    specs = ["identity"] + ([] if synthetic else ["affine"])
    specs.append(f"{model}{no_affine}:name=DTN alone")
    specs.append(f"{model}:preset=fast{no_affine}:name=DTN fast (default)")
    if not args.no_accurate:
        specs.append(f"{model}:preset=accurate{no_affine}:name=DTN accurate")
    if args.refine:
        specs.append(f"{model}:refine={args.refine}{no_affine}:name=DTN +{args.refine} steps (former default)")
    for baseline in args.baseline or transformer_free_models():
        specs.append(f"dtn:{baseline}{no_affine}")
    if not args.no_greedy:
        specs.append("greedy")
    if not args.no_syn:
        specs.append("syn:type=SyNOnly" if synthetic else "syn")
    return specs


# ---------------------------------------------------------------------------------------------- docs/results.md


def run_set(args, name: str, pairs_csv: Path, table: str, title: str) -> Path:
    """Evaluate one set into WORK/NAME-eval; returns its report."""
    pairs = evaluation_inputs.pairs_from_csv(pairs_csv)
    evaluation_inputs.check_pairs(pairs)
    methods = parse_methods(method_specs(args, name == "synthetic"), "cpu")
    out = args.work_dir / f"{name}-eval"
    alpha_pair = pairs[0].name
    evaluation.evaluate(
        pairs, methods, out, table=load_label_table(table), alphas=ALPHAS, alpha_pair=alpha_pair, title=title
    )
    return out / "report.md"


def embed(report: Path, prefix: str, figures: Path) -> str:
    """A set's report as a section of docs/results.md: headings one level down, figures copied beside it."""
    figures.mkdir(parents=True, exist_ok=True)
    text = report.read_text(encoding="utf-8")
    for png in report.parent.glob("*.png"):
        shutil.copyfile(png, figures / f"{prefix}_{png.name}")
        text = text.replace(f"]({png.name})", f"]({figures.name}/{prefix}_{png.name})")
    return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)


def model_line(spec: str) -> str:
    loaded = models.load_model(None if spec == "default" else spec)
    info = {k: v for k, v in loaded.info.items() if k in ("steps", "spacing_mm", "similarity", "data", "trained")}
    return f"`{loaded.name}` ({loaded.config.variant}, sha256 `{loaded.sha256[:12]}…`, {json.dumps(info)})"


def write_results(args, sections: list[str], minutes: float) -> None:
    baselines = args.baseline or transformer_free_models()
    header = HEADER.format(
        model=model_line(args.model),
        minutes=minutes,
        baseline=", ".join(f"`{b}`" for b in baselines) if baselines else "none available (see below)",
        seed_last=SYNTH_SEED + args.synthetic_pairs - 1,
        seed=SYNTH_SEED,
        count=args.synthetic_pairs,
        missing="" if baselines else MISSING_BASELINE,
    )
    text = header + "\n" + "\n".join(sections) + "\n" + USAGE
    files.atomic_write(DOCS / "results.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


HEADER = """# Results: DTN against its baselines

Regenerated by one command, `python scripts/make_results.py` (this run: {minutes:.1f} min on the CPU; see the
environment at the end of each section). It calls `dtnreg evaluate` (`DTNRegistrationLib/evaluate/`) on two sets
and pastes the two reports below; every number is also in `results.csv` in its work folder
(`/tmp/dtn-results/*-eval/` by default). Results already in that folder's cache for the same method, options,
inputs and engine source are reused, with the times of the run that computed them (delete the cache to measure
everything again).

- Model: {model}.
- Cross-contrast registration (T2-, FLAIR- and PD-like images against T1): docs/cross-contrast.md.
- Transformer-free baseline (the paper's VM_dif-like ablation, variant `none`): {baseline}.
- DTN rows: the network alone (`--refine 0`: its symmetric pass on its 4 mm grid and three more on the 2 mm work
  grid, docs/model.md), the `fast` preset (the default: refinement at 4 and 2 mm), the
  `accurate` preset (40 + 20 steps at 4 and 2 mm; its 1 mm level is dropped on these 2 mm images), and 25 steps on
  the 2 mm grid (the default before the presets). The presets weigh the smoothness term 3x (fast) and 10x
  (accurate) the run's alpha in their refinement; the network and `--refine N` use alpha itself. The 1 mm
  comparison with both peers, presets and times on a quiet machine: docs/benchmarks.md, section 2.
- PICSL greedy (`pip install picsl_greedy`): affine with normalised mutual information from a centre-of-mass start,
  then deformable NCC 2x2x2, 100x50x10 iterations, on the full grid, all threads
  (`DTNRegistrationLib/evaluate/classical.py`).
- SyN: antspyx `ants.registration(type_of_transform="SyN")` with its default iterations (40x20x0, Mattes MI; the
  paper used 100x100x100), at 2 mm, on the CPU; `SyNOnly` on the synthetic pairs (they share one pose).
- Times in these tables were measured while other work shared the 2 CPU cores, with one torch thread: compare
  speed in docs/benchmarks.md, which was measured on a quiet machine.
- Everything at 2 mm: the development images are resampled to 2 mm (the ITK head keeps its 2 x 2 x 3 mm grid), the
  synthetic pairs are generated at 2 mm. The pipeline works on a 2 mm grid anyway (the shipped network at 4 mm).

**Read these numbers with care.**

- The development images are not a test set: the model was trained on the ICBM 2009a brain, the ROBEX brain
  (masked) and the ITK brain (plus synthetic pairs). Only the pydeface mean head was not used in training, and it
  has no labels: for it only folding, SDlogJ, time and memory are meaningful.
- Their labels are not expert segmentations: tissue classes (CSF, grey and white matter) from the ICBM probability
  maps thresholded and from the ITK head's k-means classes 4, 5, 6 inside its brain mask, and whole-brain masks
  (ROBEX's mask, the ITK brain mask, the ICBM brain). There are no OASIS-style anatomical structures offline, so
  "Fig. 3" here shows tissue classes, not the paper's 16 structures; with 6 labelled pairs the t-tests only
  indicate.
- The synthetic benchmark: {count} pairs from `train/synth.py`'s generator with seeds {seed}..{seed_last} (training
  draws from seed 0 and validates on 12345), 16 random labels (label 0 is scored as background), known label maps. It is
  the same kind of data as the synthetic half of training: in-distribution for the model, not for SyN.
{missing}"""

USAGE = """## Evaluating other data: `dtnreg evaluate`

```bash
dtnreg evaluate --pairs pairs.csv --output-dir eval \\
    --methods identity affine dtn:default dtn:default:preset=fast dtn:default:preset=accurate greedy syn
dtnreg evaluate --dataset-json OASIS_dataset.json --label-table seg35_labels.txt --output-dir eval
dtnreg evaluate --atlas atlas.nii.gz --atlas-labels atlas_seg.nii.gz --images-dir imgs --labels-dir segs \\
    --output-dir eval
```

- Pairs: a CSV with columns `moving,fixed,moving_labels,fixed_labels[,mask,name]` (paths relative to the CSV), a
  Learn2Reg-style dataset JSON (its `registration_val` pairs, else consecutive `validation` images; labels and masks
  from the subjects' `label`/`mask`), or an atlas and a folder (labels of the same file name in `--labels-dir`).
  Every file and every label map's grid is checked before any work.
- Methods: `identity`; `affine` (the engine's affine initialisation alone); `dtn:MODEL` with MODEL a shipped name,
  `default` or a weights file of any variant (DTN, DTN_s, DTN_c, transformer-free), options `refine=N` or
  `preset=fast|accurate` (without either: the network alone), `alpha=A`, `affine=0`; `greedy` (needs
  `pip install picsl_greedy`), options `iterations=100x50x10`, `metric=NCC 2x2x2`, `threads=N`; `syn` (needs
  antspyx: `pip install '.[syn]'`), options `type=SyNOnly`, `iterations=100x100x100`,
  `metric=CC`. Any method takes `name=LABEL`.
- Label names: FreeSurfer's for the aseg numbers by default (a bundled subset,
  `Resources/Labels/FreeSurferColorLUT_subset.txt`), `--label-table numbers`, or any FreeSurfer-format or JSON table
  (for Learn2Reg's OASIS maps, which are numbered 1..35, pass their `seg35_labels.txt`).
- Output: `results.csv` (pair x method x structure), `summary.csv`, `ttests.csv`, `report.md`,
  `dice_per_structure.png`, `alpha_folding.png` (the sweep of `--alphas` on `--alpha-pair`, for the first
  alpha-conditioned DTN method), and `cache/`: one JSON per (pair, method), keyed by the input files' contents and
  the method's settings, so that rerunning after an interruption (or with one more method) computes only what is
  missing.
"""

MISSING_BASELINE = """- No transformer-free model is registered yet, so that column is missing. Train one
  (`dtnreg train --variant none ...`, same data and steps as the shipped model) and pass
  `--baseline PATH.safetensors`, or register it in `Resources/Models/models.json`.
"""


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="shipped model name, 'default', or a .safetensors path")
    parser.add_argument("--baseline", nargs="*", help="transformer-free model(s) (default: registered 'none' ones)")
    parser.add_argument("--refine", type=int, default=25, help="also N steps on the 2 mm grid (the former default)")
    parser.add_argument("--no-accurate", action="store_true", help="leave the accurate preset out")
    parser.add_argument("--no-greedy", action="store_true", help="leave PICSL greedy out")
    parser.add_argument("--devdata", type=Path, default=Path("/tmp/dtn-devdata"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/dtn-results"))
    parser.add_argument("--synthetic-pairs", type=int, default=8)
    parser.add_argument("--no-syn", action="store_true", help="leave SyN out (it is the slowest method)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if not (args.devdata / "icbm2009a_t1.nii.gz").is_file():
        if not FETCH.is_file():
            sys.exit(f"development data missing in {args.devdata}; run shared/data/fetch.sh {args.devdata}")
        subprocess.run(["bash", str(FETCH), str(args.devdata)], check=True)
    dev_csv = prepare_dev(args.devdata, args.work_dir / "dev")
    synth_csv = prepare_synthetic(args.work_dir / "synthetic", args.synthetic_pairs)
    dev = run_set(args, "dev", dev_csv, str(args.work_dir / "dev" / "labels.txt"), "Development data (2 mm)")
    synthetic = run_set(args, "synthetic", synth_csv, "numbers", "Synthetic benchmark (2 mm, known labels)")
    figures = DOCS / "results"
    sections = [embed(dev, "dev", figures), embed(synthetic, "synthetic", figures)]
    minutes = (time.perf_counter() - start) / 60.0
    write_results(args, sections, minutes)
    print(f"wrote {DOCS / 'results.md'} in {minutes:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
