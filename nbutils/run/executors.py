"""Executors: what runs a stage notebook. Today papermill in a local kernel (`PapermillExecutor`).

Kernels talk over IPC sockets in a private temporary folder (no TCP port, so none of ipykernel's warning
about unencrypted TCP), their output reaches the console once, progress bars are plain text (the kernel
inherits ``NBUTILS_PLAIN_PROGRESS=1``), and a finished kernel is shut down without the interrupt signal
jupyter_client sends by default (which an idle kernel answers with "KeyboardInterrupt caught in kernel").
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any


class StageFailed(Exception):
    """A stage notebook raised; the executed notebook (with the error in it) is at ``notebook``."""

    def __init__(self, stage: str, notebook: Path, reason: str) -> None:
        self.stage, self.notebook, self.reason = stage, notebook, reason
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

    return QuietKernelManager


class PapermillExecutor:
    """Runs a stage notebook with papermill in a quiet local kernel, streaming its output to the console."""

    def execute(self, stage: str, source: Path, executed: Path, params: dict[str, Any], cwd: Path) -> None:
        """Execute ``source`` with ``params`` into ``executed``; raises `StageFailed` if a cell raises."""
        import papermill

        os.environ["NBUTILS_PLAIN_PROGRESS"] = "1"
        try:
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
        except papermill.PapermillExecutionError as e:
            raise StageFailed(stage, executed, f"{e.ename}: {e.evalue}") from None
