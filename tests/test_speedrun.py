"""`openk2 speedrun --quick`: the whole k2-nano recipe on the code path that ships, at tiny sizes.

One run (~5 minutes on 2 cores) checks every stage hands the next what it needs, that the
exported model is a compressed-tensors INT4 checkpoint the agent can load, that the report holds
the eval table, and that a second invocation resumes (finished stages are skipped, not redone).
"""

import json
from pathlib import Path

import pytest

from openk2.cli import main
from openk2.speedrun import STAGES, describe_formation, formation_step


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun")
    assert main(["speedrun", "--quick", "--out", str(out)]) == 0
    return out


def test_quick_speedrun_produces_a_loadable_int4_model_and_a_report(quick_run):
    from openk2.checkpoint import load_model

    for stage in STAGES:
        assert (quick_run / f"{stage}.done").exists(), stage
    model_dir = quick_run / "k2-nano"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    assert (model_dir / "tokenizer.json").exists()
    assert not list(model_dir.glob("*.pt")) and not (model_dir / "trainer.json").exists()   # a model, not a run
    model = load_model(model_dir)
    assert any("Int4" in type(m).__name__ for m in model.modules())
    result = json.loads((quick_run / "eval.json").read_text())
    assert result["tasks"] and all("reward" in t for t in result["tasks"])
    assert set(result["families"]) == {"arith", "chain", "search", "code"}
    report = (quick_run / "report.md").read_text()
    assert "| family | difficulty |" in report                       # the eval table
    assert "Copy circuit not formed in 6 SFT steps" in report          # shorter than one window
    card = (model_dir / "README.md").read_text()
    assert "openk2 speedrun --quick" in card and "| family | difficulty |" in card
    assert "pretrain" in report and "loss.png" in report and (quick_run / "loss.png").stat().st_size > 0
    # the pretraining stage trains on every token, SFT only on the model's own tokens
    pre = json.loads((quick_run / "pretrain" / "run.json").read_text())["options"]
    sft = json.loads((quick_run / "sft" / "run.json").read_text())["options"]
    assert pre["loss_on"] == "all" and sft["loss_on"] == "masked" and sft["init"]
    # the RL stage runs with the plan's rollout temperatures and seed (QUICK sets non-default ones)
    rl = json.loads((quick_run / "rl" / "run.json").read_text())["options"]
    assert (rl["temperature"], rl["temperature_end"], rl["seed"]) == (0.8, 0.4, 3)


def test_quick_speedrun_pretrains_two_draws_and_sft_starts_from_the_kept_one(quick_run):
    sel = json.loads((quick_run / "select.json").read_text())
    assert sel["seeds"] == [0, 1] and len(sel["losses"]) == 2 and sel["winner"] == sel["losses"].index(min(sel["losses"]))
    other = quick_run / "draw1"
    assert (other / "data").resolve() == (quick_run / "data").resolve()        # the same data, another seed
    assert json.loads((other / "pretrain" / "run.json").read_text())["options"]["seed"] == 1
    assert json.loads((other / "plan.json").read_text())["draws"] == 1
    assert not (other / "sft").exists() and not (other / "branch.pid").exists()   # only pretraining is drawn twice
    # the gold is held out: the train split at another seed than the run's data
    gold = [json.loads(line) for line in (quick_run / "select" / "gold.jsonl").read_text().splitlines()]
    data = {line for line in (quick_run / "data" / "arith.jsonl").read_text().splitlines()}
    assert gold and not any(json.dumps(g) in data for g in gold)
    assert {r["checkpoint"] for r in json.loads((quick_run / "select" / "loss.json").read_text())["results"]} == {
        str(quick_run / "pretrain" / "latest"), str(other / "pretrain" / "latest")}
    kept = quick_run if sel["winner"] == 0 else other
    sft = json.loads((quick_run / "sft" / "run.json").read_text())["options"]
    assert Path(sft["init"]).resolve() == (kept / "pretrain" / "latest").resolve()
    rl = json.loads((quick_run / "rl" / "run.json").read_text())["options"]
    assert Path(rl["model"]).resolve() == (quick_run / "k2-nano-sft").resolve()
    assert "## Draws: 2 pretrained, one kept" in (quick_run / "report.md").read_text()


def test_the_kept_draw_is_the_one_select_wrote(tmp_path):
    from dataclasses import replace

    from openk2.speedrun import QUICK, Run

    run = Run(tmp_path, replace(QUICK, draws=3), quick=True)
    with pytest.raises(SystemExit, match="run the select stage"):
        run.best
    (tmp_path / "select.json").write_text(json.dumps({"winner": 2}))
    assert run.best == tmp_path / "draw2"
    one = Run(tmp_path / "one", replace(QUICK, draws=1), quick=True)
    assert one.best == tmp_path / "one"
    one.select()                                             # one draw: nothing to evaluate or choose
    assert not (tmp_path / "one" / "select").exists() and not (tmp_path / "one" / "select.json").exists()
    with pytest.raises(SystemExit, match="data and tokenizer"):
        run.start_branches()


def test_a_draw_left_running_is_recognised_and_a_stale_pid_is_not(tmp_path):
    import subprocess
    import sys

    from openk2.speedrun import _alive

    pid = tmp_path / "branch.pid"
    assert not _alive(pid)                                   # no file
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "speedrun"])
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pid.write_text(str(other.pid))
        assert _alive(pid)
        pid.write_text(str(unrelated.pid))                   # a reused pid: not our draw
        assert not _alive(pid)
    finally:
        other.kill(), unrelated.kill(), other.wait(), unrelated.wait()
    pid.write_text(str(other.pid))
    assert not _alive(pid)                                   # finished


def test_quick_speedrun_resumes_without_redoing_stages(quick_run, capsys):
    before = (quick_run / "k2-nano" / "config.json").stat().st_mtime_ns
    assert main(["speedrun", "--quick", "--out", str(quick_run)]) == 0
    said = capsys.readouterr().out
    assert said.count("done earlier, skipped") == len(STAGES)
    assert (quick_run / "k2-nano" / "config.json").stat().st_mtime_ns == before


def test_unknown_stage_is_refused(tmp_path, capsys):
    assert main(["speedrun", "--quick", "--out", str(tmp_path), "--stages", "pretrain,nope"]) != 0
    assert "unknown stage(s) ['nope']" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.done"))  # refused before any stage ran


def test_set_changes_one_setting_and_a_run_keeps_its_plan(tmp_path, capsys):
    from openk2.speedrun import FULL, Run, with_overrides

    plan = with_overrides(FULL, ["extra_tools=0.3", "rl_steps=80", "rl_budget=arith=400,code=500"])
    assert (plan.extra_tools, plan.rl_steps, plan.rl_budget) == (0.3, 80, "arith=400,code=500")
    assert plan.sft_steps == FULL.sft_steps
    with pytest.raises(ValueError, match="NAME=VALUE"):
        with_overrides(FULL, ["no_such_setting=1"])
    with pytest.raises(ValueError, match="rl_steps takes int values"):
        with_overrides(FULL, ["rl_steps=many"])
    Run(tmp_path, plan, quick=False)
    Run(tmp_path, plan, quick=False)                       # the same plan resumes
    with pytest.raises(SystemExit, match="extra_tools 0.3 -> 0.0"):
        Run(tmp_path, FULL, quick=False)
    assert main(["speedrun", "--out", str(tmp_path / "x"), "--set", "nope=1", "--stages", "report"]) != 0
    assert "NAME=VALUE" in capsys.readouterr().err


def test_copy_formation_finds_the_drop_and_says_never():
    plateau, fallen = [1.2] * 300, [0.8] * 200
    assert formation_step(plateau + fallen) == 300
    assert formation_step(plateau + [0.94] * 200) == 300          # 0.26 below: formed
    assert formation_step(plateau + [0.97] * 200) is None          # 0.23 below: not yet
    assert formation_step([1.2] * 350 + fallen) == 400             # only full windows count
    assert formation_step([1.0] * 50) is None                      # shorter than one window
    assert formation_step([0.6] * 300) == 0                        # under the plateau from the start: pretraining
    assert "formed before SFT, in pretraining (first 100 steps' mean loss 0.60" in describe_formation([0.6] * 300)
    assert "formed at SFT step 300 of 500" in describe_formation(plateau + fallen)


def test_nothing_runs_on_after_the_command_returns(tmp_path):
    """--stages ending before select: the other draw, started beside pretraining, is stopped (it
    resumes on the next invocation) rather than left training in the background."""
    from openk2.speedrun import _alive

    assert main(["speedrun", "--quick", "--out", str(tmp_path), "--stages", "data,tokenizer,pretrain"]) == 0
    assert (tmp_path / "pretrain.done").exists() and (tmp_path / "draw1" / "branch.pid").exists()
    assert not _alive(tmp_path / "draw1" / "branch.pid")
    # the next invocation resumes it and select waits for it
    assert main(["speedrun", "--quick", "--out", str(tmp_path), "--stages", "select"]) == 0
    assert (tmp_path / "draw1" / "pretrain.done").exists() and (tmp_path / "select.json").exists()


def test_pretraining_shares_the_cores_and_sft_has_them_all_from_the_kept_draw(tmp_path, monkeypatch):
    from dataclasses import replace

    from openk2.speedrun import QUICK, Run, _threads

    run = Run(tmp_path, replace(QUICK, draws=2), quick=True)
    ran = []
    monkeypatch.setattr(run, "sh", lambda stage, cmd, env=None: ran.append((stage, cmd, env)))
    (tmp_path / "select.json").write_text(json.dumps({"winner": 1}))
    run.pretrain(), run.sft(), run.qat()
    envs = {stage: env for stage, _, env in ran}
    assert envs == {"pretrain": {"OMP_NUM_THREADS": str(_threads(2))}, "sft": None, "qat": None}
    sft_cmd = [str(c) for c in ran[1][1]]
    assert sft_cmd[sft_cmd.index("--init") + 1] == str(tmp_path / "draw1" / "pretrain" / "latest")
