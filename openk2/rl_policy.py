"""The RL policy in its two forms: the trainable model (latent weights, INT4 fake-quant on) and the
engine's model (real INT4 modules, what rollouts sample from), kept equal after every update.

K2 ran RL rollouts on INT4 weights and trained with quantization-aware training, so the policy the
objective differentiates is exactly the one that sampled: the training forward fake-quantizes the
routed experts, and after each update the engine gets `int4.compress` of the new latent weights,
the very values that forward used (`engine_state`).

Starting from an INT4 checkpoint (the shipped k2-nano) needs one care: the obvious latent weights,
the dequantized values q * scale, do not quantize back to themselves (scale = absmax / 7.5, and a
group's dequantized absmax is 7 or 8 times its scale, so the scale would grow or shrink by ~7%: a
different policy before any learning). `int4_latent` builds latent weights whose fake-quant is
bit-for-bit the checkpoint's INT4 values: the extremes sit at +-7.5 * scale, where the
quantizer maps them back to +7 (clamp) and -8 (round half to even), and everything else at q * scale.
"""

from __future__ import annotations

import copy

import torch

from openk2 import int4


def int4_latent(q: torch.Tensor, scale: torch.Tensor, group_size: int = int4.GROUP_SIZE) -> torch.Tensor:
    """fp32 weights w with fake_quant(w) == dequantize(q, scale), for q, scale as `int4.quantize`
    and `int4.group_scales` produce them (a group's extreme is +7, -8, or -7 when the bf16 rounding
    of the scale went up). A group whose |q| never reaches 7 cannot come from that quantizer and
    keeps q * scale (`check_latent` reports it)."""
    s = scale.float()[..., None]
    qg = q.unflatten(-1, (q.shape[-1] // group_size, group_size)).float()
    w = qg * s
    top = (qg == 7) | (qg == -8)
    w = torch.where(top, torch.sign(qg) * 7.5 * s, w)
    # extreme -7 only: just under 7.5 * scale, so absmax / 7.5 still rounds to this bf16 scale
    neg7 = (qg == -7) & ~top.any(-1, keepdim=True)
    w = torch.where(neg7, -7.5 * (1 - 2 ** -11) * s, w)
    return w.flatten(-2)


def _int4_modules(model):
    from openk2.quant import Int4Experts, Int4Linear
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (Int4Experts, Int4Linear))]


def _projections(m) -> dict:
    """name -> (packed, scale, in_features) of an Int4Experts / Int4Linear module."""
    from openk2.quant import PROJS, Int4Experts
    if isinstance(m, Int4Experts):
        return {p: (getattr(m, f"{p}_packed"), getattr(m, f"{p}_scale"), m.shapes()[p][1]) for p in PROJS}
    return {"weight": (m.weight_packed, m.weight_scale, m.in_features)}


def has_int4(model) -> bool:
    return bool(_int4_modules(model))


def trainable(model, qat: str) -> int:
    """Make `model` trainable in place: INT4 modules become QAT modules holding `int4_latent`
    weights (their forward is the checkpoint's INT4 values exactly), and `qat` ("experts", "all" or
    "none") turns fake-quant on for float modules too. Returns the number of weight groups whose
    INT4 values could not be reproduced (0 for checkpoints this quantizer wrote)."""
    from openk2.quant import enable_qat
    found = {name: {p: (int4.unpack(pk, cols), sc.clone(), m.group_size) for p, (pk, sc, cols)
                    in _projections(m).items()} for name, m in _int4_modules(model)}
    if found or qat != "none":
        enable_qat(model, "experts" if qat == "none" else qat)
    bad = 0
    with torch.no_grad():
        for name, projs in found.items():
            mod = model.get_submodule(name)
            for p, (q, sc, gs) in projs.items():
                w = int4_latent(q, sc, gs)
                getattr(mod, p).copy_(w)
                same = int4.fake_quant(getattr(mod, p), gs) == int4.dequantize(q, sc, gs)
                bad += int((~same).unflatten(-1, (-1, gs)).any(-1).sum())
    return bad


def engine_model(policy):
    """The model the engine samples from: a copy of the policy with its QAT modules turned into real
    INT4 modules (exactly the values the training forward uses), or a plain copy without QAT."""
    from openk2.quant import QATExperts, QATLinear, quantize_model
    m = copy.deepcopy(policy)
    if any(isinstance(x, (QATExperts, QATLinear)) for x in m.modules()):
        quantize_model(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


@torch.no_grad()
def engine_state(policy, engine_net) -> dict:
    """The engine model's state dict computed from the policy: INT4 buffers compressed from the
    latent weights, everything else (attention, norms, embeddings, router and its bias) copied."""
    own = engine_net.state_dict()
    src = policy.state_dict()
    out = {}
    for name, m in _int4_modules(engine_net):
        pm = policy.get_submodule(name)
        for p in _projections(m):
            packed, scale = int4.compress(getattr(pm, p).detach(), m.group_size)
            key = f"{name}.{p}" if p != "weight" else f"{name}.weight"
            out[f"{key}_packed"], out[f"{key}_scale"] = packed, scale
    for k in own:
        if k in out:
            continue
        if k not in src:
            raise ValueError(f"engine tensor {k} has no counterpart in the policy (models differ in structure)")
        out[k] = src[k].detach()
    return out


def start_policy(policy):
    """A frozen copy of the policy as it is now (for the drift from the start policy)."""
    m = copy.deepcopy(policy)
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()
