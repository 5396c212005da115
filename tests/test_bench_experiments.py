"""The analysis of the optimizer experiments (bench/exp_common.py, bench/muon_vs_adamw.py,
bench/qk_clip.py) on synthetic metrics whose answers are known exactly: a wrong window placement,
interpolation or head count changes the numbers the issue reports, so it must fail here."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import exp_common as X  # noqa: E402
import muon_vs_adamw  # noqa: E402
import qk_clip  # noqa: E402


def run(slope, sec_per_step=1.0, steps=100, tokens_per_step=100, opt_s=0.1, clipped=0, logit=1.0):
    """Loss falling linearly in steps: 10 - slope * step."""
    return [{"step": s, "tokens": s * tokens_per_step, "elapsed_s": s * sec_per_step, "loss": 10 - slope * s,
             "time_fwd_bwd_s": sec_per_step - opt_s, "time_opt_s": opt_s, "time_clip_bias_s": 0.0,
             "tokens_per_s": tokens_per_step / sec_per_step, "qk_clipped_heads": clipped, "max_logit": logit}
            for s in range(1, steps + 1)]


def test_smoothed_places_windows_at_their_middle():
    c = X.smoothed(run(0.01), 10)
    assert len(c) == 91 and c[0]["step"] == 10 and c[-1]["step"] == 100
    assert c[-1]["tokens"] == pytest.approx(9550) and c[-1]["loss"] == pytest.approx(10 - 0.01 * 95.5)
    assert X.smoothed(run(0.01, steps=3), 10)[-1]["tokens"] == pytest.approx(200)  # window shrinks to the run


def test_first_reach_interpolates_and_says_never():
    c = [{"tokens": 0, "loss": 5.0}, {"tokens": 100, "loss": 3.0}, {"tokens": 200, "loss": 2.5}]
    assert X.first_reach(c, 4.0) == pytest.approx(50)
    assert X.first_reach(c, 5.0) == 0
    assert X.first_reach(c, 2.0) is None
    assert X.loss_at(c, "tokens", 150) == pytest.approx(2.75)
    assert X.loss_at(c, "tokens", 250) is None


def test_twice_as_fast_in_tokens_gives_ratio_two():
    """Muon's loss falls twice as fast per token and its steps take 1.5x as long: 2x in tokens,
    2/1.5 in wall-clock, and at AdamW's end time Muon is at step 95.5/1.5."""
    c = X.compare(run(0.01), run(0.02, sec_per_step=1.5), window=10)
    assert c["target_loss"] == pytest.approx(9.045)
    assert c["other_tokens_to_target"] == pytest.approx(4775)
    assert c["token_ratio"] == pytest.approx(2.0)
    assert c["time_ratio"] == pytest.approx(95.5 / (47.75 * 1.5))
    assert c["equal_tokens"]["other"] == pytest.approx(10 - 0.02 * 95.5)
    assert c["equal_time"]["elapsed_s"] == pytest.approx(95.5)
    assert c["equal_time"]["other"] == pytest.approx(10 - 0.02 * 95.5 / 1.5)


def test_slower_optimizer_never_reaches():
    c = X.compare(run(0.02), run(0.01), window=10)
    assert c["other_tokens_to_target"] is None and c["token_ratio"] is None


def test_best_run_flags_the_edge_of_the_sweep():
    assert X.best_run({1e-3: 3.0, 3e-3: 2.0, 1e-2: 2.5}) == (3e-3, False)
    assert X.best_run({1e-3: 3.0, 3e-3: 2.5, 1e-2: 2.0}) == (1e-2, True)


def test_step_times_are_medians_without_the_first_step():
    rows = run(0.01, sec_per_step=2.0, opt_s=0.5)
    rows[0].update(time_fwd_bwd_s=50.0)  # warm-up outlier
    t = X.step_times(rows)
    assert t["step_s"] == pytest.approx(2.0) and t["opt_s"] == pytest.approx(0.5)


def heads_rows(tau=10.0):
    """8 steps, 2 layers x 2 heads; head (0, 1) over tau at steps 1-2, head (1, 0) at step 5."""
    table = {1: [[1, 12], [1, 1]], 2: [[1, 11], [1, 1]], 5: [[1, 1], [15, 1]]}
    rows = []
    for s in range(1, 9):
        h = table.get(s, [[1, 1], [1, 1]])
        rows.append({"step": s, "tokens": 10 * s, "elapsed_s": s, "loss": 1.0, "max_logit": max(map(max, h)),
                     "max_logit_heads": h,
                     "qk_clipped_heads": sum(x > tau for layer in h for x in layer)})
    return rows


def test_clip_stats_counts_distinct_heads_per_part():
    k = X.clip_stats(heads_rows(), tau=10.0, parts=4)
    assert (k["clip_events"], k["steps_with_clip"], k["first_clip_step"], k["last_clip_step"]) == (3, 3, 1, 5)
    assert (k["heads_total"], k["heads_ever_clipped"], k["heads_ever_clipped_frac"]) == (4, 2, 0.5)
    assert [b["heads_clipped"] for b in k["by_part"]] == [1, 0, 1, 0]
    assert [b["steps"] for b in k["by_part"]] == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert k["heads_match_events"]
    bad = heads_rows()
    bad[0]["qk_clipped_heads"] = 2
    assert not X.clip_stats(bad, tau=10.0)["heads_match_events"]


def test_logit_stats_and_paired_diff():
    s = X.logit_stats(heads_rows(), tau=10.0)
    assert (s["max_logit"], s["max_logit_step"], s["first_step_over_tau"], s["steps_over_tau"]) == (15, 5, 1, 3)
    a, b = run(0.01, steps=10), run(0.01, steps=10)
    for r in b[5:]:
        r["loss"] += 0.5
    assert X.paired_diff(a, b) == pytest.approx(0.25)
    assert X.paired_diff(a, b, from_step=6) == pytest.approx(0.5)


def test_is_complete(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert not X.is_complete(tmp_path, 3)  # no bench.json: the trainer may have been killed
    (tmp_path / "bench.json").write_text("{}")
    assert X.is_complete(tmp_path, 3) and not X.is_complete(tmp_path, 4)


def test_sweep_analysis_picks_bests_and_reports():
    runs = {"adamw-lr0.001": ("adamw", 1e-3, run(0.005)), "adamw-lr0.003": ("adamw", 3e-3, run(0.01)),
            "adamw-lr0.01": ("adamw", 1e-2, run(0.007)),
            "muonclip-lr0.003": ("muonclip", 3e-3, run(0.015, 1.2, opt_s=0.3)),
            "muonclip-lr0.01": ("muonclip", 1e-2, run(0.02, 1.2, opt_s=0.3)),
            "muonclip-lr0.03": ("muonclip", 3e-2, run(0.018, 1.2, opt_s=0.3))}
    s = muon_vs_adamw.analyse(runs, window=10)
    assert s["best"]["adamw"] == {"name": "adamw-lr0.003", "lr": 3e-3, "on_edge_of_sweep": False}
    assert s["best"]["muonclip"]["name"] == "muonclip-lr0.01"
    assert s["compare"]["token_ratio"] == pytest.approx(2.0)
    assert s["price"]["newton_schulz_s"] == pytest.approx(0.2) and s["price"]["step_ratio"] == pytest.approx(1.2)
    s.update(machine={"cpu": "test", "cpus": 2, "torch": "x", "commit": "abc", "date": "today"}, threads=2,
             steps=100, batch=1, seq_len=100, tokens_per_step=100, window=10,
             params={"total_params": 4e6, "active_params": 2e6})
    md = muon_vs_adamw.report(s)
    assert "2.00x" in md and "adamw-lr0.003 **best**" in md


def test_qk_analysis_and_report():
    plain = heads_rows()
    clip = heads_rows()
    for r in clip[4:]:
        r["loss"] = 0.9
    s = qk_clip.analyse(plain, clip, tau=10.0, window=2)
    assert s["muonclip"]["clip"]["heads_ever_clipped"] == 2
    assert s["loss_diff_after_first_clip"] == pytest.approx(-0.05)
    assert s["loss_diff_last_window"] == pytest.approx(-0.1)
    s.update(names={"muon": "a", "muonclip": "b"}, lr=0.05, tau=10.0, steps=8, batch=1, seq_len=4, threads=1,
             window=2, params={"total_params": 4e6}, machine={"cpu": "t", "cpus": 2, "torch": "x", "commit": "c",
                                                             "date": "d"})
    md = qk_clip.report(s)
    assert "2/4 (50%)" in md and "Warning" not in md


def test_rl_compare_pairs_tasks_by_id_and_pools_a_total():
    import rl_compare

    def ev(rewards, order=1):
        tasks = [{"id": f"t{i}", "family": "arith" if i < 4 else "code", "difficulty": 1 + i % 2, "reward": r,
                  "generated_tokens": 10 * (i + 1), "stop_reason": "answer"} for i, r in enumerate(rewards)]
        return {"model": "m", "tasks": tasks[::order]}

    before, after = ev([1, 0, 0, 1, 0, 1]), ev([1, 1, 0, 0, 1, 1], order=-1)  # after listed backwards
    rows = {(r["family"], r["difficulty"]): r for r in rl_compare.compare(before, after)}
    total = rows[("all", "all")]
    assert total["n"] == 6 and total["before"] == pytest.approx(0.5) and total["after"] == pytest.approx(4 / 6)
    d = [0, 1, 0, -1, 1, 0]  # per-task after - before, paired by id whatever the order
    mean = sum(d) / 6
    sd = (sum((x - mean) ** 2 for x in d) / 5) ** 0.5
    assert total["gain"] == pytest.approx(mean) and total["gain_se"] == pytest.approx(sd / 6 ** 0.5)
    assert rows[("arith", "all")]["n"] == 4 and rows[("code", 1)]["n"] == 1
    assert rows[("arith", 2)]["gain"] == pytest.approx(0.0)  # t1 +1, t3 -1
    with pytest.raises(SystemExit, match="differ in tasks"):
        rl_compare.compare(before, {"model": "m", "tasks": after["tasks"][:5]})
