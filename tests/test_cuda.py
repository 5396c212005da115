"""The CUDA paths: the int4 kernel, the model, the engine, training, RL and the shipped model on a GPU.

CI has no GPU, so these skip there; they run on a lent GPU machine (docs/results.md, "GPU checks",
has the command and what they showed). Each compares the GPU with a reference that does not share
its kernels: the dequantize path for INT4, the CPU model for the float model, the full forward for the
engine, the CPU's scores for the shipped model.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from openk2 import int4, quant
from openk2.checkpoint import load_model
from openk2.engine import Engine, SamplingParams
from test_engine import wide_model  # k2-tiny with wide weights: clear greedy margins

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ROOT = Path(__file__).resolve().parent.parent
NANO = ROOT / "models" / "k2-nano"
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would round fp32 matmuls to 10 mantissa bits; the CPU comparisons need real fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("out_f,in_f", [(64, 256), (2048, 7168), (7168, 2048)])  # K2's expert shapes too
@pytest.mark.parametrize("rows", [1, 16])
def test_int4_kernel_matches_dequantize(out_f, in_f, rows):
    assert quant.kernel_verified(CUDA)
    g = torch.Generator().manual_seed(out_f + rows)
    m = quant.Int4Linear.from_float(torch.randn(out_f, in_f, generator=g) * 0.02).to(CUDA)
    x = torch.randn(rows, in_f, generator=g).to(CUDA, torch.bfloat16)
    m.impl = "kernel"
    got = m(x)
    m.impl = "dequant"
    ref = m(x.float())
    assert got.dtype == torch.bfloat16 and rel(got, ref) < 1e-2


@pytest.mark.parametrize("impl,tokens", [("kernel", 40), ("auto", 1), ("auto", 4), ("auto", 40)])
def test_int4_experts_on_cuda_match_dequantize(impl, tokens):
    """"kernel": tokens grouped per expert, one tinygemm call each; "auto" with few slots: the fused
    Triton decode kernel (openk2.int4_triton), which must be the one that ran."""
    from openk2 import int4_triton
    g = torch.Generator().manual_seed(tokens)
    E, dim, inter, k = 8, 256, 128, 2
    gate, up = (torch.randn(E, inter, dim, generator=g) * 0.05 for _ in range(2))
    down = torch.randn(E, dim, inter, generator=g) * 0.05
    m = quant.Int4Experts.from_float(gate, up, down).to(CUDA)
    x = torch.randn(tokens, dim, generator=g).to(CUDA)
    idx = torch.randint(0, E, (tokens, k), generator=g).to(CUDA)
    w = torch.rand(tokens, k, generator=g).to(CUDA)
    fused = impl == "auto" and tokens * k <= int4_triton.MAX_SLOTS
    assert not fused or quant._fused_usable(x, idx, m), "the fused kernel was refused (see the warning)"
    m.impl = impl
    got = m(x, idx, w)
    m.impl = "dequant"
    assert rel(got, m(x, idx, w)) < (1e-4 if fused else 2e-2)  # fused: fp32 math; tinygemm: bf16


def test_model_on_cuda_matches_cpu_in_fp32_and_bf16():
    cpu = wide_model()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = cpu(ids)
        gpu = load_model("k2-tiny", device=CUDA)
        gpu.load_state_dict(cpu.state_dict())
        assert rel(gpu(ids.to(CUDA)), ref) < 1e-4
        bf = gpu.to(torch.bfloat16)(ids.to(CUDA)).float()
    cos = torch.nn.functional.cosine_similarity(bf.cpu().flatten(1), ref.flatten(1)).min()
    assert cos > 0.97, float(cos)  # wide weights amplify rounding (0.989 on CPU bf16)


@torch.no_grad()
def greedy_reference(model, ids, n):
    """Greedy by full forwards (no cache) on the model's own device: tokens and each step's top-1 margin."""
    ids, toks, margins = list(ids), [], []
    dev = next(model.parameters()).device
    for _ in range(n):
        logits = model(torch.tensor([ids], device=dev))[0, -1].float()
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        toks.append(int(logits.argmax()))
        ids.append(toks[-1])
    return toks, margins


@pytest.mark.parametrize("int4_experts", [False, True])
def test_engine_on_cuda_equals_full_forward_greedy(int4_experts):
    model = wide_model()
    if int4_experts:
        quant.quantize_model(model)  # Int4Experts: the CUDA kernel in the engine's no-grad forwards
    model = model.to(CUDA)
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(0, 512, (int(n),), generator=g).tolist() for n in torch.randint(3, 40, (10,), generator=g)]
    eng = Engine(model, block_size=4, prefill_chunk=8, cache_tokens=2048)
    try:
        got = eng.generate(ps, SamplingParams(temperature=0, max_tokens=10))
        compared = 0
        for p, r in zip(ps, got):
            toks, margins = greedy_reference(model, p, 10)
            # tokens up to the first near-tie (bf16 kernels may break it either way; after it the two
            # continue from different contexts) must agree
            clear = next((i for i, m in enumerate(margins) if m < (0.05 if int4_experts else 1e-3)), 10)
            assert r.output_ids[:clear] == toks[:clear]
            compared += clear
        assert compared >= 40, compared
    finally:
        eng.close()


def _cycle_data(tmp_path):
    from openk2.data import write_tokens
    return write_tokens(tmp_path / "cyc.bin", np.arange(20000) % 23)


def test_training_on_cuda_learns_saves_and_loads_on_cpu(tmp_path):
    from openk2 import cli
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "k2-tiny", "--data", str(_cycle_data(tmp_path)), "--seq-len", "32",
                     "--batch-size", "4", "--steps", "25", "--save-every", "25", "--out", str(out), "--quiet",
                     "--lr", "1e-2", "--device", "cuda", "--qat", "experts"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] / 2, [r["loss"] for r in rows]
    cpu = load_model(out / "latest")
    gpu = load_model(out / "latest", device=CUDA, dtype="float32")
    ids = torch.arange(30).unsqueeze(0) % 23
    with torch.no_grad():
        assert rel(gpu(ids.to(CUDA)), cpu(ids)) < 2e-2  # INT4 experts: bf16 kernel on both sides


def test_rl_step_on_cuda(tmp_path):
    from openk2.rl import RLOptions, rl
    from openk2.tokenizer import tiny_tokenizer
    from openk2.train import TrainOptions, train
    tiny_tokenizer().save(tmp_path / "tok")
    train(TrainOptions(out=str(tmp_path / "sft"), preset="k2-tiny", tokenizer=str(tmp_path / "tok"),
                       data="gym:arith", steps=4, batch_size=4, seq_len=512, gym_size=16, lr=1e-2, warmup=1,
                       save_every=4, quiet=True, device="cuda"))
    rows = []
    rl(RLOptions(model=str(tmp_path / "sft" / "latest"), out=str(tmp_path / "rl"), tasks="arith", prompts=2,
                 samples=2, steps=1, budget="64", max_steps=2, ptx_batch=2, save_every=1, qat="experts",
                 lr=1e-3, device="cuda", quiet=True), on_step=rows.append)
    assert len(rows) == 1 and rows[0]["weight_drift"] > 0
    assert rows[0]["generated_tokens"] > 0 and np.isfinite(rows[0]["ptx_loss"])  # rollouts ran; PTX moved weights


@pytest.mark.skipif(not (NANO / "config.json").exists(), reason="no shipped model")
def test_shipped_model_on_cuda_solves_what_it_solves_on_cpu():
    """The thresholds of test_shipped_model, with the engine on the GPU (INT4 experts through the
    CUDA kernel)."""
    from openk2.agent_view import make_backend
    from openk2.eval import evaluate
    backend = make_backend(str(NANO))
    assert backend.engine.device.type == "cuda"
    try:
        r = evaluate(backend, "chain,arith", n=6, difficulty="chain=3,arith=1", seed=11, temperature=0.0)
    finally:
        backend.engine.close()
    acc = {f: sum(t["reward"] == 1.0 for t in r["tasks"] if t["family"] == f) for f in ("chain", "arith")}
    assert acc["chain"] >= 5 and acc["arith"] >= 5, acc
