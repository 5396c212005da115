"""When did the copy circuit form? The SFT step at which a run's loss drops off its plateau, read
from each run's metrics.jsonl.

k2-nano's SFT loss (on the model's own tokens) sits on a plateau near 1.2 until the model learns to
copy names from its context (an induction circuit), then falls within a few hundred steps. When
that happens varies by draw, and the draw's eval tracks it (docs/results.md, "What decides a draw"):
SFT step 600 -> 38/120, 1100 -> 23/120, 2700 -> 0/120 in three runs. The formation step is the first window
of `--window` steps whose mean loss is `--drop` below the first window's; a run that never gets
there prints "not by STEP" (its last step).

    python bench/copy_formation.py runs/nano10/sft runs/nano14/sft [--window 100] [--drop 0.25]
"""

import argparse
import json
import statistics
from pathlib import Path


def formation_step(losses: list[float], window: int = 100, drop: float = 0.25) -> int | None:
    """Where the first full window whose mean loss is `drop` below the first window's starts, as
    the number of steps before it (a multiple of window); None if there is no such window."""
    means = [statistics.fmean(losses[i:i + window]) for i in range(0, len(losses) - window + 1, window)]
    if not means:
        return None
    return next((k * window for k, m in enumerate(means) if m <= means[0] - drop), None)


def losses(run_dir: str) -> list[float]:
    rows = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return [r["loss"] for r in sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="training output directories (each with a metrics.jsonl)")
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--drop", type=float, default=0.25)
    a = ap.parse_args()
    for run in a.runs:
        ls = losses(run)
        step = formation_step(ls, a.window, a.drop)
        first = statistics.fmean(ls[:a.window]) if ls else float("nan")
        last = statistics.fmean(ls[-a.window:]) if ls else float("nan")
        said = f"step {step}" if step is not None else f"not by {len(ls)}"
        print(f"{run}: formed {said}; loss first {a.window} steps {first:.3f}, last {a.window} {last:.3f}")


if __name__ == "__main__":
    main()
