"""Where heavy mode loses: for `openk2 eval --heavy K --json` results, how often one of the K
candidates was right (pass@K), how often a plain plurality vote would have been right, and what
heavy mode's aggregation (strict-majority vote, else a reflection run) actually scored.

Reads the `aggregation.votes` each task records (answers keyed as heavy mode compared them, by
openk2.eval.answer_key) and keys the gold answer the same way, so "right" here is the vote's notion.

    python bench/heavy_votes.py runs/nano/scaling/heavy2.json runs/nano/scaling/heavy4.json ...
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from openk2.eval import answer_key


def score(result: dict) -> dict:
    n = len(result["tasks"])
    some = plurality = 0
    methods = Counter()
    for t in result["tasks"]:
        agg = t.get("aggregation") or {}
        votes = agg.get("votes") or {}
        methods[agg.get("method")] += 1
        gold = answer_key(f"Answer: {t['answer']}")
        some += gold in votes
        top = max(votes.values(), default=0)
        plurality += votes.get(gold, 0) == top > 0 and list(votes.values()).count(top) == 1
    return {"n": n, "heavy": sum(t["reward"] == 1.0 for t in result["tasks"]), "pass_at_k": some,
            "strict_plurality": plurality, "methods": dict(methods)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="eval --json files of heavy-mode runs")
    args = ap.parse_args()
    print("| file | heavy mode right | some candidate right (pass@K) | strict plurality right | aggregation |")
    print("|---|---|---|---|---|")
    for path in args.results:
        s = score(json.load(open(path)))
        n = s["n"]
        print(f"| {path} | {s['heavy']}/{n} | {s['pass_at_k']}/{n} | {s['strict_plurality']}/{n} | "
              f"{', '.join(f'{m} {c}' for m, c in sorted(s['methods'].items(), key=str))} |")


if __name__ == "__main__":
    main()
