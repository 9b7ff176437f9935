"""Run with a Python that has sae-lens and eai-sparsify installed (tests/test_latents.py does, where one is
found): saves SAEs with those libraries' own code and their encode output on fixed inputs, for the parity
test. Usage: python make_saes.py OUT_DIR [SAELENS_FOLDER]. Writes OUT_DIR/<name>/ (the SAE folder),
OUT_DIR/<name>.x.npy (inputs) and OUT_DIR/<name>.z.npy (the library's encode output), and OUT_DIR/versions.json.
With SAELENS_FOLDER (an SAE nbutils wrote), SAELens loads it and encodes OUT_DIR/loaded.x.npy into loaded.z.npy."""

import json
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
D_IN, D_SAE, D_OUT = 24, 64, 24


def randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "b_" in name or "bias" in name else 0.3))


def keep(name: str, x: torch.Tensor, z: torch.Tensor) -> None:
    np.save(out / f"{name}.x.npy", x.detach().numpy().astype(np.float32))
    np.save(out / f"{name}.z.npy", z.detach().numpy().astype(np.float32))


# --- SAELens ----------------------------------------------------------------------------------------------
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig  # noqa: E402
from sae_lens.saes.transcoder import JumpReLUTranscoder, JumpReLUTranscoderConfig, Transcoder, TranscoderConfig  # noqa: E402

hook = "blocks.1.hook_resid_post"
cases = {
    "saelens_standard": (StandardSAE, StandardSAEConfig, {}),
    "saelens_standard_no_bdec": (StandardSAE, StandardSAEConfig, {"apply_b_dec_to_input": False}),
    "saelens_jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
    "saelens_topk": (TopKSAE, TopKSAEConfig, {"k": 5}),
    "saelens_topk_rescaled": (TopKSAE, TopKSAEConfig, {"k": 5, "rescale_acts_by_decoder_norm": True}),
    "saelens_transcoder": (Transcoder, TranscoderConfig, {"d_out": D_OUT, "apply_b_dec_to_input": False}),
    "saelens_jumprelu_transcoder": (
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        {"d_out": D_OUT, "apply_b_dec_to_input": False},
    ),
}
for name, (cls, cfg_cls, extra) in cases.items():
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra)
    cfg.metadata.hook_name = "blocks.1.ln2.hook_normalized" if "transcoder" in name else hook
    sae = cls(cfg)
    randomise(sae)
    if hasattr(sae, "threshold"):
        with torch.no_grad():
            sae.threshold.copy_(torch.rand_like(sae.threshold))
    sae.save_model(out / name)
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        keep(name, x, sae.encode(x))

# --- sparsify ---------------------------------------------------------------------------------------------
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

for name, cfg in {
    "sparsify_topk": SparseCoderConfig(num_latents=D_SAE, k=6),
    "sparsify_groupmax": SparseCoderConfig(num_latents=D_SAE, k=8, activation="groupmax"),
    "sparsify_transcoder": SparseCoderConfig(num_latents=D_SAE, k=6, transcode=True),
}.items():
    sae = SparseCoder(D_IN, cfg)
    randomise(sae)
    hookpoint = "layers.1.mlp" if cfg.transcode else "layers.1"
    sae.save_to_disk(out / name / hookpoint)
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        enc = sae.encode(x)
        z = torch.zeros(50, D_SAE).scatter(-1, enc.top_indices, enc.top_acts)
    keep(name, x, z)

if len(sys.argv) > 2:
    from sae_lens import SAE

    loaded = SAE.load_from_disk(sys.argv[2])
    x = torch.randn(50, loaded.cfg.d_in) * 3
    with torch.no_grad():
        keep("loaded", x, loaded.encode(x))

(out / "versions.json").write_text(
    json.dumps({"sae-lens": version("sae-lens"), "eai-sparsify": version("eai-sparsify")})
)
