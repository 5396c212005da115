"""Issue 5, experiment 1: is Muon(Clip) ~2x more token-efficient than AdamW at our scale (Moonlight)?

    nice -n 19 python bench/muon_vs_adamw.py --work runs/exp-muon [--steps 150 --batch 8 --threads 2]
    python bench/muon_vs_adamw.py --work /tmp/exp-quick --quick     # the whole pipeline in ~1-2 minutes

1. makes the fixed data once (bench/exp_common.py: gym trajectories of all four families, a
   2048-id tokenizer) and the fixed ~4M-parameter K2-shaped MoE config;
2. trains it with AdamW and with MuonClip, 3 peak learning rates each, same seed, data order, steps
   and batch (`openk2 train ... --loss-on all`); MuonClip runs with K2's tau 100, which at these
   learning rates is expected never to bind (the report says whether it did: if not, this is plain
   Muon). The default grids are factors of 2 around the best of 30-step probes (4 rows a step, 1
   thread; mean loss of steps 21-30): AdamW 3e-3 1.71, 6e-3 2.08, 1e-2 4.34 (its max logit reached
   64 by step 30); Muon 1e-2 1.38, 3e-2 1.49, 5e-2 1.54. The report flags a best lr at the edge of
   its grid: then widen it (--adamw-lrs, --muon-lrs);
3. picks each optimizer's best lr by smoothed final loss and compares the two bests: tokens (and
   seconds) MuonClip needs to reach AdamW's final loss, losses at equal tokens and at equal
   wall-clock, and the median time per step of each (Newton-Schulz's price on CPU);
4. prints a Markdown table, writes WORK/muon_vs_adamw.{json,md} and plots WORK/plots/{best,sweep}.png.

Runs that finished are reused, so the script can be stopped and started again, or re-run to
re-analyse. Default --steps 150 at --batch 8 (4096 tokens a step) is an estimate of ~3 minutes a
run on 2 quiet cores, scaled from ~2,500 tokens/s measured with 1 thread on a loaded machine
(see docs/experiments_draft.md); check the first run's log and adjust. Wall-clock comparisons are
only as good as the machine is quiet: each run records the load average before and after it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import exp_common as X  # noqa: E402


def parse_lrs(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="directory for data, runs, logs, plots and the summary")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150: ~3 min, estimated)")
    ap.add_argument("--batch", type=int, default=8, help="rows of 512 tokens per step (default 8)")
    ap.add_argument("--adamw-lrs", default="1.5e-3,3e-3,6e-3", help="peak lrs for AdamW (comma-separated)")
    ap.add_argument("--muon-lrs", default="5e-3,1e-2,2e-2", help="peak lrs for MuonClip (on AdamW's scale: "
                                                               "openk2.muon matches AdamW's update RMS)")
    ap.add_argument("--muon-tau", type=float, default=100.0, help="MuonClip's tau (default 100, K2's)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of the runs "
                                                                        "(default: all cores)")
    ap.add_argument("--data-scale", type=float, default=1.0, help="multiply the conversations per family")
    ap.add_argument("--window", type=int, default=10, help="steps in the loss smoothing window (default 10)")
    ap.add_argument("--quick", action="store_true", help="tiny data and runs, in WORK/quick: checks the pipeline")
    a = ap.parse_args(argv)
    work_dir = Path(a.work)
    if a.quick:
        work_dir, a.steps, a.batch, a.data_scale, a.window = work_dir / "quick", 4, 2, 0.03, 2

    w = X.Work(work_dir, a.threads)
    data = w.make_data(a.data_scale)
    config, params = w.write_config()
    print(f"model: {params['total_params'] / 1e6:.2f}M parameters ({params['active_params'] / 1e6:.2f}M active), "
          f"{config}", flush=True)
    data_info = w.check_data(a.steps, a.batch)

    runs = {}  # name -> (optimizer, lr, rows)
    for opt, lrs in (("adamw", parse_lrs(a.adamw_lrs)), ("muonclip", parse_lrs(a.muon_lrs))):
        for lr in lrs:
            name = f"{opt}-lr{lr:g}-{a.steps}x{a.batch}"  # another plan in the same WORK gets its own runs
            rows = w.train(name, config, a.steps, a.batch, opt, lr, tau=a.muon_tau if opt == "muonclip" else None)
            runs[name] = (opt, lr, rows)

    summary = analyse(runs, a.window)
    summary.update({"machine": X.machine(), "threads": a.threads, "steps": a.steps, "batch": a.batch,
                    "seq_len": X.SEQ_LEN, "tokens_per_step": a.batch * X.SEQ_LEN, "muon_tau": a.muon_tau,
                    "window": a.window, "params": params, "data": {**data["recipe"], **data_info},
                    "commands": w.commands,
                    "run_info": {n: w.run_info(n) for n in runs}})
    best = [summary["best"]["adamw"]["name"], summary["best"]["muonclip"]["name"]]
    summary["plots"] = {"best": str(w.plot(best, "best.png")), "sweep": str(w.plot(list(runs), "sweep.png"))}
    md = report(summary)
    (w.root / "muon_vs_adamw.json").write_text(json.dumps(summary, indent=1) + "\n")
    (w.root / "muon_vs_adamw.md").write_text(md)
    print("\n" + md)
    print(f"wrote {w.root / 'muon_vs_adamw.json'}, {w.root / 'muon_vs_adamw.md'}, plots in {w.plots}")
    return 0


def analyse(runs: dict, window: int) -> dict:
    """Per-run final loss and step times; each optimizer's best lr; the best pair compared."""
    table = {}
    for name, (opt, lr, rows) in runs.items():
        table[name] = {"optimizer": opt, "lr": lr, "final_loss": X.final_loss(rows, window),
                       "last_loss": rows[-1]["loss"], "tokens": rows[-1]["tokens"],
                       "elapsed_s": rows[-1]["elapsed_s"], "clip_events": sum(r["qk_clipped_heads"] for r in rows),
                       "max_logit": max(r["max_logit"] for r in rows), **X.step_times(rows)}
    best = {}
    for opt in ("adamw", "muonclip"):
        finals = {t["lr"]: t["final_loss"] for t in table.values() if t["optimizer"] == opt}
        lr, edge = X.best_run(finals)
        best[opt] = {"name": next(n for n, t in table.items() if t["optimizer"] == opt and t["lr"] == lr),
                     "lr": lr, "on_edge_of_sweep": edge}
    a_rows, m_rows = runs[best["adamw"]["name"]][2], runs[best["muonclip"]["name"]][2]
    cmp = X.compare(a_rows, m_rows, window)
    ta, tm = table[best["adamw"]["name"]], table[best["muonclip"]["name"]]
    price = {"step_s_adamw": ta["step_s"], "step_s_muon": tm["step_s"], "step_ratio": tm["step_s"] / ta["step_s"],
             "opt_s_adamw": ta["opt_s"], "opt_s_muon": tm["opt_s"],
             "newton_schulz_s": tm["opt_s"] - ta["opt_s"],
             "newton_schulz_frac_of_muon_step": (tm["opt_s"] - ta["opt_s"]) / tm["step_s"]}
    return {"runs": table, "best": best, "compare": cmp, "price": price}


def _f(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)


def report(s: dict) -> str:
    """The Markdown for docs/results.md: the sweep, the best pair, the price of Newton-Schulz."""
    m = s["machine"]
    lines = [f"{s['steps']} steps x {s['batch']}x{s['seq_len']} tokens ({s['steps'] * s['tokens_per_step']:,} tokens) "
             f"per run; {s['params']['total_params'] / 1e6:.2f}M parameters ({s['params']['active_params'] / 1e6:.2f}M "
             f"active); loss on all tokens, smoothed over {s['window']} steps; {m['cpu']}, {m['cpus']} CPUs, "
             f"{s['threads']} threads; torch {m['torch']}; commit {m['commit']}; {m['date']}.", "",
             "| run | peak lr | final loss | last-step loss | median step s | median optimizer s | tokens/s | "
             "run s | max logit | QK-Clip events |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in s["runs"].items():
        star = " **best**" if name in (s["best"]["adamw"]["name"], s["best"]["muonclip"]["name"]) else ""
        lines.append(f"| {name}{star} | {t['lr']:g} | {t['final_loss']:.4f} | {t['last_loss']:.4f} | "
                     f"{t['step_s']:.3f} | "
                     f"{t['opt_s']:.3f} | {t['tokens_per_s']:.0f} | {t['elapsed_s']:.0f} | {t['max_logit']:.1f} | "
                     f"{t['clip_events']} |")
    c, p = s["compare"], s["price"]
    lines += ["", f"Best AdamW: lr {s['best']['adamw']['lr']:g}; best MuonClip: lr {s['best']['muonclip']['lr']:g}."]
    for opt in ("adamw", "muonclip"):
        if s["best"][opt]["on_edge_of_sweep"]:
            lines.append(f"Note: {opt}'s best lr is at the edge of its sweep; the optimum may lie outside it.")
    eq_n, eq_t = c["equal_tokens"], c["equal_time"]
    lines += ["", "| | AdamW (best) | MuonClip (best) |", "|---|---|---|",
              f"| loss at equal tokens ({eq_n['tokens']:,.0f}) | {_f(eq_n['base'], '{:.4f}')} "
              f"| {_f(eq_n['other'], '{:.4f}')} |",
              f"| loss at equal wall-clock ({eq_t['elapsed_s']:.0f} s) | {_f(eq_t['base'], '{:.4f}')} "
              f"| {_f(eq_t['other'], '{:.4f}')} |",
              f"| tokens to reach AdamW's final loss {c['target_loss']:.4f} | {c['base_tokens']:,.0f} | "
              f"{_f(c['other_tokens_to_target'], '{:,.0f}')} |",
              f"| seconds to reach it | {c['base_elapsed_s']:.0f} | {_f(c['other_elapsed_s_to_target'], '{:.0f}')} |",
              f"| median step time | {p['step_s_adamw']:.3f} s | {p['step_s_muon']:.3f} s |",
              f"| median optimizer time per step | {p['opt_s_adamw']:.3f} s | {p['opt_s_muon']:.3f} s |", "",
              f"Token efficiency, MuonClip over AdamW: {_f(c['token_ratio'], '{:.2f}x')} (Moonlight: ~2x); "
              f"wall-clock: {_f(c['time_ratio'], '{:.2f}x')}. Newton-Schulz (MuonClip's optimizer time minus "
              f"AdamW's) costs {p['newton_schulz_s'] * 1e3:.0f} ms a step, {p['newton_schulz_frac_of_muon_step']:.1%} "
              f"of a MuonClip step; a MuonClip step takes {p['step_ratio']:.2f}x an AdamW step.",
              "", "Windows are placed at their mean token count / elapsed time; 'n/a': never reached."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
