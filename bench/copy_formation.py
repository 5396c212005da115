"""When did the copy circuit form? The SFT step at which a run's loss drops off its plateau, read
from each run's metrics.jsonl.

k2-nano's SFT loss (on the model's own tokens) sits on a plateau near 1.2 until the model learns to
copy names from its context (an induction circuit), then falls within a few hundred steps. When
that happens varies by draw, and the draw's eval tracks it (docs/results.md, "What decides a draw"):
SFT step 600 -> 38/120, 1100 -> 23/120, 2700 -> 0/120 in three runs. The formation step
(openk2.speedrun.formation_step, also in a speedrun's report.md) is where the first window of
`--window` steps whose mean loss is `--drop` below the first window's starts; a run that never
gets there says "not formed"; one whose first SFT steps are already well under the plateau (mean < 0.9)
formed it in pretraining, as the speedrun's 2400-step pretraining does in every seed tried.

    python bench/copy_formation.py runs/nano10/sft runs/nano14/sft [--window 100] [--drop 0.25]
"""

import argparse
import statistics

from openk2.plot import read_metrics
from openk2.speedrun import describe_formation


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="training output directories (each with a metrics.jsonl)")
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--drop", type=float, default=0.25)
    a = ap.parse_args()
    for run in a.runs:
        ls = [r["loss"] for r in read_metrics(run) if "loss" in r]
        last = statistics.fmean(ls[-a.window:])
        print(f"{run}: {describe_formation(ls, a.window, a.drop)}; last {a.window} steps' mean {last:.3f}")


if __name__ == "__main__":
    main()
