"""The RL loop (openk2/rl.py, openk2/rl_rollout.py): rollouts with budgets, penalties and the step's
temperature through the agent; and end to end on a tiny model trained for a few seconds: steps run,
weights change, the engine gets them, metrics and checkpoints resume."""

import json

import pytest
import torch

from agent_stub import RecordingEngine
from openk2 import gym, int4
from openk2 import rl_rollout as R
from openk2.agent import LocalBackend
from openk2.critic import Critic
from openk2.scripted import ScriptedEngine
from openk2.tokenizer import tiny_tokenizer


def test_budgets_cut_and_penalise_runs_and_rollouts_sample_at_the_given_temperature():
    tok = tiny_tokenizer()
    eng = RecordingEngine(tok, lambda text: "<think>" + "let me think about it " * 30 + "</think>Answer: 5")
    backend = LocalBackend(eng, tok, context_window=4096)
    tasks = [gym.sample("arith", 0, 0, "rl", 1), gym.sample("chain", 0, 0, "rl", 1)]
    samples = R.rollout(backend, tasks, 2, temperature=0.73, seed=11, budgets={"arith": 40}, window=4096,
                        max_steps=3)
    R.score(samples, penalty=0.25)
    assert [s.group for s in samples] == [0, 0, 1, 1] and [s.seed for s in samples] == [11, 12, 13, 14]
    for s in samples[:2]:                                     # arith: cut at 40 generated tokens, penalised
        assert s.truncated and s.trace.stop_reason == "max_total_tokens" and s.tokens == 40
        assert s.score == 0.0 and s.reward == -0.25 and s.content == ""
    for s in samples[2:]:                                     # chain: no budget, a final (wrong) answer
        assert not s.truncated and s.trace.stop_reason == "final" and s.content == "Answer: 5"
        assert s.reward == s.score == gym.verify(s.task, "Answer: 5") == 0.0
    assert {e["params"].temperature for e in eng.log} == {0.73}
    assert all(s.views and sum(s.views[0][1]) == s.tokens for s in samples)   # generated tokens, masked in
    with pytest.raises(ValueError, match="not among"):
        R.parse_budgets("code=10", ["arith"])
    assert R.parse_budgets("300", ["arith", "chain"]) == {"arith": 300, "chain": 300}
    assert R.parse_budgets("chain=50,arith=7", ["arith", "chain"]) == {"chain": 50, "arith": 7}


def test_rubric_families_need_a_critic():
    tok = tiny_tokenizer()
    backend = LocalBackend(ScriptedEngine(tok, lambda t: "<think></think>Ann is a baker."), tok)
    samples = R.rollout(backend, [gym.sample("brief", 0, 0, "rl", 1)], 2, temperature=1.0, seed=0)
    with pytest.raises(ValueError, match="critic"):
        R.score(samples)


def test_rl_runs_with_denormals_flushed(monkeypatch, tmp_path):
    """Like training (test_train.py): the policy's sharp attention underflows into denormals, slow on CPU."""
    from openk2 import rl
    from openk2.train import denormals_flushed
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    seen = []
    monkeypatch.setattr(rl, "_rl", lambda o, d, *a: seen.append(denormals_flushed()) or {})
    rl.rl(rl.RLOptions(model=str(tmp_path), out=str(tmp_path / "run"), device="cpu"))
    assert seen == [True] and not denormals_flushed()


def test_code_tasks_without_a_python_sandbox_are_refused_up_front(monkeypatch, tmp_path):
    """Without bubblewrap (e.g. a lent GPU machine) every code rollout's tool call would fail and
    the run would train on rewards of 0: `openk2 rl` says so before it starts."""
    from openk2 import rl
    from openk2.tools import sandbox
    monkeypatch.setattr(sandbox, "unavailable_reason", lambda *a, **k: "bubblewrap (bwrap) is not installed")
    opts = rl.RLOptions(model=str(tmp_path), out=str(tmp_path / "run"), tasks="arith,code")
    with pytest.raises(rl.RLError, match="code: its tasks run the python tool.*bwrap"):
        rl.resolve(opts)
    rl.resolve(rl.RLOptions(model=str(tmp_path), out=str(tmp_path / "run"), tasks="arith,chain"))


def test_ptx_difficulty_picks_the_gold_levels(tmp_path):
    """--ptx-difficulty code=2: every PTX gold conversation of code is a level-2 task (the default
    is the SFT data's mix); a family not among --ptx-tasks is refused."""
    from openk2 import rl
    mix = R.gold_tasks(["arith", "code"], 0, 0, 40)
    held = R.gold_tasks(["arith", "code"], 0, 0, 40, gym.parse_difficulty("code=2"))
    assert len({t.difficulty for t in mix if t.family == "code"}) == 3
    assert {t.difficulty for t in held if t.family == "code"} == {2}
    assert [t.difficulty for t in held if t.family == "arith"] == [t.difficulty for t in mix if t.family == "arith"]
    with pytest.raises(ValueError, match="--ptx-difficulty given for search, which is not among --ptx-tasks"):
        rl.resolve(rl.RLOptions(model=str(tmp_path), out=str(tmp_path / "r"), tasks="arith", ptx_tasks="arith,chain",
                                ptx_difficulty="search=1"))


# ---- end to end on a tiny model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """k2-tiny trained for a few seconds on gold `brief` notes: it writes something and sometimes
    stops, so runs differ in length and the budget cuts some (the rewards are not all equal)."""
    from openk2.train import TrainOptions, train
    root = tmp_path_factory.mktemp("rl")
    tiny_tokenizer().save(root / "tok")
    train(TrainOptions(out=str(root / "sft"), preset="k2-tiny", tokenizer=str(root / "tok"), data="gym:brief",
                       steps=12, batch_size=4, seq_len=512, gym_size=48, lr=1e-2, warmup=1, save_every=12,
                       optimizer="adamw", quiet=True))
    return root / "sft" / "latest"


def _longer_is_better(prompt):
    a, b = prompt.split("Response A:\n<<<\n", 1)[1].split("\n>>>\n\nResponse B:\n<<<\n", 1)
    b = b.split("\n>>>", 1)[0]
    return "<think></think>Answer: " + ("A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie")


def test_rl_steps_run_weights_change_the_engine_follows_and_the_run_resumes(tiny_sft, tmp_path):
    from openk2.checkpoint import load_model
    from openk2.rl import RLOptions, rl
    tok = tiny_tokenizer()
    critic = Critic(LocalBackend(ScriptedEngine(tok, _longer_is_better), tok), workers=4)
    rows = []
    common = dict(out=str(tmp_path / "run"), quiet=True)
    rl(RLOptions(model=str(tiny_sft), tasks="brief", prompts=2, samples=4, steps=1, budget="100", max_steps=2,
                 ptx_batch=2, save_every=1, qat="experts", lr=1e-3, temperature=1.0, temperature_end=0.5,
                 **common), critic=critic, on_step=rows.append)
    rl(RLOptions(steps=2, resume=True, export=str(tmp_path / "export"), **common), critic=critic,
       on_step=rows.append)

    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2] and metrics == json.loads(json.dumps(rows))
    first, second = rows
    assert [first["temperature"], second["temperature"]] == [1.0, 0.5]
    assert first["drift_kl"] == pytest.approx(0.0, abs=1e-6)           # pi_old recomputed == the start policy
    assert first["log_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert first["trained"] > 0 and first["weight_drift"] > 0 and second["weight_drift"] > 0
    assert first["truncations"] == first["families"]["brief"]["truncated"] > 0
    assert first["stop_reasons"].get("max_total_tokens", 0) <= first["truncations"]
    assert first["critic_comparisons"] > 0 and first["seed"] != second["seed"]
    assert 0.0 <= first["families"]["brief"]["rubric_score"] <= 1.0          # the check, beside the critic
    assert len(first["prompts"]) == 2 and set(first["prompts"]).isdisjoint(second["prompts"])
    assert (tmp_path / "run" / "rl.png").is_file()
    from openk2.cli import main
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png")]) == 0   # RL curves
    assert (tmp_path / "curves.png").stat().st_size > 10_000

    # the checkpoint holds latent weights; the export is the engine's model: INT4 of those weights
    latent = load_model(tmp_path / "run" / "latest")
    served = load_model(tmp_path / "export")
    start = load_model(tiny_sft)
    n_experts = 0
    for name, m in served.named_modules():
        if hasattr(m, "gate_proj_packed"):
            packed, scale = int4.compress(latent.get_submodule(name).gate_proj)
            assert torch.equal(m.gate_proj_packed, packed) and torch.equal(m.gate_proj_scale, scale)
            assert not torch.equal(int4.compress(start.get_submodule(name).gate_proj)[0], packed)
            n_experts += 1
    assert n_experts == 2
    assert not torch.equal(latent.model.embed_tokens.weight, start.model.embed_tokens.weight)
    assert torch.equal(served.model.embed_tokens.weight, latent.model.embed_tokens.weight)


def test_rollouts_that_end_in_error_are_named_in_the_metrics(tiny_sft, tmp_path):
    """A window too small for the task: every rollout ends in stop_reason "error", scores 0, and the
    step's row says which task failed and why (the step still runs: PTX alone trains)."""
    from openk2.rl import RLOptions, rl
    rows = []
    rl(RLOptions(model=str(tiny_sft), out=str(tmp_path / "run"), tasks="arith", prompts=2, samples=2, steps=1,
                 context_window=48, max_steps=2, ptx_batch=2, quiet=True), on_step=rows.append)
    (row,) = rows
    assert row["stop_reasons"] == {"error": 4} and row["reward"] == 0.0 and row["trained"] == 0
    assert len(row["errors"]) == 4 and sorted({e.split(": ", 1)[0] for e in row["errors"]}) == row["prompts"]
    assert all("does not fit the context window" in e for e in row["errors"])


def test_cli_errors_name_the_problem(tiny_sft, tmp_path, capsys):
    from openk2.cli import main
    assert main(["rl", str(tiny_sft), "--out", str(tmp_path / "a"), "--tasks", "brief"]) == 2
    assert "--critic" in capsys.readouterr().err
    assert main(["rl", str(tiny_sft), "--out", str(tmp_path / "b"), "--budget", "search=5"]) == 2
    assert "not among" in capsys.readouterr().err
    assert main(["rl", str(tiny_sft), "--out", str(tmp_path / "c"), "--samples", "1"]) == 2
    assert "--samples" in capsys.readouterr().err


def test_two_processes_equal_one_on_the_ptx_gradient(tiny_sft, tmp_path):
    """torchrun --nproc-per-node 2 (gloo) vs one process, one step. A tiny model trained on `brief`
    never answers arith, so every reward is 0 and the RL term has no gradient: the update is the PTX
    loss alone, over gold conversations 0-1 (rank 0) and 2-3 (rank 1) against 0-3 in one process,
    normalised by the global token count -- so the two runs must reach the same weights. Checks the
    gradient all-reduce, the global normalisers, the metrics gathered over ranks and rank 0's save."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from openk2.checkpoint import load_model
    from openk2.rl import RLOptions, rl
    common = ["--tasks", "arith", "--prompts", "2", "--samples", "2", "--steps", "1", "--max-steps", "1",
              "--budget", "40", "--truncation-penalty", "0", "--lr", "1e-3", "--save-every", "1", "--quiet"]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(30500 + os.getpid() % 1000), "-m", "openk2.cli", "rl", str(tiny_sft),
                        "--out", str(tmp_path / "two"), "--ptx-batch", "2", *common],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rl(RLOptions(model=str(tiny_sft), out=str(tmp_path / "one"), tasks="arith", prompts=2, samples=2, steps=1,
                     max_steps=1, budget="40", truncation_penalty=0.0, lr=1e-3, save_every=1, ptx_batch=4, quiet=True))
    finally:
        torch.set_num_threads(n)
    rows = {k: json.loads((tmp_path / k / "metrics.jsonl").read_text()) for k in ("one", "two")}
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    assert rows["one"]["n"] == rows["two"]["n"] == 4                       # all ranks' trajectories counted
    assert rows["one"]["trained"] == rows["two"]["trained"] == 0 and rows["two"]["reward"] == 0
    assert rows["two"]["ptx_loss"] == pytest.approx(rows["one"]["ptx_loss"], rel=1e-5)
    one, two, start = (load_model(p).state_dict() for p in (tmp_path / "one" / "latest", tmp_path / "two" / "latest",
                                                              tiny_sft))
    assert any(not torch.equal(one[k], start[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
