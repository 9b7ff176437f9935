"""Progress bars that suit where the code runs.

In JupyterLab a widget bar; under the pipeline (papermill streams the kernel's stderr to the terminal,
and sets ``NBUTILS_PLAIN_PROGRESS=1``) or a terminal a plain text bar.
"""

from __future__ import annotations

import os
from typing import Any


def progress_bar(**kwargs: Any):  # noqa: ANN201 - returns a tqdm instance
    if os.environ.get("NBUTILS_PLAIN_PROGRESS"):
        from tqdm.std import tqdm

        return tqdm(mininterval=5.0, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
