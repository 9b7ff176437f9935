"""Executors: what runs a stage notebook. Today papermill in a local kernel (`PapermillExecutor`).

Kernels talk over IPC sockets in a private temporary folder (no TCP port, so none of ipykernel's warning
about unencrypted TCP), their output reaches the console once, progress bars are plain text (the kernel
inherits ``NBUTILS_PLAIN_PROGRESS=1``), and a finished kernel is shut down without the interrupt signal
jupyter_client sends by default (which an idle kernel answers with "KeyboardInterrupt caught in kernel").
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_KERNELS: list[Any] = []
"""Kernel managers with a running kernel, in start order (a Ctrl-C is passed on to them)."""


class StageFailed(Exception):
    """A stage notebook raised; the executed notebook (with the error in it) is at ``notebook``."""

    def __init__(self, stage: str, notebook: Path, reason: str, error: str = "") -> None:
        """``error``: the name of the exception the notebook raised (e.g. ``BudgetReached``)."""
        self.stage, self.notebook, self.reason, self.error = stage, notebook, reason, error
        super().__init__(f"stage {stage} failed: {reason}\nexecuted notebook: {notebook}")


def _kernel_manager_class():
    """A kernel manager whose kernels use IPC sockets in a private temporary folder (no TCP port, so none of
    ipykernel's warning about unencrypted TCP) and are shut down without first being sent SIGINT (which a
    finished, idle kernel answers with a spurious "KeyboardInterrupt caught in kernel")."""
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = os.path.join(tempfile.gettempdir(), f"nbutils-kernel-{uuid.uuid4().hex[:12]}")

        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

        # AsyncKernelManager binds its public coroutines to KernelManager's private ones: override the public
        async def start_kernel(self, **kw: Any) -> None:
            await super().start_kernel(**kw)
            _KERNELS.append(self)

        async def shutdown_kernel(self, *args: Any, **kw: Any) -> None:
            with contextlib.suppress(ValueError):
                _KERNELS.remove(self)
            await super().shutdown_kernel(*args, **kw)

    return QuietKernelManager


@contextlib.contextmanager
def _interrupt_passed_to_kernel() -> Iterator[list[int]]:
    """While inside, a Ctrl-C is sent on to the stage's kernel instead of stopping this process: jupyter_client
    starts kernels in their own session, so a terminal's SIGINT reaches only this process, and papermill would
    kill the kernel mid-batch. The kernel's stage finishes what it holds (stage 01: the batch in progress and
    its checkpoint; stages 02-03: the units already answered are stored) and raises KeyboardInterrupt, which
    `execute` passes on. A second Ctrl-C stops at once. Yields the list of signals seen."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def on_sigint(signum: int, frame: Any) -> None:
        seen.append(signum)
        if len(seen) > 1 or not _KERNELS:
            raise KeyboardInterrupt
        print("interrupted: the stage is saving its progress (Ctrl-C again to stop at once)", file=sys.stderr)
        for km in list(_KERNELS):
            pid = getattr(km.provisioner, "pid", None)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


class PapermillExecutor:
    """Runs a stage notebook with papermill in a quiet local kernel, streaming its output to the console."""

    def execute(self, stage: str, source: Path, executed: Path, params: dict[str, Any], cwd: Path) -> None:
        """Execute ``source`` with ``params`` into ``executed``; raises `StageFailed` if a cell raises."""
        import papermill

        os.environ["NBUTILS_PLAIN_PROGRESS"] = "1"
        with _interrupt_passed_to_kernel() as interrupted:
            try:
                self._papermill(papermill, source, executed, params, cwd)
            except papermill.PapermillExecutionError as e:
                if interrupted or e.ename == "KeyboardInterrupt":
                    raise KeyboardInterrupt from None
                raise StageFailed(stage, executed, f"{e.ename}: {e.evalue}", e.ename) from None
        if interrupted:  # the kernel finished its cell before the interrupt reached it
            raise KeyboardInterrupt

    @staticmethod
    def _papermill(papermill: Any, source: Path, executed: Path, params: dict[str, Any], cwd: Path) -> None:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters=params,
            cwd=str(cwd),
            kernel_name="python3",
            progress_bar=False,
            log_output=False,  # True would print the kernel's stderr a second time, through logging
            stdout_file=sys.stdout,
            stderr_file=sys.stderr,
            kernel_manager_class=_kernel_manager_class(),
        )
