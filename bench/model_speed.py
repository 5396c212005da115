"""Training forward+backward tokens/s: openk2 vs transformers' DeepseekV3 on the same weights.

One invocation measures, on the same small MoE config (K2 architecture, k2-nano-like sizes) and the
same weights:
  - transformers, default experts implementation (grouped_mm) and attention (sdpa);
  - transformers, experts_implementation="eager" (a loop over experts);
  - openk2 as it trains (SDPA attention plus the no-grad per-head max-logit pass QK-Clip needs);
  - openk2 with max-logit recording off (what the transformers runs compute).
Each is timed over interleaved repeats; medians are printed with ratios against the transformers
default. Run: `.venv/bin/python bench/model_speed.py [--repeats 7] [--seq 512] [--batch 4]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", action="store_true", help="print where openk2's time goes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from openk2.checkpoint import load_model

    cfg = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
               num_hidden_layers=6, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=2,
               n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
               kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
               num_mtp_layers=0, max_position_embeddings=4096,
               rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    torch.manual_seed(0)
    hf_cfg = transformers.DeepseekV3Config(**cfg)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d).train()
        ours_sdpa = load_model(d)  # same weights; the max-logit pass is switched off below
        hf_eager = transformers.AutoModelForCausalLM.from_pretrained(d, experts_implementation="eager").train()
    ours_sdpa.train()
    for m in ours_sdpa.modules():
        if hasattr(m, "record_max_logit"):
            m.record_max_logit = False

    B, T = args.batch, args.seq
    ids = torch.randint(0, cfg["vocab_size"], (B, T))
    labels = torch.randint(0, cfg["vocab_size"], (B, T))

    def step_hf(model):
        def run():
            logits = model(ids).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        return run

    def step_ours(model):
        def run():
            logits = model(ids)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        return run

    runs = {
        "transformers (default: grouped_mm experts, sdpa)": step_hf(hf),
        "transformers (experts_implementation=eager)": step_hf(hf_eager),
        "openk2 (training path: sdpa + max-logit pass for QK-Clip)": step_ours(ours),
        "openk2 (max-logit off: sdpa)": step_ours(ours_sdpa),
    }
    for fn in runs.values():  # warm up
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():  # interleaved, so machine noise hits all alike
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[next(iter(runs))])
    print(f"config: hidden 256, 6 layers (1 dense), 16 experts top-2 + 1 shared, batch {B} x seq {T}, "
          f"fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {args.repeats} repeats (median)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<62} {B * T / med:8.0f} tok/s  {med * 1e3:7.1f} ms  x{base / med:.2f}")
    if args.profile:
        from torch.profiler import profile, ProfilerActivity
        fn = runs["openk2 (training path: sdpa + max-logit pass for QK-Clip)"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
