"""Sparse-autoencoder and transcoder latents as units: reading SAELens and sparsify folders, and encoding.

A latent's value is what the SAE's encoder gives for the activation at its hook point. Two folder formats:

- **SAELens** (``cfg.json`` + ``sae_weights.safetensors``): ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae,
  d_out]``, ``b_dec``, and ``threshold`` for JumpReLU. ``cfg.json`` names the ``architecture`` ("standard",
  "jumprelu", "topk", and the transcoders "transcoder", "skip_transcoder", "jumprelu_transcoder",
  "jumprelu_skip_transcoder"), ``apply_b_dec_to_input``, ``k`` for TopK (with ``rescale_acts_by_decoder_norm``),
  ``normalize_activations`` (only "none" is read) and the hook as a TransformerLens name (``metadata.hook_name``
  in SAELens 6, ``hook_name`` at the top level before). Encoding, as SAELens's ``encode`` computes it:
  ``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc``; standard: ``relu(pre)``; JumpReLU:
  ``relu(pre) * (pre > threshold)``; TopK: the ``k`` largest of ``pre`` (times each latent's decoder norm when
  ``rescale_acts_by_decoder_norm``), through a ReLU, the rest 0.
- **EleutherAI sparsify** (``<hookpoint>/cfg.json`` + ``sae.safetensors``; a folder of several hookpoints is
  several layers): ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``, ``b_dec``,
  optional ``W_skip``; ``cfg.json`` has ``d_in``, ``k``, ``activation`` ("topk" or "groupmax"), ``transcode``.
  Encoding, as sparsify's ``SparseCoder.encode``: ``pre = relu((x - b_dec) @ encoder.weight.T + encoder.bias)``
  (no ``- b_dec`` for a transcoder), then the top ``k`` (TopK) or the largest of each of ``k`` equal groups
  (groupmax). The hookpoint is a module name of the model (``layers.6``, ``layers.6.mlp``, with or without the
  base model's prefix): an SAE reads the module's output; a transcoder reads its input and reconstructs its
  output.

TransformerLens hook names map onto each architecture's modules (`hook_site`): ``blocks.L.hook_resid_pre``
(the block's input), ``hook_resid_post`` (its output), ``hook_resid_mid`` (the input of the norm before the MLP),
``ln2.hook_normalized`` (that norm's output: the MLP's input), ``hook_mlp_out`` and ``hook_attn_out`` (the MLP's
and attention's output; Gemma 2/3's after their post-norms, where TransformerLens reads them), and
``mlp.hook_post`` (the MLP neurons' site, `nbutils.subject.sites`).

In results a latent is ``layer`` = the hook's layer and ``neuron`` = the latent's index (`nbutils.core.units`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nbutils.core.errors import UserError
from nbutils.subject.sites import NeuronSite, resolve_site
from nbutils.subject.units import UnitType

LATENT = "sae_latent"
"""The kind of SAE and transcoder latents."""

SAELENS_ARCHITECTURES = {
    "standard": ("relu", False),
    "jumprelu": ("jumprelu", False),
    "topk": ("topk", False),
    "transcoder": ("relu", True),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
"""SAELens architecture -> (activation, is a transcoder)."""

WRITES_TO_RESIDUAL = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
"""Hooks whose space is the residual stream's, so a latent's decoder row is what it writes there."""


# ----------------------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------------------


@dataclass
class SparseCoder:
    """One SAE or transcoder, in one convention: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str
    """"relu", "jumprelu", "topk" (pre-activations ranked, then ReLU), "relu_topk" (ReLU, then ranked:
    sparsify) or "groupmax" (sparsify)."""
    input_bias: torch.Tensor | None = None
    """Subtracted from the input before encoding (SAELens's ``apply_b_dec_to_input``; sparsify's SAEs)."""
    threshold: torch.Tensor | None = None
    k: int = 0
    rescale_by_decoder_norm: bool = False

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device: torch.device) -> SparseCoder:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return SparseCoder(**moved)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent values ``[..., d_sae]`` (float32) of activations ``x [..., d_in]``."""
        x = x.float()
        if self.input_bias is not None:
            x = x - self.input_bias
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if self.activation in ("topk", "relu_topk"):
            if self.activation == "relu_topk":
                pre = torch.relu(pre)
            if self.rescale_by_decoder_norm:
                pre = pre * self.W_dec.norm(dim=-1)
            values, indices = torch.topk(pre, self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))
        if self.activation == "groupmax":
            pre = torch.relu(pre)
            groups = pre.unflatten(-1, (self.k, -1))
            values, where = groups.max(dim=-1)
            out = torch.zeros_like(groups).scatter_(-1, where.unsqueeze(-1), values.unsqueeze(-1))
            return out.flatten(-2)
        raise AssertionError(self.activation)


# ----------------------------------------------------------------------------------------------------------
# Reading folders
# ----------------------------------------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path)).items()}


def _need(weights: dict[str, torch.Tensor], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in weights]
    if missing:
        raise UserError(
            f"{path} lacks the tensors {missing} (it holds {sorted(weights)}).",
            "Point units= at an SAE saved by SAELens (sae_weights.safetensors) or sparsify (sae.safetensors).",
        )


def load_saelens(folder: Path) -> tuple[SparseCoder, dict[str, Any]]:
    """An SAELens folder's encoder and what it says about itself (architecture, hook, sizes)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn_str") == "topk" else "standard")
    if arch not in SAELENS_ARCHITECTURES:
        raise UserError(
            f"{folder / 'cfg.json'} has architecture {arch!r}, which nbutils cannot encode.",
            f"Use an SAE of architecture {', '.join(SAELENS_ARCHITECTURES)}.",
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise UserError(
            f"{folder / 'cfg.json'} normalises activations ({norm!r}) at run time, which nbutils does not do.",
            "Fold the normalisation into the weights first (SAELens: sae.fold_activation_norm_scaling_factor), "
            'or use an SAE that does not normalise (normalize_activations "none").',
        )
    activation, transcoder = SAELENS_ARCHITECTURES[arch]
    w = _tensors(folder / "sae_weights.safetensors")
    _need(w, ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if activation == "jumprelu" else ()), folder)
    meta = cfg.get("metadata") or {}
    hook = meta.get("hook_name") or cfg.get("hook_name")
    if not hook:
        raise UserError(f"{folder / 'cfg.json'} names no hook_name.", "Add the TransformerLens hook name it reads.")
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0)
    if activation == "topk" and k <= 0:
        raise UserError(f"{folder / 'cfg.json'} is a TopK SAE without k.", "Add k (latents kept per token).")
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", not transcoder)) and not transcoder
    coder = SparseCoder(
        W_enc=w["W_enc"], b_enc=w["b_enc"], W_dec=w["W_dec"], b_dec=w["b_dec"], activation=activation,
        input_bias=w["b_dec"] if apply_b_dec else None, threshold=w.get("threshold"), k=k,
        rescale_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
    )  # fmt: skip
    if "d_in" in cfg and int(cfg["d_in"]) != coder.d_in:
        raise UserError(f"{folder}: cfg.json says d_in={cfg['d_in']} but W_enc has {coder.d_in} rows.", "Fix cfg.json.")
    info = {"format": "saelens", "architecture": arch, "hook": hook, "transcoder": transcoder, "k": k}
    return coder, info


def load_sparsify(folder: Path) -> tuple[SparseCoder, dict[str, Any]]:
    """One sparsify hookpoint folder's encoder (the folder's name is the hookpoint)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise UserError(
            f"{folder / 'cfg.json'} has activation {activation!r}, which nbutils cannot encode.",
            "Use a sparsify SAE with activation 'topk' or 'groupmax'.",
        )
    w = _tensors(folder / "sae.safetensors")
    _need(w, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder)
    transcoder = bool(cfg.get("transcode", False))
    coder = SparseCoder(
        W_enc=w["encoder.weight"].T.contiguous(), b_enc=w["encoder.bias"], W_dec=w["W_dec"], b_dec=w["b_dec"],
        activation="relu_topk" if activation == "topk" else "groupmax",
        input_bias=None if transcoder else w["b_dec"], k=int(cfg.get("k", 32)),
    )  # fmt: skip
    if "d_in" in cfg and int(cfg["d_in"]) != coder.d_in:
        raise UserError(
            f"{folder}: cfg.json says d_in={cfg['d_in']} but the encoder reads {coder.d_in}.", "Fix cfg.json."
        )
    info = {"format": "sparsify", "architecture": activation, "hook": folder.name, "transcoder": transcoder}
    return coder, {**info, "k": coder.k}


def _is_saelens(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()


def _is_sparsify(folder: Path) -> bool:
    return (folder / "cfg.json").is_file() and (folder / "sae.safetensors").is_file()


def sae_encoder_folders(path: str | Path) -> list[tuple[str, Path]]:
    """Each encoder's (format, folder) in an SAE folder, recognised from its files without reading weights:
    ``("saelens", folder)``, ``("sparsify", folder)``, or one sparsify folder per hookpoint. Raises a
    UserError naming what was found otherwise."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"units={str(path)!r}: no such folder.", "Give the folder an SAE was saved to.")
    if _is_saelens(folder):
        return [("saelens", folder)]
    if _is_sparsify(folder):
        return [("sparsify", folder)]
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and _is_sparsify(p))
    if subs:
        return [("sparsify", p) for p in subs]
    held = sorted(p.name for p in folder.iterdir())[:10]
    raise UserError(
        f"{folder} is neither an SAELens SAE (cfg.json + sae_weights.safetensors) nor a sparsify one "
        f"(<hookpoint>/cfg.json + sae.safetensors); it holds {held or 'nothing (an empty folder)'}.",
        "Point units= at the folder an SAE was saved to (SAELens: sae.save_model(path); sparsify: "
        "SparseCoder.save_to_disk(path)), or at `nbutils train-sae`'s output, or use -p units=mlp_neurons for MLP neurons.",
    )


def read_sae_folder(path: str | Path) -> list[tuple[SparseCoder, dict[str, Any]]]:
    """Every encoder in an SAE folder (see `sae_encoder_folders`), loaded."""
    loaders = {"saelens": load_saelens, "sparsify": load_sparsify}
    return [loaders[kind](folder) for kind, folder in sae_encoder_folders(path)]


def weights_digest(path: str | Path) -> str:
    """A short hash of an SAE folder's weight files, so a collection knows which SAE it read."""
    h = hashlib.sha256()
    for p in sorted(Path(path).expanduser().rglob("*.safetensors")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Where a hook is in each architecture
# ----------------------------------------------------------------------------------------------------------

_BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}
"""Block lists by architecture; every other built-in architecture keeps them at ``model.layers``."""
_PARTS = {
    "gpt2": {"mlp": "mlp", "attn": "attn", "ln2": "ln_2"},
    "gpt_neox": {"mlp": "mlp", "attn": "attention", "ln2": "post_attention_layernorm"},
    "gemma2": {"mlp": "post_feedforward_layernorm", "attn": "post_attention_layernorm", "ln2": "pre_feedforward_layernorm"},
    "gemma3_text": {"mlp": "post_feedforward_layernorm", "attn": "post_attention_layernorm", "ln2": "pre_feedforward_layernorm"},
}  # fmt: skip
_LLAMA_PARTS = {"mlp": "mlp", "attn": "self_attn", "ln2": "post_attention_layernorm"}
_TL_HOOKS = {
    "hook_resid_pre": (None, "input"),
    "hook_resid_post": (None, "output"),
    "hook_resid_mid": ("ln2", "input"),
    "ln2.hook_normalized": ("ln2", "output"),
    "hook_mlp_out": ("mlp", "output"),
    "hook_attn_out": ("attn", "output"),
}
"""TransformerLens hook -> (the block's part, the side of it read); ``mlp.hook_post`` is the neuron site."""


def _model_type(model: Any) -> str:
    return str(getattr(model.config, "model_type", type(model).__name__))


def hook_site(model: Any, hook: str) -> tuple[NeuronSite, int]:
    """The module side a TransformerLens hook name reads in this model, and its layer."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if not m:
        raise UserError(
            f"Hook {hook!r} is not a TransformerLens block hook (blocks.<layer>.<hook>).",
            f"Use one of blocks.L.{{{', '.join([*_TL_HOOKS, 'mlp.hook_post'])}}}.",
        )
    layer, name = int(m[1]), m[2]
    kind = _model_type(model)
    if name == "mlp.hook_post":
        neurons = resolve_site(model)
        return NeuronSite(neurons.module, neurons.side, signed=False), layer
    if name not in _TL_HOOKS:
        raise UserError(
            f"Hook {hook!r}: nbutils does not map {name!r} onto {kind} modules.",
            f"Use an SAE on one of: {', '.join([*_TL_HOOKS, 'mlp.hook_post'])}.",
        )
    part, side = _TL_HOOKS[name]
    block = _BLOCKS.get(kind, "model.layers") + ".{layer}"
    module = block if part is None else f"{block}.{_PARTS.get(kind, _LLAMA_PARTS)[part]}"
    return NeuronSite(module, side, signed=False), layer


def hookpoint_site(model: Any, hookpoint: str, transcoder: bool) -> tuple[NeuronSite, int]:
    """The module side a sparsify hookpoint reads (an SAE: the module's output; a transcoder: its input)."""
    names = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "")
    full = hookpoint if hookpoint in names else f"{prefix}.{hookpoint}"
    parts = full.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    if full not in names or not digits:
        raise UserError(
            f"sparsify hookpoint {hookpoint!r} is not a layer's module of this model.",
            f"Use a module name such as {prefix + '.' if prefix else ''}layers.6 or layers.6.mlp.",
        )
    layer = int(parts[digits[0]])
    parts[digits[0]] = "{layer}"
    return NeuronSite(".".join(parts), "input" if transcoder else "output", signed=False), layer


# ----------------------------------------------------------------------------------------------------------
# The unit type
# ----------------------------------------------------------------------------------------------------------


class SAELatents(UnitType):
    """The latents of an SAE or transcoder folder (`read_sae_folder`), one layer per hook point."""

    kind = LATENT
    noun = "feature"

    def __init__(self, path: str | Path) -> None:
        self.path = str(Path(path).expanduser().resolve())
        self._coders: dict[int, SparseCoder] | None = None
        self._read: list[tuple[SparseCoder, dict[str, Any]]] | None = read_sae_folder(self.path)
        self._info: list[dict[str, Any]] = [info for _, info in self._read]
        self._digest = weights_digest(self.path)
        self._site: NeuronSite | None = None

    @classmethod
    def from_dict(cls, unit: dict[str, Any], site: dict[str, Any] | None = None) -> SAELatents:
        """The SAE a collection read, refused if its weights changed since (their digest differs)."""
        made = cls(unit["path"])
        if unit.get("weights") and made._digest != unit["weights"]:
            raise UserError(
                f"The SAE at {unit['path']} is not the one this collection read (its weights changed).",
                "Restore that SAE, or collect again with the new one (a new run id).",
            )
        return made

    def __getstate__(self) -> dict[str, Any]:  # Ray tasks reload the weights from the folder
        return {**self.__dict__, "_coders": None, "_read": None}

    def _load(self, model: Any) -> dict[int, SparseCoder]:
        if self._coders is None:
            coders, sites = {}, set()
            for coder, info in self._read or read_sae_folder(self.path):
                if info["format"] == "saelens":
                    site, layer = hook_site(model, info["hook"])
                else:
                    site, layer = hookpoint_site(model, info["hook"], info["transcoder"])
                if layer in coders:
                    raise UserError(f"{self.path} holds two SAEs for layer {layer}.", "Keep one SAE per layer.")
                coders[layer] = coder
                sites.add(site)
            if len(sites) > 1:
                raise UserError(
                    f"The SAEs in {self.path} read different kinds of hook points ({sorted(s.module for s in sites)}).",
                    "Collect one kind of hook point per run (one folder per kind).",
                )
            self._site, self._coders, self._read = sites.pop(), coders, None
        return self._coders

    def own_layers(self, model: Any) -> list[int]:
        """The layers this SAE folder reads (one per hook point)."""
        return sorted(self._load(model))

    def site(self, model: Any) -> NeuronSite:
        self._load(model)
        assert self._site is not None
        return self._site

    def width(self, model: Any) -> int:
        widths = {c.d_sae for c in self._load(model).values()}
        if len(widths) > 1:
            raise UserError(f"The SAEs in {self.path} have different widths {sorted(widths)}.", "Use equal widths.")
        return widths.pop()

    def signed(self, model: Any) -> bool:
        return False  # latents are ReLU/TopK outputs: never negative

    def transform(self, captured: torch.Tensor, layer: int) -> torch.Tensor:
        coder = self._coders[layer] if self._coders else None
        if coder is None:
            raise RuntimeError("SAELatents.transform before the SAE was loaded for a model (call site() first)")
        if captured.shape[-1] != coder.d_in:
            hook = self._info[0]["hook"]
            raise UserError(
                f"The SAE in {self.path} reads {coder.d_in} numbers per token, but its hook point ({hook}) holds "
                f"{captured.shape[-1]} in this model.",
                "Use an SAE trained on this model and hook point (or the model the SAE was trained on).",
            )
        if coder.W_enc.device != captured.device:
            coder = self._coders[layer] = coder.to(captured.device)
        return coder.encode(captured)

    def edit(
        self, captured: torch.Tensor, layer: int, index: int, values: torch.Tensor | float, add: bool = False
    ) -> torch.Tensor:
        """The hooked activation with latent ``index`` set to ``values`` (or shifted by them) through the
        decoder: ``x + (new - old) * W_dec[index]``. The SAE's reconstruction error (x minus its reconstruction)
        stays in, so the rest of the model sees exactly what it saw except for this latent's change. Not for
        transcoders, whose decoder writes another place (the MLP's output) than the one they read."""
        if self._info[0]["transcoder"]:
            raise UserError(
                f"Setting a transcoder's latent ({self.path}) would change the MLP's output, which nbutils does "
                "not hook yet.",
                "Score transcoder latents without ablation and intervention (ablation=False, intervention=False).",
            )
        coder = self._coders[layer] if self._coders else None
        if coder is None or coder.W_dec.device != captured.device:
            self.transform(captured, layer)  # loads and moves the coder
            coder = self._coders[layer]
        v = (
            values.to(captured.dtype)
            if isinstance(values, torch.Tensor)
            else torch.tensor(values, dtype=captured.dtype)
        )
        v = v.to(captured.device)
        delta = v if add else v - coder.encode(captured)[..., index].to(captured.dtype)
        return captured + delta.unsqueeze(-1) * coder.W_dec[index].to(captured.dtype)

    def as_dict(self) -> dict[str, Any]:
        info = self._info[0]
        hooks = [i["hook"] for i in self._info]
        return {
            "kind": self.kind, "noun": self.noun, "path": self.path, "format": info["format"],
            "architecture": info["architecture"], "transcoder": info["transcoder"], "k": info.get("k", 0),
            "hooks": hooks, "weights": self._digest,
        }  # fmt: skip

    def output_directions(self, model: Any, layer: int, indices: Any) -> torch.Tensor | None:
        """Decoder rows, where the decoder writes into the residual stream: an SAE on the residual stream or a
        block's output, and a transcoder (it writes the MLP's output). None for SAEs on other spaces."""
        coder = self._load(model)[layer]
        info = self._info[0]
        writes = info["transcoder"] or any(info["hook"].endswith(h) for h in WRITES_TO_RESIDUAL)
        if info["format"] == "sparsify" and not info["transcoder"]:
            writes = re.fullmatch(r"(.*\.)?layers\.\d+(\.mlp)?", info["hook"]) is not None
        d_model = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "n_embd", 0))
        if not writes or coder.W_dec.shape[1] != d_model:
            return None
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return coder.W_dec[idx].to(next(model.parameters()).device)
