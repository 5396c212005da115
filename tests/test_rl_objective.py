"""The RL objective (openk2/rl_objective.py): the K1.5 loss on a hand-computed batch, log-probs over
views with masked (forced) tokens getting no gradient, batching, and the temperature schedule."""

import math

import pytest
import torch

from openk2 import load_model
from openk2 import rl_objective as O


def test_k15_loss_on_a_hand_computed_batch():
    # two prompts: A with K=2 (rewards 1, 0), B with K=3 (rewards 1, 1, 0)
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0]
    groups = [0, 0, 1, 1, 1]
    logp = torch.tensor([-3.0, -5.0, -2.0, -4.0, -6.0], requires_grad=True)
    logp_old = torch.tensor([-3.2, -4.6, -2.0, -4.5, -5.0])
    tau = 0.5
    # advantages: A: mean 0.5 -> +0.5, -0.5; B: mean 2/3 -> +1/3, +1/3, -2/3
    # log-ratios: 0.2, -0.4, 0.0, 0.5, -1.0; tau * ratio: 0.1, -0.2, 0.0, 0.25, -0.5
    # terms: (0.5-0.1)^2 = 0.16, (-0.5+0.2)^2 = 0.09, (1/3)^2 = 1/9, (1/3-0.25)^2 = 1/144, (-2/3+0.5)^2 = 1/36
    expected = (0.16 + 0.09 + 1 / 9 + 1 / 144 + 1 / 36) / 5
    loss = O.k15_loss(logp, logp_old, rewards, groups, tau)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dlogp_i = -2 tau (adv_i - tau ratio_i) / N
    inner = [0.4, -0.3, 1 / 3, 1 / 3 - 0.25, -2 / 3 + 0.5]
    assert logp.grad.tolist() == pytest.approx([-2 * tau * x / 5 for x in inner], abs=1e-6)


def test_advantages_are_per_group_and_ordering_free():
    adv = O.advantages([1.0, 3.0, 0.0, 5.0, 1.0], [7, 7, 2, 2, 2])
    assert adv.tolist() == pytest.approx([-1.0, 1.0, -2.0, 3.0, -1.0])
    with pytest.raises(ValueError, match="group labels"):
        O.advantages([1.0, 2.0], [0])


def test_at_pi_old_the_gradient_is_the_baselined_policy_gradient():
    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    O.k15_loss(logp, logp.detach(), [1.0, 0.0, 0.5], [0, 0, 0], kl_tau=0.3).backward()
    assert logp.grad.tolist() == pytest.approx([-2 * 0.3 * a / 3 for a in (0.5, -0.5, 0.0)])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = load_model("k2-tiny").train()
    m.mla_impl = "naive"
    return m


def _traj(rng, n_views, lens):
    views = []
    for L in lens[:n_views]:
        ids = torch.randint(0, 500, (L,), generator=rng).tolist()
        mask = [0] * 4 + [int(x) for x in (torch.rand(L - 4, generator=rng) < 0.6)]
        views.append((ids, mask))
    return views


def test_masked_tokens_get_no_gradient_and_logprobs_sum_over_views(tiny):
    rng = torch.Generator().manual_seed(1)
    trajs = [_traj(rng, 2, [20, 33]), _traj(rng, 1, [12])]   # trajectory 0 has two views
    rows = O.make_rows(trajs)
    seen = {}

    def keep_grad(mod, inp, out):          # the final hidden states: one row per position's logits
        out.retain_grad()
        seen["h"] = out
    hook = tiny.model.norm.register_forward_hook(keep_grad)
    try:
        logp, tok_lp = O.trajectory_logprobs(tiny, rows)
        O.k15_terms(logp, logp.detach() - 0.1, torch.tensor([0.7, -0.7]), 0.5).sum().backward()
    finally:
        hook.remove()
    grad = seen["h"].grad.abs().sum(-1)                            # [rows, T]
    trained = rows.targets != O.IGNORE                            # position t predicts a generated id
    assert (grad[~trained] == 0).all()                            # forced, prompt and padding: nothing
    assert (grad[trained] > 0).all()
    # the values: a plain full forward per view, log-softmax at t for the id at t+1 where mask[t+1] == 1
    with torch.no_grad():
        ref = []
        for views in trajs:
            total = 0.0
            for ids, mask in views:
                lsm = torch.log_softmax(tiny(torch.tensor([ids]))[0].float(), -1)
                total += sum(lsm[t, ids[t + 1]].item() for t in range(len(ids) - 1) if mask[t + 1])
            ref.append(total)
    assert logp.tolist() == pytest.approx(ref, abs=1e-4)
    assert tok_lp.numel() == sum(sum(m[1:]) for v in trajs for _, m in v) == rows.tokens


def test_rows_reject_mismatched_views_and_empty_batches():
    with pytest.raises(ValueError, match="mask values"):
        O.make_rows([[([1, 2, 3], [0, 1])]])
    with pytest.raises(ValueError, match="no view"):
        O.make_rows([[([5], [0])]])


def test_micro_batches_keep_trajectories_whole_within_the_token_budget():
    lengths = [[100], [50, 60], [400], [30], [90, 10]]
    batches = O.micro_batches(lengths, 200)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for b in batches:
        rows = sum(len(lengths[i]) for i in b)
        if len(b) > 1:
            assert rows * max(max(lengths[i]) for i in b) <= 200
    assert [2] in batches                                          # too big: alone


@pytest.mark.parametrize("schedule,mid", [("constant", 1.0), ("linear", 0.75), ("cosine", 0.75),
                                          ("exp", math.sqrt(0.5))])
def test_temperature_schedule(schedule, mid):
    T = [O.temperature_at(s, 11, 1.0, 0.5, schedule) for s in range(11)]
    assert T[0] == pytest.approx(1.0)
    assert T[5] == pytest.approx(mid)
    assert T[10] == pytest.approx(1.0 if schedule == "constant" else 0.5)
    assert all(a >= b - 1e-12 for a, b in zip(T, T[1:]))          # never heats up
    assert O.temperature_at(3, 11, 0.8, None, "linear") == 0.8      # no end: constant


def test_temperature_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match="schedule"):
        O.temperature_at(0, 10, 1.0, 0.5, "step")
    with pytest.raises(ValueError, match="exp"):
        O.temperature_at(1, 10, 1.0, 0.0, "exp")
    with pytest.raises(ValueError, match=">= 0"):
        O.temperature_at(0, 10, -1.0, 0.5)
