"""INT4 modules and QAT: the QAT forward equals the INT4 dequantize path exactly, and PyTorch's int4
kernel path agrees to bf16 tolerance; the module interface the engine uses keeps its promises."""

import copy

import pytest
import torch
import torch.nn.functional as F

from openk2 import int4, quant
from openk2.checkpoint import load_model
from openk2.model import Experts


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("k2-tiny")


IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _kernel_here():
    return quant.kernel_supported(torch.device("cpu"), 64, 64, 32) and quant.kernel_verified(torch.device("cpu"))


@pytest.mark.parametrize("targets", ["experts", "all"])
def test_qat_forward_equals_int4_dequantize_forward_exactly(tiny, targets):
    qat = quant.enable_qat(copy.deepcopy(tiny), targets)
    q = quant.quantize_model(copy.deepcopy(qat))
    kinds = {type(m).__name__ for m in q.modules()}
    assert "Int4Experts" in kinds and ("Int4Linear" in kinds) == (targets == "all")
    assert "QATExperts" not in kinds and "Experts" not in kinds
    quant.set_impl(q, "dequant")
    with torch.no_grad():
        ref, got = qat(IDS), q(IDS)
    assert torch.equal(got, ref)
    with torch.no_grad():  # QAT really changes the function
        assert (tiny(IDS) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("targets", ["experts", "all"])
def test_kernel_path_matches_qat_to_bf16_tolerance(tiny, targets):
    if not _kernel_here():
        pytest.skip("no int4 CPU kernel in this torch build")
    qat = quant.enable_qat(copy.deepcopy(tiny), targets)
    q = quant.quantize_model(copy.deepcopy(qat))
    with torch.no_grad():  # auto: the kernel wherever the shapes allow it
        ref, got = qat(IDS), q(IDS)
    assert all(m._kernel is not None for m in q.modules() if isinstance(m, quant.Int4Experts))
    if targets == "all":  # kv_a_proj_with_mqa has 40 outputs (not a multiple of 16): dequantized
        attn = q.model.layers[0].self_attn
        assert attn.q_a_proj._kernel is not None and attn.kv_a_proj_with_mqa._kernel is None
    assert not torch.equal(got, ref)  # bf16 activations: close, not identical
    assert _rel(got, ref) < 1e-2
    # the INT4 model as served, bf16 everywhere: kernel vs dequantize path
    q.to(torch.bfloat16)
    with torch.no_grad():
        got16 = q(IDS)
        quant.set_impl(q, "dequant")
        ref16 = q(IDS)
    assert got16.dtype == torch.bfloat16 and _rel(got16, ref16) < 2e-2


def test_qat_keeps_parameters_and_trains_latent_weights(tiny):
    m = copy.deepcopy(tiny)
    before = dict(m.named_parameters())
    quant.enable_qat(m, "all")
    after = dict(m.named_parameters())
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert type(m.lm_head) is torch.nn.Linear  # never the output head
    assert type(m.model.layers[1].mlp.gate).__name__ == "Gate"  # nor the router
    m.train()
    m(IDS).float().logsumexp(-1).mean().backward()
    experts = m.model.layers[1].mlp.experts
    assert experts.gate_proj.dtype == torch.float32 and experts.gate_proj.grad.abs().sum() > 0
    assert m.model.layers[0].self_attn.kv_b_proj.weight.grad.abs().sum() > 0
    quant.disable_qat(m)
    assert type(experts) is Experts and type(m.model.layers[0].self_attn.kv_b_proj) is torch.nn.Linear


def test_int4_linear_paths():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=True)
    q = quant.Int4Linear.from_linear(lin)
    x = torch.randn(3, 5, 96)
    ref = F.linear(x, int4.fake_quant(lin.weight), lin.bias)
    q.impl = "dequant"
    assert torch.equal(q(x), ref)
    if _kernel_here():
        q.impl = "kernel"
        assert _rel(q(x), ref) < 1e-2
        # a new weight replaces the cached kernel layout
        w2 = torch.randn(48, 96)
        q.set_weight(w2)
        assert _rel(q(x), F.linear(x, int4.fake_quant(w2), lin.bias)) < 1e-2
    # the dequantized weight, for code that reads .weight (MLA absorption), in the model's dtype
    assert torch.equal(q.weight, q.dequantize())
    assert q.to(torch.bfloat16).weight.dtype == torch.bfloat16


def test_scales_stay_bf16_and_packed_int32_through_dtype_casts(tiny):
    q = quant.quantize_model(copy.deepcopy(tiny), "all")
    e = q.model.layers[1].mlp.experts
    scale = e.gate_proj_scale.clone()
    for dtype in (torch.float16, torch.float32, torch.bfloat16):
        q.to(dtype)
        assert e.gate_proj_scale.dtype == torch.bfloat16 and torch.equal(e.gate_proj_scale, scale)
        assert e.gate_proj_packed.dtype == torch.int32
        assert q.model.layers[0].self_attn.q_a_proj.weight_scale.dtype == torch.bfloat16


def test_int4_experts_handle_any_routing():
    torch.manual_seed(0)
    ex = Experts(6, 64, 32)
    torch.nn.init.normal_(ex.gate_proj, std=0.1), torch.nn.init.normal_(ex.up_proj, std=0.1)
    torch.nn.init.normal_(ex.down_proj, std=0.1)
    q = quant.Int4Experts.from_experts(ex)
    qat = copy.deepcopy(ex)
    qat.__class__, qat.group_size = quant.QATExperts, 32
    x = torch.randn(7, 64)
    cases = [torch.tensor([[0, 5]] * 7),  # two experts only
             torch.randint(0, 6, (7, 3), generator=torch.Generator().manual_seed(2)),
             torch.tensor([[3]] * 7)]
    for idx in cases:
        w = torch.rand(idx.shape)
        ref = qat(x, idx, w)
        q.impl = "dequant"
        assert torch.equal(q(x, idx, w), ref)
        # the QAT/dequant forward is model.Experts' computation on the INT4 weights
        full = Experts(6, 64, 32)
        with torch.no_grad():
            for p in quant.PROJS:
                getattr(full, p).copy_(q.dequantize(p))
        assert (full(x, idx, w) - ref).abs().max() < 1e-6
        if _kernel_here():
            q.impl = "kernel"
            assert _rel(q(x, idx, w), ref) < 1e-2
    assert q(x[:0], cases[0][:0], torch.rand(0, 2)).shape == (0, 64)
    # one token (batch-1 decoding takes model.Experts' per-expert branch; it once failed on the INT4 stacks)
    one, idx1, w1 = x[:1], cases[1][:1], torch.rand(1, 3)
    q.impl = "dequant"
    assert torch.equal(q(one, idx1, w1), qat(one, idx1, w1))
    assert (full(one, idx1, w1) - qat(one, idx1, w1)).abs().max() < 1e-6


def test_kernel_is_not_used_when_a_gradient_is_needed():
    q = quant.Int4Linear.from_float(torch.randn(32, 64))
    x = torch.randn(2, 64, requires_grad=True)
    q(x).sum().backward()  # auto: dequantize path, differentiable in x
    assert torch.equal(x.grad, q.dequantize().sum(0).expand(2, 64))
    q.impl = "kernel"
    with pytest.raises(RuntimeError, match="kernel unavailable"):
        q(x)


def test_enable_qat_on_an_int4_model_makes_it_trainable(tiny):
    q = quant.quantize_model(copy.deepcopy(tiny), "all")
    deq = q.model.layers[1].mlp.experts.dequantize("up_proj")
    quant.enable_qat(q)
    e = q.model.layers[1].mlp.experts
    assert type(e) is quant.QATExperts and torch.equal(e.up_proj.data, deq) and e.up_proj.requires_grad
    assert type(q.model.layers[0].self_attn.o_proj) is quant.QATLinear


def test_bad_targets_and_group_sizes(tiny):
    with pytest.raises(ValueError, match="targets"):
        quant.enable_qat(copy.deepcopy(tiny), "attention")
    m = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="group size 48"):
        quant.enable_qat(m, "experts", group_size=48)
    assert not any(isinstance(x, (quant.QATExperts, quant.QATLinear)) for x in m.modules())  # untouched
