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
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, _median_spread, early_exit_ideal, print_table  # noqa: E402


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_model(name: str, config: Any, device: torch.device, dtype: torch.dtype, n_batches: int, repeats: int):
    from transformers import AutoModelForCausalLM

    from nbutils.collect import CollectConfig, Collector, choose_neurons
    from nbutils.hooks import NeuronCapture, neurons_per_layer, num_layers, resolve_site

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    site = resolve_site(model)
    width, n_layers = neurons_per_layer(model, site), num_layers(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (32, 64), generator=g).to(device) for _ in range(n_batches)]
    n_excerpts, tokens = 32 * n_batches, 32 * 64 * n_batches

    def bare() -> None:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids, use_cache=False)

    def collect(layers: list[int]):
        def run() -> None:
            cfg = CollectConfig(layers=layers, quantile_warmup=n_excerpts // 2)
            col = Collector(n_excerpts, 64, choose_neurons(width, layers, None, 0), cfg, site.signed, device=device)
            with NeuronCapture(model, site, layers) as cap:
                for i, ids in enumerate(batches):
                    col.update(i * 32, cap.run(ids))

        return run

    half = n_layers // 2
    variants = {
        "bare forward": bare,
        "collect all layers": collect(list(range(n_layers))),
        f"collect layers 0..{half - 1}": collect(list(range(half))),
    }
    bare()  # warm-up (kernels, allocator)
    collect(list(range(n_layers)))()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(_timed(fn, device))
    base = statistics.median(times["bare forward"])
    rows = [
        {
            "model": name,
            "variant": k,
            "tokens_per_s": tokens / statistics.median(ts),
            "speed_vs_bare": base / statistics.median(ts),
            "seconds": _median_spread(ts),
        }
        for k, ts in times.items()
    ]
    rows[-1]["ideal"] = early_exit_ideal(model, half)
    rows.append(bench_simulation(name, model, device, repeats))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return rows, peak


def bench_simulation(name: str, model: Any, device: torch.device, repeats: int) -> dict[str, Any]:
    from nbutils.backends import LocalBackend
    from nbutils.models import SubjectModel, load_subject_model
    from nbutils.prompts import simulation_prefix

    tokenizer = load_subject_model("embedded").tokenizer  # the embedded model's tokenizer (same vocabulary)
    be = LocalBackend(SubjectModel(model, tokenizer, name), batch_size=10)
    g = torch.Generator().manual_seed(1)
    tokens = [[tokenizer.decode([int(t)]) for t in torch.randint(100, 40000, (64,), generator=g)] for _ in range(10)]
    prefix = simulation_prefix("words about numbers and arithmetic")
    p_len = be.count_tokens(prefix)
    e_len = sum(len(be._excerpt_ids(t)[0]) + len(t) * len(be.labels.branch_tokens) for t in tokens)
    ideal = (len(tokens) * p_len + e_len) / (p_len + e_len)
    reused = be.simulate(prefix, tokens, reuse_prefix=True)
    plain = be.simulate(prefix, tokens, reuse_prefix=False)
    diff = max(float(abs(a - b).max()) for a, b in zip(reused, plain))
    t_plain = [_timed(lambda: be.simulate(prefix, tokens, reuse_prefix=False), device) for _ in range(repeats)]
    t_reuse = [_timed(lambda: be.simulate(prefix, tokens, reuse_prefix=True), device) for _ in range(repeats)]
    speed = statistics.median(t_plain) / statistics.median(t_reuse)
    return {
        "model": name,
        "variant": "simulate 10 excerpts: prefix reuse + batching vs plain",
        "tokens_per_s": (p_len + e_len) / statistics.median(t_reuse),
        "speed_vs_bare": speed,
        "seconds": _median_spread(t_reuse),
        "ideal": ideal,
        "max_abs_difference": diff,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script runs")
    p.add_argument("--batches", type=int, default=32, help="batches of 32 x 64 tokens per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON results")
    args = p.parse_args()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cpu" and not args.smoke:
        sys.exit("No CUDA GPU found; run with --smoke to check the script on the CPU.")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    start = time.perf_counter()
    rows, peaks = [], {}
    for name, config in _configs(args.smoke).items():
        model_rows, peak = bench_model(name, config, device, dtype, args.batches, args.repeats)
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
