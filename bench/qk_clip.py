"""Issue 5, experiment 2: does QK-Clip stop attention logits from exploding without hurting the loss (K2)?

    nice -n 19 python bench/qk_clip.py --work runs/exp-muon [--lr 5e-2 --tau 25 --steps 150 --batch 8]
    python bench/qk_clip.py --work /tmp/exp-quick --quick        # the pipeline in about a minute

Same fixed data and model as bench/muon_vs_adamw.py (bench/exp_common.py; the same --work shares
them). Two runs at a learning rate high enough that plain Muon's max attention logit grows past tau:
`--optimizer muon` (no clip) and `--optimizer muonclip --qk-clip-tau TAU`, same seed, so both see
the same batches. K2's tau is 100 on a 1T model; at this scale and at the learning rates that train
it well the logits stay far below that, so the experiment uses a lower tau (default 25) and a high
lr (default 5e-2: in 30-step probes with 4 rows a step, unclipped Muon's max logit went 8.7 at
step 16, 17.7 at 21, 31 at 26, 41 at 30; at 3e-2 it was 19.5 at step 30; at 1e-2, 5.3 at step 35).

Reports, per run: the largest max logit logged (the forward before that step's clip), when it
first passed tau, the smoothed final loss, and the per-step loss difference (same batches, so the
noise cancels); for the MuonClip run, how many heads were ever clipped, overall and per quarter of
the run (K2: 12.7% of heads early, none later). Writes WORK/qk_clip.{json,md} and WORK/plots/qk_clip.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exp_common as X  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="directory for data, runs, logs, plots and the summary")
    ap.add_argument("--lr", type=float, default=5e-2, help="peak lr of both runs (default 5e-2)")
    ap.add_argument("--tau", type=float, default=25.0, help="QK-Clip threshold (default 25)")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150: ~3 min, estimated)")
    ap.add_argument("--batch", type=int, default=8, help="rows of 512 tokens per step (default 8)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of the runs")
    ap.add_argument("--data-scale", type=float, default=1.0, help="multiply the conversations per family")
    ap.add_argument("--window", type=int, default=10, help="steps in the loss smoothing window (default 10)")
    ap.add_argument("--quick", action="store_true", help="tiny data and runs (tau 0.3, so clipping happens), "
                                                         "in WORK/quick: checks the pipeline")
    a = ap.parse_args(argv)
    work_dir = Path(a.work)
    if a.quick:
        # tau 0.3: the logits of a 4-step run stay near their initial ~0.3, and the clip path must run
        work_dir, a.steps, a.batch, a.data_scale, a.window, a.tau = work_dir / "quick", 4, 2, 0.03, 2, 0.3

    w = X.Work(work_dir, a.threads)
    data = w.make_data(a.data_scale)
    config, params = w.write_config()
    print(f"model: {params['total_params'] / 1e6:.2f}M parameters, {config}", flush=True)
    data_info = w.check_data(a.steps, a.batch)

    plan = f"lr{a.lr:g}-{a.steps}x{a.batch}"
    plain, clip = f"qk-muon-{plan}", f"qk-muonclip-tau{a.tau:g}-{plan}"
    rows_plain = w.train(plain, config, a.steps, a.batch, "muon", a.lr)
    rows_clip = w.train(clip, config, a.steps, a.batch, "muonclip", a.lr, tau=a.tau)

    s = analyse(rows_plain, rows_clip, a.tau, a.window)
    s.update({"names": {"muon": plain, "muonclip": clip}, "lr": a.lr, "tau": a.tau, "steps": a.steps,
              "batch": a.batch, "seq_len": X.SEQ_LEN, "threads": a.threads, "window": a.window, "params": params,
              "machine": X.machine(), "data": {**data["recipe"], **data_info}, "commands": w.commands,
              "run_info": {n: w.run_info(n) for n in (plain, clip)},
              "plot": str(w.plot([plain, clip], "qk_clip.png"))})
    md = report(s)
    (w.root / "qk_clip.json").write_text(json.dumps(s, indent=1) + "\n")
    (w.root / "qk_clip.md").write_text(md)
    print("\n" + md)
    print(f"wrote {w.root / 'qk_clip.json'}, {w.root / 'qk_clip.md'}, plot {s['plot']}")
    return 0


def analyse(rows_plain: list[dict], rows_clip: list[dict], tau: float, window: int) -> dict:
    first_clip = X.clip_stats(rows_clip, tau)["first_clip_step"]
    return {
        "muon": {"final_loss": X.final_loss(rows_plain, window), **X.logit_stats(rows_plain, tau),
                 "heads_over_tau": X.clip_stats(rows_plain, tau, clipping=False)},
        "muonclip": {"final_loss": X.final_loss(rows_clip, window), **X.logit_stats(rows_clip, tau),
                     "clip": X.clip_stats(rows_clip, tau)},
        # > 0: the clipped run's loss is higher, on the same batches
        "loss_diff_all_steps": X.paired_diff(rows_plain, rows_clip),
        "loss_diff_after_first_clip": None if first_clip is None else X.paired_diff(rows_plain, rows_clip, first_clip),
        "loss_diff_last_window": X.paired_diff(rows_plain, rows_clip, rows_clip[-1]["step"] - window + 1),
    }


def _f(x, fmt="{:.4f}"):
    return "n/a" if x is None else fmt.format(x)


def report(s: dict) -> str:
    m, p, c = s["machine"], s["muon"], s["muonclip"]
    k = c["clip"]
    lines = [f"lr {s['lr']:g}, tau {s['tau']:g}; {s['steps']} steps x {s['batch']}x{s['seq_len']} tokens; "
             f"{s['params']['total_params'] / 1e6:.2f}M parameters; loss on all tokens, smoothed over {s['window']} "
             f"steps; {m['cpu']}, {m['cpus']} CPUs, {s['threads']} threads; torch {m['torch']}; commit {m['commit']}; "
             f"{m['date']}.", "",
             "| run | final loss | max logit (step) | first step > tau | steps > tau | last-step max logit | "
             "heads ever > tau |", "|---|---|---|---|---|---|---|"]
    for name, r, heads in ((s["names"]["muon"], p, p["heads_over_tau"]), (s["names"]["muonclip"], c, k)):
        ever = (f"{heads['heads_ever_clipped']}/{heads['heads_total']} ({heads['heads_ever_clipped_frac']:.0%})"
                if heads.get("heads_total") else "n/a")
        lines.append(f"| {name} | {r['final_loss']:.4f} | {r['max_logit']:.1f} ({r['max_logit_step']}) | "
                     f"{_f(r['first_step_over_tau'], '{}')} | {r['steps_over_tau']} | {r['final_max_logit']:.1f} | "
                     f"{ever} |")
    lines += ["", f"Loss of MuonClip minus Muon on the same batches (mean per step): all steps "
                  f"{_f(s['loss_diff_all_steps'], '{:+.4f}')}, from the first clip "
                  f"{_f(s['loss_diff_after_first_clip'], '{:+.4f}')}, "
                  f"last {s['window']} steps {_f(s['loss_diff_last_window'], '{:+.4f}')}.", "",
              f"QK-Clip: {k['clip_events']} head rescalings in {k['steps_with_clip']} steps "
              f"(first {_f(k['first_clip_step'], '{}')}, last {_f(k['last_clip_step'], '{}')})."]
    if k.get("by_part"):
        lines += ["", "| steps | heads clipped at least once | share of heads |", "|---|---|---|"]
        lines += [f"| {b['steps'][0]}-{b['steps'][1]} | {b['heads_clipped']}/{k['heads_total']} | {b['frac']:.0%} |"
                  for b in k["by_part"]]
        if not k.get("heads_match_events", True):
            lines.append("\nWarning: the per-head maxima do not account for the logged clip counts.")
    lines += ["", "The max logit logged at a step is that step's forward, before its clip: with QK-Clip it can "
                  "exceed tau by one update's growth, and the clip then brings those heads back to tau."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
