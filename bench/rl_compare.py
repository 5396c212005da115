"""Did RL help? Two `openk2 eval --json` results of the same tasks (before = the baseline, after = the
RL model), compared per family and difficulty with standard errors.

The two evals must use the same tasks (same --tasks, --difficulty, --n, --seed): tasks are paired by
id, so the change in accuracy is the mean of per-task differences (after - before, each -1, 0 or
+1) and its standard error is that of a paired mean, sd(d) / sqrt(n), much tighter than comparing
two independent accuracies. Accuracies are shown with their own binomial standard error
sqrt(p (1 - p) / n). Tokens: mean generated tokens per task, before and after, with the paired
standard error of the change.

BEFORE and AFTER may also be two folders of results with the same file names (what
bench/rl_eval.sh writes): each file is paired with its namesake and the per-task differences of all
files are pooled per family and level (a level's n is then the total over the files).

    python bench/rl_compare.py before.json after.json [--markdown]
    python bench/rl_compare.py runs/eval-before/ runs/eval-after/
"""

from __future__ import annotations

import argparse
import json
import math
import os


def paired(before: list, after: list) -> tuple[float, float]:
    d = [a - b for a, b in zip(after, before)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    return mean, sd / math.sqrt(n)


def binom_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def compare(before: dict | list, after: dict | list) -> list[dict]:
    """Rows for all tasks, then per family and level; before/after are one eval result each, or
    equally long lists of results paired in order (pooled)."""
    if isinstance(before, dict):
        before, after = [before], [after]
    pairs = []                                  # (before task, after task)
    for b_res, a_res in zip(before, after, strict=True):
        a_by = {t["id"]: t for t in a_res["tasks"]}
        missing = [t["id"] for t in b_res["tasks"] if t["id"] not in a_by]
        if missing:
            raise SystemExit(f"the evals differ in tasks (e.g. {missing[:3]}): run both with the same "
                             "--tasks, --difficulty, --n and --seed")
        pairs += [(t, a_by[t["id"]]) for t in b_res["tasks"]]
    rows = []
    groups: dict = {}
    for bt_, at_ in pairs:
        groups.setdefault(("all", None), []).append((bt_, at_))  # every task: the pooled total
        groups.setdefault((bt_["family"], None), []).append((bt_, at_))
        groups.setdefault((bt_["family"], bt_["difficulty"]), []).append((bt_, at_))
    for (fam, level), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])):
        ts = [b for b, _ in ps]
        b = [t["reward"] for t in ts]
        a = [x["reward"] for _, x in ps]
        bt = [t["generated_tokens"] for t in ts]
        at = [x["generated_tokens"] for _, x in ps]
        n = len(ts)
        pb, pa = sum(b) / n, sum(a) / n
        gain, gain_se = paired(b, a)
        dt, dt_se = paired(bt, at)
        rows.append({"family": fam, "difficulty": "all" if level is None else level, "n": n,
                     "before": pb, "before_se": binom_se(pb, n), "after": pa, "after_se": binom_se(pa, n),
                     "gain": gain, "gain_se": gain_se, "tokens_before": sum(bt) / n, "tokens_after": sum(at) / n,
                     "tokens_change": dt, "tokens_change_se": dt_se,
                     "budget_stops_before": sum(t["stop_reason"] in ("max_total_tokens", "max_step_tokens", "max_steps")
                                                for t in ts),
                     "budget_stops_after": sum(x["stop_reason"] in ("max_total_tokens", "max_step_tokens",
                                                                     "max_steps") for _, x in ps)})
    return rows


def table(rows: list[dict], markdown: bool) -> str:
    head = ["family", "difficulty", "n", "accuracy before", "accuracy after", "change (points)",
            "gen tokens before", "gen tokens after", "change"]
    lines = []
    for r in rows:
        z = f" ({r['gain'] / r['gain_se']:+.1f} SE)" if r["gain_se"] > 0 else ""
        lines.append([r["family"], str(r["difficulty"]), str(r["n"]),
                      f"{100 * r['before']:.1f} ± {100 * r['before_se']:.1f}",
                      f"{100 * r['after']:.1f} ± {100 * r['after_se']:.1f}",
                      f"{100 * r['gain']:+.1f} ± {100 * r['gain_se']:.1f}{z}",
                      f"{r['tokens_before']:.0f}", f"{r['tokens_after']:.0f}",
                      f"{r['tokens_change']:+.0f} ± {r['tokens_change_se']:.0f}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(x) + " |" for x in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*x) for x in lines])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if os.path.isdir(args.before):
        names = sorted(f for f in os.listdir(args.before) if f.endswith(".json"))
        lost = [f for f in names if not os.path.exists(os.path.join(args.after, f))]
        if not names or lost:
            raise SystemExit(f"{args.after} lacks {', '.join(lost)}" if lost else f"no .json results in {args.before}")
        before = [json.load(open(os.path.join(args.before, f))) for f in names]
        after = [json.load(open(os.path.join(args.after, f))) for f in names]
        print(f"pooled over {', '.join(names)}")
    else:
        before, after = [json.load(open(args.before))], [json.load(open(args.after))]
    rows = compare(before, after)
    print(f"before: {before[0]['model']}   after: {after[0]['model']}   "
          f"(same {sum(len(b['tasks']) for b in before)} tasks, paired)")
    print(table(rows, args.markdown))
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
