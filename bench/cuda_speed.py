"""GPU timings, one invocation, each against a baseline measured in the same run (medians of repeats).

1. Decode-shaped INT4 matmuls: openk2.quant.Int4Linear (PyTorch's tinygemm `_weight_int4pack_mm`)
   against bf16 F.linear (baseline), at Kimi K2's routed-expert shapes and a square one, 1 and 16
   rows. Each timing replays a CUDA graph of 50 calls (no launch overhead), median of repeats; the
   INT4 bound is its weight + scale bytes over the copy bandwidth measured here.
2. One K2 MoE layer's routed experts at decode (1 and 4 tokens, top-8, K2's 7168/2048 shapes, 64
   experts resident instead of 384 to keep the bench quick: a token touches 8 either way): Int4Experts
   grouped (tokens sorted per expert on the host, one tinygemm call each) and fused (openk2.int4_triton,
   eager and in a CUDA graph) against bf16 experts run as one F.linear per chosen expert in a CUDA
   graph (baseline: the bf16 matmuls with no launch or routing overhead).
3. Training throughput of openk2.train on the GPU (a 12-layer K2-shaped MoE, synthetic tokens):
   muonclip in bf16 autocast (what `openk2 train --device cuda` does), against AdamW in bf16 and
   muonclip in fp32 (autocast off) as baselines; tokens/s median over steps after the first two.
4. The engine decoding on the GPU (openk2.engine, eager, no CUDA graphs): an 8-layer K2-shaped MoE
   (64 experts of width 1024, top-8, 2.9B parameters), bf16 (baseline) vs the same model with INT4
   routed experts (as K2 Thinking ships), 1 request and 16 concurrent ones; greedy, tokens/s.
5. Tiles of the fused kernel (--only tiles): BLOCK_K x BLOCK_N x warps of openk2.int4_triton at one
   token, top-8 of 32 K2-shaped experts, each in a CUDA graph of 20 calls (how its defaults were chosen).

    python bench/cuda_speed.py [--repeats 7] [--only int4,experts,train,engine,tiles]
    python bench/cuda_speed.py --smoke   # tiny sizes, any device: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from openk2 import quant  # noqa: E402
from openk2 import train as T  # noqa: E402
from openk2.config import preset  # noqa: E402
from openk2.data import markov_tokens, write_tokens  # noqa: E402

med = statistics.median


def device_time(fn, repeats: int, graph: bool, inner: int = 50) -> float:
    """Median seconds per call of fn. graph: capture `inner` calls in a CUDA graph and replay it."""
    if DEV.type != "cuda":
        import time
        fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            out.append((time.perf_counter() - t0) / inner)
        return med(out)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(inner):
                fn()
        run = g.replay
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        if graph:
            run()
        else:
            for _ in range(inner):
                run()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / inner)
    return med(out)


def bandwidth(repeats: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted) of 2 GiB (64 MiB in --smoke)."""
    n = (64 << 20) if SMOKE else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t = device_time(lambda: dst.copy_(src), repeats, graph=False, inner=5)
    return 2 * n / t


def bench_int4(repeats: int, bw: float):
    shapes = [(256, 512)] if SMOKE else [(4096, 4096), (2048, 7168), (7168, 2048), (4096, 7168)]
    print(f"1. decode matmuls, bf16 F.linear (baseline) vs INT4 Int4Linear kernel; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"   {'out x in':>12} {'rows':>4} {'bf16 us':>8} {'int4 us':>8} {'speed-up':>8} {'int4 bound us':>13} {'of bound':>8}")
    if DEV.type == "cuda" and not quant.kernel_verified(DEV):
        print("   the CUDA int4 kernel disagrees with dequantize: the INT4 column times the dequantize path")
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=DEV) * 0.02
        wb = w.to(torch.bfloat16)
        m = quant.Int4Linear.from_float(w)
        m.impl = "auto"  # the kernel where verified (no grad here)
        for rows in (1, 16):
            x = torch.randn(rows, in_f, device=DEV, dtype=torch.bfloat16)
            m(x)  # builds the kernel layout outside the graph
            t_bf = device_time(lambda: F.linear(x, wb), repeats, graph=True)
            t_q = device_time(lambda: m(x), repeats, graph=True)
            q_bytes = out_f * in_f // 2 + out_f * (in_f // quant.int4.GROUP_SIZE) * 2 * 2  # nibbles + scale/zero bf16
            bound = q_bytes / bw
            print(f"   {out_f:>5} x {in_f:<5} {rows:>4} {t_bf * 1e6:8.1f} {t_q * 1e6:8.1f} {t_bf / t_q:7.2f}x "
                  f"{bound * 1e6:13.1f} {bound / t_q:8.0%}")


def bench_experts(repeats: int):
    E, dim, inter, k = (8, 256, 128, 2) if SMOKE else (64, 7168, 2048, 8)
    g = torch.Generator(device=DEV).manual_seed(0)
    gate, up = (torch.randn(E, inter, dim, device=DEV, generator=g) * 0.02 for _ in range(2))
    down = torch.randn(E, dim, inter, device=DEV, generator=g) * 0.02
    q = quant.Int4Experts.from_float(gate, up, down)
    wg, wu, wd = (t.to(torch.bfloat16) for t in (gate, up, down))
    del gate, up, down
    print(f"2. one MoE layer's routed experts at decode: top-{k} of {E} resident experts, dim {dim}, inter {inter}; "
          f"bf16 one F.linear per chosen expert in a CUDA graph (baseline)")
    for tokens in (1, 4):
        x = torch.randn(tokens, dim, device=DEV, dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(E, device=DEV, generator=g)[:k] for _ in range(tokens)])
        wts = torch.rand(tokens, k, device=DEV, generator=g, dtype=torch.bfloat16)
        chosen = idx.tolist()

        def bf16_loop():
            ys = []
            for t in range(tokens):
                y = torch.zeros_like(x[t:t + 1])
                for j, e in enumerate(chosen[t]):
                    h = F.silu(F.linear(x[t:t + 1], wg[e])) * F.linear(x[t:t + 1], wu[e])
                    y += wts[t, j] * F.linear(h, wd[e])
                ys.append(y)
            return torch.cat(ys)

        def int4(impl):
            q.impl = impl
            return q(x, idx, wts)

        ref = bf16_loop().float()
        errs = {impl: float((int4(impl).float() - ref).abs().max() / ref.abs().max()) for impl in ("kernel", "auto")}
        t_bf = device_time(bf16_loop, repeats, graph=True, inner=20)
        t_grouped = device_time(lambda: int4("kernel"), repeats, graph=False, inner=20)  # host syncs: no graph
        t_fused = device_time(lambda: int4("auto"), repeats, graph=False, inner=20)
        t_fused_g = device_time(lambda: int4("auto"), repeats, graph=True, inner=20) if DEV.type == "cuda" else t_fused
        active = 3 * k * tokens * dim * inter  # weights read (slots re-read shared experts)
        bound = (active // 2 + active // quant.int4.GROUP_SIZE * 2) / BW
        print(f"   {tokens} token(s): bf16 {t_bf * 1e6:6.0f} us | INT4 grouped tinygemm {t_grouped * 1e6:6.0f} us "
              f"({t_bf / t_grouped:.2f}x) | INT4 fused Triton {t_fused * 1e6:6.0f} us ({t_bf / t_fused:.2f}x), "
              f"in a CUDA graph {t_fused_g * 1e6:6.0f} us ({t_bf / t_fused_g:.2f}x, {bound / t_fused_g:.0%} of its "
              f"bound) | vs bf16 rel. diff grouped {errs['kernel']:.3f} fused {errs['auto']:.3f} (INT4 rounding)")


def bench_train(tmp: Path):
    base = preset("k2-nano")
    cfg = base if SMOKE else base.replace(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
        num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32,
        num_experts_per_tok=4, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        max_position_embeddings=4096)
    cfg_file = tmp / "config.json"
    cfg.save(cfg_file)
    seq, batch, steps = (64, 4, 4) if SMOKE else (1024, 16, 8)
    ids, _ = markov_tokens(batch * (seq + 1) * (steps + 2), cfg.vocab_size, seed=0, order=1)
    data = write_tokens(tmp / "tokens.bin", ids)
    params = cfg.param_counts()
    print(f"3. training, {params['total_params'] / 1e6:.0f}M params ({params.get('active_params', 0) / 1e6:.0f}M active), "
          f"batch {batch}x{seq} on {DEV.type}")
    res = {}
    real_autocast = torch.autocast
    for name, opt, fp32 in (("adamw bf16 (baseline)", "adamw", False), ("muonclip fp32 (baseline)", "muonclip", True),
                            ("muonclip bf16", "muonclip", False)):
        out = tmp / f"{opt}-{'fp32' if fp32 else 'bf16'}"
        # openk2.train always autocasts to bf16 on CUDA; the fp32 baseline turns that off here only
        T.torch.autocast = (lambda *a, **k: contextlib.nullcontext()) if fp32 else real_autocast
        try:
            T.train(T.TrainOptions(out=str(out), data=str(data), config=str(cfg_file), seq_len=seq, batch_size=batch,
                                   steps=steps, save_every=10**6, optimizer=opt, quiet=True, device=DEV.type))
        finally:
            T.torch.autocast = real_autocast
        rows = [json.loads(line) for line in open(out / "metrics.jsonl")][2:]
        res[name] = {k: med([r[k] for r in rows]) for k in ("tokens_per_s", "time_fwd_bwd_s", "time_opt_s", "loss")}
    mc = res["muonclip bf16"]
    for name, r in res.items():
        print(f"   {name:26s} {r['tokens_per_s']:9.0f} tok/s  fwd+bwd {r['time_fwd_bwd_s'] * 1e3:7.1f} ms  "
              f"optimizer {r['time_opt_s'] * 1e3:6.1f} ms  loss {r['loss']:.3f}"
              + ("" if r is mc else f"   muonclip bf16 / this: {mc['tokens_per_s'] / r['tokens_per_s']:.2f}x"))


def bench_engine(repeats: int):
    import threading
    import time

    from openk2.checkpoint import load_model
    from openk2.engine import Engine, SamplingParams
    base = preset("k2-nano")
    cfg = base if SMOKE else base.replace(
        vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        num_experts_per_tok=8, kv_lora_rank=512, q_lora_rank=768, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=4096, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(DEV):
        from openk2.model import Transformer
        model = Transformer(cfg)
    model = model.to(torch.bfloat16 if DEV.type == "cuda" else torch.float32).eval()
    n_new, prompt_len, k = (8, 16, 4) if SMOKE else (64, 128, 16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(k)]
    sp = SamplingParams(temperature=0, max_tokens=n_new, stop_ids=())
    p = cfg.param_counts()
    print(f"4. engine decode, {p['total_params'] / 1e9:.2f}B params ({p['active_params'] / 1e9:.2f}B active), "
          f"prompt {prompt_len}, {n_new} new tokens, greedy, eager")
    rates = {}
    for name in ("bf16 (baseline)", "bf16 + INT4 experts"):
        if "INT4" in name:
            quant.quantize_model(model)  # routed experts -> Int4Experts (decode: fused kernel on CUDA)
        eng = Engine(model, prefix_cache=False, max_batch=k, cache_tokens=k * (prompt_len + n_new) + 256)

        def one():
            eng.submit(prompts[0], sp).result()

        def many():
            out = []
            ts = [threading.Thread(target=lambda q=q: out.append(eng.submit(q, sp).result())) for q in prompts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        for fn in (one, many):
            fn()  # warm-up (kernel builds, Triton compiles)
        r1, rk = [], []
        for _ in range(max(3, repeats // 2)):
            for fn, acc, n in ((one, r1, n_new), (many, rk, k * n_new)):
                if DEV.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                acc.append(n / (time.perf_counter() - t0))
        rates[name] = med(r1), med(rk)
        eng.close()
    b1, bk = rates["bf16 (baseline)"]
    for name, (r1, rk) in rates.items():
        print(f"   {name:22s} 1 request {r1:7.1f} tok/s ({r1 / b1:.2f}x)   {k} concurrent {rk:8.1f} tok/s ({rk / bk:.2f}x)")


def bench_tiles(repeats: int):
    import itertools

    from openk2 import int4_triton as T
    E, dim, inter, k = 32, 7168, 2048, 8
    g = torch.Generator(device=DEV).manual_seed(0)
    q = quant.Int4Experts.from_float(*(torch.randn(E, a, b, device=DEV, generator=g) * 0.02
                                       for a, b in ((inter, dim), (inter, dim), (dim, inter))))
    x = torch.randn(1, dim, device=DEV, dtype=torch.bfloat16)
    idx = torch.randperm(E, device=DEV, generator=g)[:k].unsqueeze(0)
    w = torch.rand(1, k, device=DEV, dtype=torch.bfloat16)
    default = T.BLOCK_N, T.NUM_WARPS, T.MAX_BLOCK_K
    print(f"5. fused kernel tiles, 1 token, top-{k} of {E}, dim {dim}, inter {inter} (default BLOCK_N, warps, "
          f"BLOCK_K = {default})")
    try:
        for bk, bn, nw in itertools.product((128, 256, 512), (4, 8, 16, 32), (1, 2, 4)):
            T.BLOCK_N, T.NUM_WARPS, T.MAX_BLOCK_K = bn, nw, bk
            t = device_time(lambda: T.moe_decode(x, idx, w, q.pairs(), q.group_size), repeats, graph=True, inner=20)
            print(f"   BLOCK_K {bk:3d} BLOCK_N {bn:2d} warps {nw}: {t * 1e6:7.1f} us")
    finally:
        T.BLOCK_N, T.NUM_WARPS, T.MAX_BLOCK_K = default


def main():
    global DEV, SMOKE, BW
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", default="int4,experts,train,engine")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script on any machine)")
    a = ap.parse_args()
    SMOKE = a.smoke
    DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if DEV.type == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    elif not SMOKE:
        sys.exit("no CUDA device (use --smoke to check the script on a CPU)")
    parts = set(a.only.split(","))
    BW = bandwidth(a.repeats)
    if "int4" in parts:
        bench_int4(a.repeats, BW)
    if "experts" in parts:
        bench_experts(a.repeats)
    if "train" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            bench_train(Path(tmp))
    if "engine" in parts:
        bench_engine(a.repeats)
    if "tiles" in parts:
        bench_tiles(a.repeats)


DEV = torch.device("cpu")
SMOKE = False
BW = 1.0

if __name__ == "__main__":
    main()
