"""Training speed on the k2-nano preset, and where a step's time goes.

    OMP_NUM_THREADS=2 python bench/train_speed.py [--seq-len 512 --batch 16 --micro 4 --steps 6 --repeats 3]
        [--packed-len 1152 --docs 2] [--checkpoint DIR [--data TRAIN.jsonl]] [--only loop|ns|...|denormal]

Prints (medians over repeats, all measured in this run):
1. tokens/s of full training steps (openk2.train's loop, synthetic .bin) with --optimizer muonclip,
   against the baseline --optimizer adamw, and the split of a MuonClip step into forward+backward,
   optimizer (Muon's Newton-Schulz + AdamW) and QK-Clip + router-bias update;
2. Newton-Schulz over all of k2-nano's Muon matrices: one batched call per distinct shape (what
   openk2.muon does) against the baseline of one call per matrix, in fp32 and in bf16;
3. forward+backward with the per-head max-logit recording (what MuonClip needs; openk2.model adds a
   no-grad score pass beside SDPA) against the baseline of SDPA without recording;
4. forward+backward of rows of packed conversations (the speedrun's SFT shape: --packed-len tokens
   per row, --docs conversations per row at random boundaries) with attention per conversation
   (`doc_ids`, what openk2.train passes) against the baseline of the dense block-diagonal mask;
5. fwd+bwd of --micro causal rows of --packed-len random tokens on --checkpoint's weights (a trained
   model: sharp attention underflows into denormal floats) with denormals flushed to zero
   (openk2.train.flush_denormals, what `openk2 train` and `openk2 rl` run under) against the baseline
   of torch's default (kept), alternating the two within each repeat, each in a fresh process that sets
   its mode before anything runs in parallel (set later, it misses the OpenMP workers). On a fresh model there are few
   denormals and little to gain. With --data (conversations, e.g. a speedrun's data/train.jsonl) also
   openk2.train's own loop for --steps SFT steps from --checkpoint (its tokenizer; 2 packed rows x
   --packed-len, the speedrun's SFT shape), flushed against kept (flush_denormals swapped for a
   no-op), per-step fwd+bwd medians after the first step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from openk2 import muon as M  # noqa: E402
from openk2 import train as T  # noqa: E402
from openk2.checkpoint import load_model  # noqa: E402
from openk2.config import preset  # noqa: E402
from openk2.data import markov_tokens, write_tokens  # noqa: E402
from openk2.model import document_mask  # noqa: E402

VOCAB = preset("k2-nano").vocab_size


def med(xs):
    return statistics.median(xs)


def timed(f, repeats):
    f()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return med(out)


def bench_loop(a, tmp: Path):
    ids, _ = markov_tokens(max(200_000, a.batch * (a.seq_len + 1) * (a.steps + 2)), VOCAB, seed=0, order=1)
    data = write_tokens(tmp / "tokens.bin", ids)
    res = {}
    for opt in ("adamw", "muonclip"):
        rows = []
        for r in range(a.repeats):
            out = tmp / f"{opt}-{r}"
            T.train(T.TrainOptions(out=str(out), data=str(data), preset="k2-nano", seq_len=a.seq_len,
                                   batch_size=a.batch, micro_batch=a.micro, steps=a.steps, save_every=10**6,
                                   optimizer=opt, quiet=True))
            rows += [json.loads(line) for line in open(out / "metrics.jsonl")][1:]  # skip the first (warm-up)
        res[opt] = {k: med([r[k] for r in rows]) for k in
                    ("tokens_per_s", "time_fwd_bwd_s", "time_opt_s", "time_clip_bias_s")}
    base, mc = res["adamw"], res["muonclip"]
    step = mc["time_fwd_bwd_s"] + mc["time_opt_s"] + mc["time_clip_bias_s"]
    print(f"1. training step, k2-nano, batch {a.batch}x{a.seq_len} ({a.batch * a.seq_len} tokens), "
          f"micro-batch {a.micro}, {torch.get_num_threads()} threads")
    print(f"   adamw (baseline): {base['tokens_per_s']:.0f} tok/s   muonclip: {mc['tokens_per_s']:.0f} tok/s   "
          f"ratio muonclip/adamw {mc['tokens_per_s'] / base['tokens_per_s']:.3f}")
    print(f"   muonclip step: fwd+bwd {mc['time_fwd_bwd_s']:.3f}s ({mc['time_fwd_bwd_s'] / step:.0%}), "
          f"optimizer {mc['time_opt_s']:.3f}s ({mc['time_opt_s'] / step:.0%}), "
          f"qk-clip+router {mc['time_clip_bias_s'] * 1e3:.1f}ms ({mc['time_clip_bias_s'] / step:.1%}); "
          f"adamw optimizer {base['time_opt_s']:.3f}s")


def bench_ns(a):
    torch.manual_seed(0)
    model = load_model("k2-nano")
    muon, _, _ = M.split_params(model)
    mats = []
    for _, p in muon:
        g = torch.randn_like(p)
        mats += list(g) if g.dim() == 3 else [g]
    by_shape = {}
    for g in mats:
        key = (min(g.shape), max(g.shape))
        by_shape.setdefault(key, []).append(g if g.shape[0] <= g.shape[1] else g.T)
    stacks = [torch.stack(v) for v in by_shape.values()]
    print(f"2. Newton-Schulz over k2-nano's {len(mats)} Muon matrices ({len(stacks)} distinct shapes)")
    for dtype in (torch.float32, torch.bfloat16):
        reps = a.repeats if dtype == torch.float32 else 1
        loop = timed(lambda: [M.newton_schulz(g, dtype=dtype) for g in mats], reps)
        batched = timed(lambda: [M.newton_schulz(s, dtype=dtype) for s in stacks], reps)
        print(f"   {str(dtype)[6:]:8s} one call per matrix (baseline) {loop:.3f}s   batched per shape {batched:.3f}s   "
              f"speed-up {loop / batched:.2f}x")


def bench_attention(a):
    torch.manual_seed(0)
    model = load_model("k2-nano").train()
    x = torch.randint(0, VOCAB, (a.micro, a.seq_len + 1))

    def step():
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

    res = {}
    for rec in (False, True):
        for m in M.attention_modules(model):
            m.record_max_logit = rec
        res[rec] = timed(step, a.repeats)
    print(f"3. fwd+bwd of one micro-batch {a.micro}x{a.seq_len}: SDPA, no max-logit (baseline) {res[False]:.3f}s   "
          f"with max-logit recording {res[True]:.3f}s   ratio {res[True] / res[False]:.2f}")


def bench_packed(a):
    torch.manual_seed(0)
    model = load_model("k2-nano").train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (a.micro, a.packed_len + 1), generator=g)
    doc_ids = torch.zeros(a.micro, a.packed_len, dtype=torch.long)
    positions = torch.zeros(a.micro, a.packed_len, dtype=torch.long)
    for r in range(a.micro):
        cuts = sorted(torch.randperm(a.packed_len - 1, generator=g)[:a.docs - 1].add(1).tolist())
        for d, (s, e) in enumerate(zip([0] + cuts, cuts + [a.packed_len])):
            doc_ids[r, s:e], positions[r, s:e] = d, torch.arange(e - s)

    def step(**kw):
        logits = model(x[:, :-1], positions=positions, **kw)
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()

    dense = timed(lambda: step(attn_mask=document_mask(doc_ids)), a.repeats)
    packed = timed(lambda: step(doc_ids=doc_ids), a.repeats)
    print(f"4. fwd+bwd of {a.micro} packed rows x {a.packed_len} tokens, {a.docs} conversations per row: "
          f"dense block mask (baseline) {dense:.3f}s   per conversation {packed:.3f}s   speed-up {dense / packed:.2f}x")


def bench_denormal(a):
    """Each timing in a fresh process (`--denormal-child kept|flushed`), the two alternated per repeat:
    torch.set_flush_denormal sets only the calling thread, and the OpenMP workers keep the mode they
    were created with, so a mode set after the first parallel op (a model load) misses them."""
    runs = {"kept": [], "flushed": []}
    for _ in range(a.repeats):
        for mode in runs:
            cmd = [sys.executable, __file__, "--only", "denormal", "--denormal-child", mode, "--micro", str(a.micro),
                   "--packed-len", str(a.packed_len), "--steps", str(a.steps), "--repeats", str(a.repeats),
                   *(["--checkpoint", a.checkpoint] if a.checkpoint else []), *(["--data", a.data] if a.data else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    kept, flushed = (med([r["fwd_bwd"] for r in runs[m]]) for m in ("kept", "flushed"))
    print(f"5. fwd+bwd of {a.micro} rows x {a.packed_len} tokens on {a.checkpoint or 'a fresh k2-nano'}, "
          f"{torch.get_num_threads()} threads: denormals kept (baseline) {kept:.3f}s   flushed {flushed:.3f}s   "
          f"speed-up {kept / flushed:.2f}x")
    if a.data:
        kept, flushed = (med([t for r in runs[m] for t in r["sft"]]) for m in ("kept", "flushed"))
        print(f"   openk2.train, {a.steps} SFT steps x {a.repeats} from it on {a.data}: fwd+bwd per step, kept "
              f"(baseline) {kept:.3f}s   flushed {flushed:.3f}s   speed-up {kept / flushed:.2f}x")


def denormal_child(a):
    """One process of section 5: the mode is set before anything runs in parallel, as in `openk2 train`."""
    flush = a.denormal_child == "flushed"
    with T.flush_denormals(torch.device("cpu")) if flush else contextlib.nullcontext():
        torch.manual_seed(0)
        model = load_model(a.checkpoint or "k2-nano").train()
        x = torch.randint(0, VOCAB, (a.micro, a.packed_len + 1), generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(a.repeats + 1):   # the first is a warm-up
            t0 = time.perf_counter()
            F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        sft = []
        if a.data:
            if not flush:   # openk2.train would flush: this child measures the baseline
                T.flush_denormals = lambda device: contextlib.nullcontext()
            with tempfile.TemporaryDirectory() as tmp:
                T.train(T.TrainOptions(out=tmp, data=a.data, init=a.checkpoint, seq_len=a.packed_len,
                                       batch_size=2, micro_batch=2, steps=a.steps, lr=1e-3, warmup=1,
                                       loss_on="masked", save_every=10**6, quiet=True))
                sft = [json.loads(line)["time_fwd_bwd_s"] for line in open(Path(tmp) / "metrics.jsonl")][1:]
    print(json.dumps({"fwd_bwd": med(times[1:]), "sft": sft}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--packed-len", type=int, default=1152)
    ap.add_argument("--docs", type=int, default=2)
    ap.add_argument("--checkpoint", help="section 5's weights (default: a fresh k2-nano)")
    ap.add_argument("--data", help="section 5: also time openk2.train's SFT loop on these conversations")
    ap.add_argument("--only", choices=("loop", "ns", "attention", "packed", "denormal"), help="run one section")
    ap.add_argument("--denormal-child", choices=("kept", "flushed"), help=argparse.SUPPRESS)  # section 5's processes
    a = ap.parse_args()
    if a.denormal_child:
        return denormal_child(a)
    if a.data and not a.checkpoint:
        ap.error("--data needs --checkpoint (the SFT loop starts from a trained model and its tokenizer)")
    if a.only in (None, "loop"):
        with tempfile.TemporaryDirectory() as tmp:
            bench_loop(a, Path(tmp))
    if a.only in (None, "ns"):
        bench_ns(a)
    if a.only in (None, "attention"):
        bench_attention(a)
    if a.only in (None, "packed"):
        bench_packed(a)
    if a.only in (None, "denormal"):
        bench_denormal(a)


if __name__ == "__main__":
    main()
