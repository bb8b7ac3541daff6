"""Run a prepared registration in a child process and poll it from the main thread.

Inside Slicer the main thread holds Python's GIL while it idles in the Qt event loop, so a Python thread running
the engine there advances about one torch operation per timer tick. The engine therefore runs in another process:
Slicer's own Python (``PythonSlicer``; ``sys.executable`` outside the application) running
``python -m DTNRegistrationLib.cli register ... --progress-format jsonl``.

The main thread only writes the inputs, reads progress and builds the result nodes:

* :meth:`RegistrationRunner.start` writes the job's images (world geometry, labels, mask) into a temporary
  folder and starts the child; it returns at once.
* :meth:`RegistrationRunner.poll` never blocks: it reads the child's new JSON lines (its stdout goes to a file, so
  no pipe can fill up and no reader thread is needed) and, once the child has ended, the result files or the error.
* :meth:`RegistrationRunner.cancel` terminates the child's whole process tree (``PythonSlicer`` is a launcher
  that starts the interpreter as its own child), kills it after :attr:`RegistrationRunner.grace_s`, and deletes
  the temporary folder.

No Qt and no MRML here: the caller's timer calls ``poll()`` and builds nodes from ``state.result``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk  # noqa: N813

from ..core.result import RegistrationResult, read_result
from ..errors import Cancelled, InputError, ModelError, RegistrationFailed
from ..panel.environment import hidden_console
from .job import RegistrationJob

ENGINE_DIR = Path(__file__).resolve().parents[2]  # holds DTNRegistrationLib: the child's working directory
RESULT_FORMAT = ".nrrd"  # exact geometry (NIfTI stores its matrix in float32), quick to write and read
GRACE_S = 1.0  # between terminate and kill
_WINDOWS = os.name == "nt"


@dataclass
class RunnerState:
    """What ``poll()`` returns: progress, and once ``done`` either ``result`` or ``error``."""

    fraction: float = 0.0
    message: str = "starting"
    done: bool = False
    result: RegistrationResult | None = None
    error: BaseException | None = None
    elapsed_s: float = 0.0


def child_python() -> str:
    """The Python that runs the engine: ``PythonSlicer`` inside the Slicer application, else this interpreter."""
    try:
        from slicer import app  # noqa: F401  (only the application has it; slicer-core does not)
    except ImportError:
        return sys.executable
    # Slicer puts PythonSlicer on PATH (and sets sys.executable to it); the launcher sets up its environment.
    found = shutil.which("PythonSlicer") or (
        sys.executable if "pythonslicer" in Path(sys.executable).name.lower() else None
    )
    if not found:
        raise RegistrationFailed("PythonSlicer, Slicer's Python, was not found on PATH; reinstall Slicer")
    return found


def child_environment() -> dict[str, str]:
    """Environment of the child: inside Slicer the one Slicer started with (the launcher adds its own paths)."""
    try:
        from slicer import app  # noqa: F401
        from slicer.util import startupEnvironment
    except ImportError:
        env = dict(os.environ)
    else:
        env = dict(startupEnvironment())
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONSAFEPATH", None)  # `-m` must find DTNRegistrationLib in the working directory
    return env


class RegistrationRunner:
    """One registration in a child process (see the module docstring). Single use: start, poll until done."""

    grace_s = GRACE_S

    def __init__(
        self,
        job: RegistrationJob,
        *,
        python: str | None = None,
        env: dict[str, str] | None = None,
        temp_root: str | os.PathLike | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.job = job
        self.python = python
        self.env = env
        self.temp_root = temp_root
        self.extra_args = list(extra_args or [])
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None
        self.engine_pid: int | None = None  # the interpreter's own id (behind PythonSlicer's launcher)
        self.state = RunnerState()
        self._start_time = 0.0
        self._offset = 0
        self._pending = b""
        self._error_line: dict | None = None
        self._done_line: dict | None = None
        self._cancel_time: float | None = None
        self._killed = False
        self._streams: list = []

    # -- starting ----------------------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path | None:
        return self.folder / "log.txt" if self.folder else None

    def start(self) -> None:
        """Write the inputs and start the child (returns at once). Raises if the child cannot be started."""
        if self.process is not None:
            raise RuntimeError("a runner is used once")
        self._start_time = time.perf_counter()
        self.folder = Path(tempfile.mkdtemp(prefix="DTNRegistration-", dir=self.temp_root))
        try:
            command = self.command()
            stdout = open(self.folder / "progress.jsonl", "wb")  # noqa: SIM115 - closed in _close_streams
            stderr = open(self.folder / "log.txt", "wb")  # noqa: SIM115
            self._streams = [stdout, stderr]
            self.process = subprocess.Popen(
                command,
                cwd=str(ENGINE_DIR),
                env=self.env if self.env is not None else child_environment(),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=not _WINDOWS,  # its own process group: cancel reaches the launcher's child too
                **hidden_console(),
            )
        except BaseException:
            self._close_streams()
            self.cleanup()
            raise
        self.state = RunnerState(message="starting Python")

    def command(self) -> list[str]:
        """Write the job's images into the temporary folder; the child's command line."""
        inputs = self.folder / "inputs"
        inputs.mkdir()
        job = self.job

        def write(image: sitk.Image, name: str) -> str:
            path = inputs / f"{name}.nrrd"
            sitk.WriteImage(image, str(path), False)  # uncompressed: the main thread's time matters here
            return str(path)

        command = [self.python or child_python(), "-m", "DTNRegistrationLib.cli", "register"]
        command += ["--moving", write(job.moving, "moving"), "--fixed", write(job.fixed, "fixed")]
        if job.moving_labels is not None:
            command += ["--moving-labels", write(job.moving_labels, "moving_labels")]
        if job.mask is not None:
            command += ["--mask", write(job.mask, "mask")]
        if job.moving_mask is not None:
            command += ["--moving-mask", write(job.moving_mask, "moving_mask")]
        command += ["--output-dir", str(self.folder / "output"), "--format", RESULT_FORMAT]
        command += ["--progress-format", "jsonl"]
        options = job.options
        command += options.arguments()
        if options.model:  # the child runs in ENGINE_DIR: a relative weights path is made absolute
            model = Path(options.model)
            command += ["--model", str(model.resolve()) if model.is_file() else options.model]
        return command + self.extra_args

    # -- polling -----------------------------------------------------------------------------------------------

    def poll(self) -> RunnerState:
        """Progress so far; when the child has ended, ``done`` with the result or the error. Never blocks."""
        state = self.state
        if state.done or self.process is None:
            return state
        state.elapsed_s = time.perf_counter() - self._start_time
        returncode = self.process.poll()  # before reading: every line written before exit is then in the file
        self._read_lines()
        if self._cancel_time is not None:
            waited = time.perf_counter() - self._cancel_time
            # Done when the launcher and the interpreter behind it have ended (or, should the system never
            # report the killed interpreter as gone, well after the kill).
            if returncode is None or (self._engine_alive() and waited < 3 * self.grace_s):
                if waited >= self.grace_s:
                    self._signal_tree(kill=True)
                return state
            self._signal_tree(kill=True)  # anything the launcher left behind
            return self._finish(error=Cancelled("registration cancelled"))
        if returncode is None:
            return state
        if returncode == 0 and self._done_line is not None:
            try:
                result = read_result(self.folder / "output", RESULT_FORMAT)
            except RegistrationFailed as err:
                err.details = self.log()
                return self._finish(error=err)
            state.fraction, state.message = 1.0, "done"
            return self._finish(result=result)
        return self._finish(error=self._failure(returncode))

    def _read_lines(self) -> None:
        path = self.folder / "progress.jsonl"
        try:
            with open(path, "rb") as stream:
                stream.seek(self._offset)
                chunk = stream.read()
        except OSError:
            return
        self._offset += len(chunk)
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()  # an incomplete last line waits for the next poll
        for raw in lines:
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # not ours (a library printing to stdout): it is in the file, not in the progress
            if not isinstance(line, dict):
                continue
            if "pid" in line:
                self.engine_pid = int(line["pid"])
            if "error" in line:
                self._error_line = line
                continue
            if "fraction" in line:
                self.state.fraction = float(line["fraction"])
                self.state.message = str(line.get("message", ""))
            if line.get("message") == "done" and "output_dir" in line:
                self._done_line = line

    def _failure(self, returncode: int) -> BaseException:
        """The child's end as one clear line (input errors as such); the log keeps the details."""
        details = self.log()
        if self._error_line is not None:
            message = str(self._error_line.get("error", "")).strip()
            message = message.removeprefix("error: ").removeprefix("failed: ")
            kind = self._error_line.get("kind")
            if kind in ("input", "model"):
                return (ModelError if kind == "model" else InputError)(message)
            return RegistrationFailed(message, details)
        if returncode < 0:  # POSIX: ended by a signal
            name = _signal_name(-returncode)
            hint = ", probably out of memory" if -returncode == getattr(signal, "SIGKILL", 9) else ""
            return RegistrationFailed(f"the registration process was killed by {name}{hint}", details)
        last = next((line for line in reversed(details.splitlines()) if line.strip()), "no output")
        return RegistrationFailed(f"the registration process ended with code {returncode}: {last.strip()}", details)

    def log(self) -> str:
        """What the child wrote on stderr (tracebacks, warnings, the summary)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def _finish(self, result=None, error=None) -> RunnerState:
        self.state.done, self.state.result, self.state.error = True, result, error
        self.state.elapsed_s = time.perf_counter() - self._start_time
        self._close_streams()
        self.cleanup()
        return self.state

    # -- cancelling and waiting ------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the child to stop now (terminate); ``poll()`` kills it after the grace period. Never blocks."""
        if self.process is None or self.state.done or self._cancel_time is not None:
            return
        self._cancel_time = time.perf_counter()
        self.state.message = "cancelling"
        self._signal_tree(kill=_WINDOWS)  # Windows has no gentle signal: TerminateProcess at once

    def _signal_tree(self, kill: bool) -> None:
        if self._killed:
            return
        self._killed = kill
        if _WINDOWS:
            # taskkill /T ends the launcher and the interpreter it started
            subprocess.run(
                ["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
                **hidden_console(),
            )
            return
        sig = signal.SIGKILL if kill else signal.SIGTERM
        try:
            os.killpg(self.process.pid, sig)  # the group started with the child: launcher and interpreter
        except (ProcessLookupError, PermissionError):
            pass
        if self.engine_pid is not None and self.engine_pid != self.process.pid:
            try:
                os.kill(self.engine_pid, sig)  # in case a launcher moved it to a group of its own
            except (ProcessLookupError, PermissionError):
                pass

    def _engine_alive(self) -> bool:
        """Whether the interpreter behind a launcher still runs (the launcher itself is ``self.process``)."""
        pid = self.engine_pid
        if pid is None or pid == self.process.pid or _WINDOWS:  # Windows: taskkill /T has already ended the tree
            return False
        if os.path.isdir("/proc/self"):  # Linux: a zombie has ended, whoever reaps it
            try:
                with open(f"/proc/{pid}/stat") as stream:
                    return stream.read().rsplit(")", 1)[1].split()[0] != "Z"
            except OSError:
                return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> RunnerState:
        """Poll until done (scripts and tests; the GUI polls from a timer instead). Cancels on timeout."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.poll().done:
            if deadline is not None and time.perf_counter() > deadline and self._cancel_time is None:
                self.cancel()
            time.sleep(interval)
        return self.state

    def cleanup(self) -> None:
        """Delete the temporary folder (inputs, outputs, log). Safe to call more than once."""
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)

    def _close_streams(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams = []


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


__all__ = ["GRACE_S", "RegistrationRunner", "RunnerState", "child_environment", "child_python"]
