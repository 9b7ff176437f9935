"""Training a small TopK sparse autoencoder on one hook point of the subject model (``nbutils train-sae``).

No pretrained SAE can be downloaded on an offline machine, so this trains one on the embedded model and
corpus in minutes on a CPU and writes it in SAELens's format, ready for ``units=<folder>``. The recipe is
Gao et al. 2024 ("Scaling and evaluating sparse autoencoders"): a TopK activation (exactly ``k`` latents per
token), the decoder bias initialised at the data's mean and subtracted from the input, the encoder
initialised as the decoder's transpose, unit-norm decoder rows (re-normalised after every step, with the
gradient's component along each row removed), MSE loss, and the AuxK loss (the reconstruction error
predicted from the ``k_aux`` largest dead latents, weighted 1/32) so fewer latents die. Activations are read
once into memory; the excerpts' first tokens are left out (their residual stream is an attention sink,
orders of magnitude larger than the rest, and would dominate the loss).

Reported (`fit_figures`, on held-out tokens): the fraction of variance explained (FVE, 1 - residual / total
variance), also without the 5 largest-variance dimensions, the largest dimension's share of the variance,
and the fraction of latents that never fire (dead).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nbutils.collect.corpus import load_texts, make_excerpts
from nbutils.core.errors import UserError
from nbutils.core.io import atomic_write_json
from nbutils.core.progress import progress_bar
from nbutils.subject.latents import hook_site
from nbutils.subject.loading import load_subject_model
from nbutils.subject.sites import NeuronCapture, check_layers


@dataclass
class SAETraining:
    """What `train_sae` trains and on what."""

    layer: int = 15
    hook: str = "hook_resid_post"
    """A TransformerLens hook of the block (`nbutils.subject.latents.hook_site`)."""
    expansion: int = 8
    """Latents per dimension of the hooked activation."""
    k: int = 32
    """Latents active per token (TopK)."""
    n_excerpts: int = 3000
    excerpt_len: int = 64
    epochs: int = 4
    batch_tokens: int = 4096
    lr: float = 5e-4
    held_out: float = 0.1
    """Fraction of tokens kept back for FVE and the dead-latent count."""
    aux_k: int = 256
    dead_after_tokens: int = 200_000
    """A latent that has not fired for this many training tokens counts as dead for the AuxK loss."""
    seed: int = 0
    model: str = "embedded"
    corpus: str = "embedded"


def read_activations(cfg: SAETraining, progress: bool = True) -> tuple[torch.Tensor, str, int]:
    """The hook's activations over the corpus excerpts, ``[tokens, d]`` float32 (first tokens left out); also
    the hook's full name and the model's width."""
    subject = load_subject_model(cfg.model)
    check_layers(subject.model, [cfg.layer])
    hook = f"blocks.{cfg.layer}.{cfg.hook}"
    site, layer = hook_site(subject.model, hook)
    texts = load_texts(cfg.corpus, "text")
    excerpts = make_excerpts(subject.tokenizer, texts, cfg.excerpt_len, cfg.n_excerpts, cfg.seed, corpus=cfg.corpus)
    rows = []
    bar = progress_bar(total=len(excerpts), desc="read activations", unit="excerpt", disable=not progress)
    with NeuronCapture(subject.model, site, [layer]) as capture:
        for start in range(0, len(excerpts), 32):
            ids = torch.from_numpy(excerpts.tokens[start : start + 32].astype(np.int64))
            acts = capture.run(ids)[layer].float()
            rows.append(acts[:, 1:].reshape(-1, acts.shape[-1]).clone())
            bar.update(len(ids))
    bar.close()
    return torch.cat(rows), hook, int(rows[0].shape[-1])


class TopKSAE(torch.nn.Module):
    """The trained module; `save_saelens` writes it in SAELens's TopK layout."""

    def __init__(self, d_in: int, d_sae: int, k: int, mean: torch.Tensor, generator: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(d_sae, d_in, generator=generator)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w)
        self.W_enc = torch.nn.Parameter(w.T.clone().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(mean.clone())
        self.k = k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre(x)
        values, indices = torch.topk(pre, self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def drop_parallel_gradient(self) -> None:
        """Remove the part of each decoder row's gradient along the row (the row's norm stays 1)."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= along * self.W_dec


def fit_figures(sae: TopKSAE, x: torch.Tensor, batch: int = 8192, top_dims: int = 5) -> dict[str, float]:
    """How well the SAE reconstructs ``x``: the fraction of variance explained (FVE), the same without the
    ``top_dims`` dimensions of largest variance (a residual stream often has a few "massive" dimensions that
    hold most of the variance and are easy to reconstruct, which flatters the FVE), the largest dimension's
    share of the variance, and the fraction of latents that never fire on ``x`` (dead)."""
    residual = torch.zeros(x.shape[1], dtype=torch.float64)
    fired = torch.zeros(sae.W_dec.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for start in range(0, len(x), batch):
            xb = x[start : start + batch]
            z = sae.encode(xb)
            residual += ((sae.decode(z) - xb) ** 2).sum(dim=0).double()
            fired |= (z > 0).any(dim=0)
    total = ((x - x.mean(dim=0)) ** 2).sum(dim=0).double()
    rest = total.argsort(descending=True)[top_dims:]
    return {
        "fraction_variance_explained": float(1 - residual.sum() / total.sum()),
        f"fraction_variance_explained_without_top_{top_dims}_dims": float(1 - residual[rest].sum() / total[rest].sum()),
        "largest_dimension_variance_share": float(total.max() / total.sum()),
        "dead_fraction": float((~fired).float().mean()),
    }


def train_sae(out_dir: str | Path, cfg: SAETraining | None = None, progress: bool = True) -> dict[str, Any]:
    """Train a TopK SAE (module docstring) and write it to ``out_dir`` in SAELens format (``cfg.json``,
    ``sae_weights.safetensors``) with ``training.json`` (settings, FVE, dead fraction, time). Returns that."""
    cfg = cfg or SAETraining()
    out = Path(out_dir)
    if (out / "sae_weights.safetensors").exists():
        raise UserError(f"{out} already holds an SAE.", "Choose another folder, or delete that one to train again.")
    if cfg.k < 1 or cfg.expansion < 1:
        raise UserError(f"k={cfg.k} and expansion={cfg.expansion} must be positive.", "Use e.g. --k 32 --expansion 8.")
    started = time.monotonic()
    torch.manual_seed(cfg.seed)
    x, hook, d_in = read_activations(cfg, progress)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(x), generator=g)
    n_test = max(1, int(len(x) * cfg.held_out))
    test, train = x[order[:n_test]], x[order[n_test:]]
    d_sae = d_in * cfg.expansion
    if cfg.k >= d_sae:
        raise UserError(f"k={cfg.k} is not below the {d_sae} latents.", "Use a smaller k or a larger expansion.")
    sae = TopKSAE(d_in, d_sae, cfg.k, train.mean(dim=0), g)
    steps = _fit(sae, train, cfg, g, progress)
    report = {
        "settings": asdict(cfg), "hook_name": hook, "d_in": d_in, "d_sae": d_sae,
        "train_tokens": len(train), "held_out_tokens": len(test), "steps": steps, **fit_figures(sae, test),
        "seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip
    save_saelens(sae, out, hook, cfg, report)
    return report


def _fit(sae: TopKSAE, train: torch.Tensor, cfg: SAETraining, g: torch.Generator, progress: bool) -> int:
    """The training loop (module docstring); returns the number of steps."""
    d_sae = sae.W_dec.shape[0]
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=6.25e-10)
    scale = float(((train - train.mean(dim=0)) ** 2).sum(dim=1).mean())  # MSE relative to the data's variance
    since_fired = torch.zeros(d_sae)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_tokens)
    bar = progress_bar(total=steps, desc="train SAE", unit="step", disable=not progress)
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(train), generator=g)
        for start in range(0, len(train), cfg.batch_tokens):
            xb = train[perm[start : start + cfg.batch_tokens]]
            pre = sae.pre(xb)
            values, indices = torch.topk(pre, cfg.k, dim=-1)
            # the k active rows of the decoder only (as dense z @ W_dec, without the zeros)
            recon = (
                torch.nn.functional.embedding_bag(indices, sae.W_dec, per_sample_weights=torch.relu(values), mode="sum")
                + sae.b_dec
            )
            loss = ((recon - xb) ** 2).sum(dim=1).mean() / scale
            fired = torch.zeros(d_sae, dtype=torch.bool)
            fired[indices[values > 0].unique()] = True
            since_fired = torch.where(fired, 0.0, since_fired + len(xb))
            dead = since_fired >= cfg.dead_after_tokens
            if dead.any():  # AuxK: the dead latents' best guess at what the live ones missed
                k_aux = min(cfg.aux_k, int(dead.sum()))
                dead_pre = torch.where(dead, pre, torch.full_like(pre, -math.inf))
                v, i = torch.topk(dead_pre, k_aux, dim=-1)
                guess = torch.nn.functional.embedding_bag(i, sae.W_dec, per_sample_weights=torch.relu(v), mode="sum")
                error = (xb - recon).detach()
                aux = ((guess - error) ** 2).sum(dim=1).mean() / scale
                loss = loss + aux / 32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.drop_parallel_gradient()
            opt.step()
            sae.normalise_decoder()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    return steps


def save_saelens(sae: TopKSAE, out: Path, hook: str, cfg: SAETraining, report: dict[str, Any]) -> None:
    """The SAE in SAELens's on-disk layout: ``sae_weights.safetensors`` (W_enc [d_in, d_sae], b_enc, W_dec
    [d_sae, d_in], b_dec) and ``cfg.json`` (architecture "topk", k, and the hook under ``metadata``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in sae.named_parameters()}
    d_in, d_sae = sae.W_enc.shape
    config = {
        "architecture": "topk", "d_in": int(d_in), "d_sae": int(d_sae), "k": sae.k, "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "model_name": cfg.model, "hook_name": hook, "hook_head_index": None, "context_size": cfg.excerpt_len,
            "dataset_path": cfg.corpus, "prepend_bos": False, "sae_lens_training_version": None,
        },
    }  # fmt: skip
    save_file(tensors, str(out / "sae_weights.safetensors"))
    atomic_write_json(out / "training.json", report)
    (out / "cfg.json").write_text(json.dumps(config, indent=1) + "\n")  # written last: the folder is complete
