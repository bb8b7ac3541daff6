"""Put a trained weights file into DTNRegistration/Resources/Models and register it in models.json.

    python scripts/ship_model.py runs/dtn/model.safetensors dtn-2mm --default --note "trained on ..."

The registry entry records the file's SHA-256, its architecture and what inference needs (spacing, training
shape, alpha range), read from the file's own metadata, so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from DTNRegistrationLib.core import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("name")
    parser.add_argument("--default", action="store_true", help="make it the default model")
    parser.add_argument("--note", default="", help="how it was trained (goes into the registry)")
    args = parser.parse_args()

    loaded = models.load_weights(args.weights)  # refuses a file that does not build its own architecture
    target = models.MODELS_DIR / f"{args.name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.weights, target)
    info = loaded.info
    registry = models.registry()
    registry["models"][args.name] = {
        "file": target.name,
        "sha256": models.sha256_file(target),
        "variant": loaded.config.variant,
        "config": loaded.config.to_dict(),
        "spacing_mm": loaded.spacing_mm,
        "training_shape": info.get("shape"),
        "alpha_range": info.get("alpha_range", list(loaded.config.alpha_range)),
        "default_alpha": loaded.config.alpha,
        "similarity": info.get("similarity", "l1"),
        "training_steps": info.get("step"),
        "training_data": info.get("training_data"),
        "note": args.note,
        "size_mb": round(Path(target).stat().st_size / 2**20, 2),
    }
    if args.default or not registry.get("default"):
        registry["default"] = args.name
    models.REGISTRY_FILE.write_text(json.dumps(registry, indent=2) + "\n")
    print(f"{target} ({registry['models'][args.name]['size_mb']} MB), default: {registry['default']}")


if __name__ == "__main__":
    main()
