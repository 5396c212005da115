"""The policy's two forms (openk2/rl_policy.py): exact latent weights for an INT4 checkpoint, and the
engine's INT4 copy kept equal to the training forward after an update."""

import pytest
import torch

from openk2 import int4, load_model
from openk2 import rl_policy as P
from openk2.quant import Int4Experts, QATExperts, quantize_model, set_impl


@pytest.mark.parametrize("scale", [1e-3, 0.05, 3.0])
def test_int4_latent_reproduces_the_int4_values_exactly(scale):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * scale
    w[3, :32] = 0                                            # an all-zero group (scale = eps)
    w[5, 32:64] = -w[5, 32:64].abs()                         # a group whose extreme is negative
    packed, s = int4.compress(w)
    q = int4.unpack(packed, 256)
    latent = P.int4_latent(q, s)
    assert torch.equal(int4.fake_quant(latent), int4.dequantize(q, s))
    assert all(torch.equal(a, b) for a, b in zip(int4.compress(latent), (packed, s)))
    # why it is needed: the dequantized weights do not quantize back to themselves
    naive = int4.dequantize(q, s)
    assert (int4.fake_quant(naive) != naive).float().mean() > 0.5


def _int4_tiny():
    torch.manual_seed(0)
    return quantize_model(load_model("k2-tiny"), "experts")


def test_trainable_int4_policy_starts_as_the_checkpoint_and_the_engine_follows_updates():
    ckpt = _int4_tiny()
    policy = _int4_tiny()
    assert P.has_int4(policy) and P.trainable(policy, "experts") == 0
    assert any(isinstance(m, QATExperts) for m in policy.modules())
    engine_net = P.engine_model(policy)
    x = torch.randint(0, 500, (2, 17))
    set_impl(ckpt, "dequant")
    set_impl(engine_net, "dequant")
    with torch.no_grad():
        ref = ckpt(x)
        assert torch.equal(policy.eval()(x), ref)             # the training forward IS the checkpoint
        assert torch.equal(engine_net(x), ref)
    # an update: the engine gets INT4 of the new latent weights (and the rest as is)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        policy.model.layers[1].mlp.gate.e_score_correction_bias += 0.5
    state = P.engine_state(policy, engine_net)
    assert set(state) == set(engine_net.state_dict())
    assert any(k.endswith("gate_proj_packed") for k in state)
    engine_net.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(engine_net(x), policy(x))
        assert not torch.equal(engine_net(x), ref)


def test_float_checkpoint_with_qat_gets_an_int4_engine_without_qat_a_float_one():
    torch.manual_seed(0)
    policy = load_model("k2-tiny")
    assert P.trainable(policy, "experts") == 0
    engine_net = P.engine_model(policy)
    assert any(isinstance(m, Int4Experts) for m in engine_net.modules())
    assert not any(p.requires_grad for p in engine_net.parameters())
    plain = load_model("k2-tiny")
    P.trainable(plain, "none")
    assert not any(isinstance(m, (QATExperts, Int4Experts)) for m in P.engine_model(plain).modules())
