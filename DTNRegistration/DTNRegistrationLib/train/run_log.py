"""The training run's CSV log (and TensorBoard when it is installed)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..files import atomic_write

LOG_FILE = "train_log.csv"
LOG_COLUMNS = (
    "step",
    "time_s",
    "source",
    "alpha",
    "loss",
    "similarity",
    "smoothness",
    "dice_loss",
    "field_error",
    "lr",
    "val_dice",
    "val_folding_percent",
    "val_sd_log_jacobian",
)


class RunLog:
    """CSV log (and TensorBoard when it is installed), written by rank 0 only."""

    def __init__(self, out: Path, resume_step: int | None, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / LOG_FILE
        self.tb = None
        if not enabled:
            return
        if resume_step is None or not self.path.is_file():
            self.path.write_text(",".join(LOG_COLUMNS) + "\n", encoding="utf-8")
        else:
            self._truncate(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            self.tb = None

    def _truncate(self, step: int) -> None:
        """Drop rows logged after the checkpoint being resumed (the resumed run logs them again)."""
        with open(self.path, newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        text = ",".join(LOG_COLUMNS) + "\n" + "".join(",".join(r.get(c, "") for c in LOG_COLUMNS) + "\n" for r in rows)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        values = [_fmt(row.get(c, "")) for c in LOG_COLUMNS]
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(",".join(values) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if isinstance(value, float) and key not in ("time_s",):
                    self.tb.add_scalar(key, value, int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a training CSV log (for tests and plots)."""
    with open(Path(path) / LOG_FILE if Path(path).is_dir() else path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


__all__ = ["LOG_COLUMNS", "LOG_FILE", "RunLog", "read_log"]
