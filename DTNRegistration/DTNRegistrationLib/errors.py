"""The engine's exceptions, importable without torch, SimpleITK or Slicer.

One class per kind of failure, defined once, so that ``isinstance`` works wherever an error is caught: in the
command line, in the Slicer module (which never imports torch) and in the runner that reads a child's report.
The former locations still work: ``imaging.InputError``, ``models.ModelError``, ``data.DataError`` and
``registration.Cancelled`` are these classes.
"""

from __future__ import annotations


class InputError(ValueError):
    """Input the pipeline cannot use; the message names the file or image and the problem."""


class ModelError(ValueError):
    """A weights file or model name that cannot be used."""


class DataError(InputError):
    """Training input that cannot be used; the message names the file and the problem."""


class Cancelled(Exception):
    """The caller's cancel flag stopped the registration; nothing was produced."""


class RegistrationFailed(RuntimeError):
    """A registration that ran but did not finish (a crash, out of memory, a killed process).

    ``details`` holds what the log should keep (the child's stderr, the traceback); the message is one line.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class DependencyError(RuntimeError):
    """A Python package the engine needs is missing, too old, or could not be installed."""


__all__ = ["Cancelled", "DataError", "DependencyError", "InputError", "ModelError", "RegistrationFailed"]
