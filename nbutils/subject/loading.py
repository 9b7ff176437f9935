"""Any subject model by its spec: a language model (`nbutils.subject.models`) or planted neurons
(`nbutils.subject.planted`: ``"planted"`` or ``"planted:<file.py>"``)."""

from __future__ import annotations

import torch

from nbutils.subject.models import EMBEDDED, SubjectModel, load_hf_model
from nbutils.subject.planted import PREFIX, load_planted

__all__ = ["SubjectModel", "load_collected", "load_subject_model"]


def load_subject_model(spec: str = EMBEDDED, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SubjectModel:
    """A hub id, a local folder, a .gguf file or ``"embedded"`` (SmolLM2-135M-Instruct); or planted neurons."""
    if spec == PREFIX or spec.startswith(PREFIX + ":"):
        return load_planted(spec)
    return load_hf_model(spec, dtype, device)


def load_collected(model: str, unit: dict, site: dict | None, device: str | None = None) -> tuple:
    """A collection's subject model (on GPU when there is one, unless ``device`` says) with the unit type it
    recorded resolved on it: ``(subject, units, site)``, so values computed live are the collected ones."""
    from nbutils.subject.units import unit_type_class

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    subject = load_subject_model(model, device=device)
    units = unit_type_class(unit.get("kind", "neuron")).from_dict(unit, site)
    return subject, units, units.site(subject.model)
