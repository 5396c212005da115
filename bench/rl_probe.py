"""Where can RL help? pass@1 and pass@K of a model per family and difficulty, and its token use.

RL with a group baseline learns only from prompts whose K samples disagree: a level the model
always solves or never solves gives every sample the same reward and no gradient. This probe runs
the RL loop's own rollouts (openk2/rl_rollout.py: the agent on the engine, the "rl" split, the gym's
agent settings) on n tasks per level with K samples at one temperature and prints, per family and
difficulty: pass@1 (mean reward), pass@K (a task solved by any sample), the share of tasks whose
samples disagree (the "signal" RL gets), mean and p90 generated tokens, and how many runs a budget
would cut. Pick RL levels where pass@K is between 10% and 90%, and budgets near the p90.

    PYTHONPATH=. python bench/rl_probe.py models/k2-nano --tasks arith,chain \
        --difficulty arith=2-6,chain=5,10,20,40 --n 8 --k 4 --temperature 1.0
"""

from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tasks", default="arith,chain")
    ap.add_argument("--difficulty", required=True, help="levels per family, e.g. arith=2-6,chain=5,10,20")
    ap.add_argument("--n", type=int, default=8, help="tasks per level")
    ap.add_argument("--k", type=int, default=4, help="samples per task")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1000, help="task seed (RL runs use their own; default 1000)")
    ap.add_argument("--budget", type=int, nargs="*", default=[], help="token budgets to count cuts for")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--json", help="write the per-level table here")
    args = ap.parse_args()

    from openk2 import gym
    from openk2.agent_view import make_backend
    from openk2.eval import agent_settings
    from openk2.rl_rollout import rollout, score

    backend = make_backend(args.model)
    window, step_tokens = agent_settings(backend)
    levels = gym.parse_difficulty(args.difficulty)
    rows = []
    t_all = time.time()
    for fam in gym.parse_families(args.tasks):
        for level in levels.get(fam) or gym.family(fam).LEVELS:
            tasks = [gym.sample(fam, args.seed, i, "rl", level) for i in range(args.n)]
            t0 = time.time()
            samples = rollout(backend, tasks, args.k, temperature=args.temperature, seed=args.seed,
                              window=window, step_tokens=step_tokens, max_steps=args.max_steps)
            score(samples)
            secs = time.time() - t0
            by_task = [samples[i * args.k:(i + 1) * args.k] for i in range(args.n)]
            toks = sorted(s.tokens for s in samples)
            row = {"family": fam, "difficulty": level, "n": args.n, "k": args.k,
                   "pass@1": sum(s.score for s in samples) / len(samples),
                   f"pass@{args.k}": sum(any(s.score == 1.0 for s in g) for g in by_task) / args.n,
                   "signal": sum(len({s.score for s in g}) > 1 for g in by_task) / args.n,
                   "mean_tokens": sum(toks) / len(toks), "p90_tokens": toks[int(0.9 * (len(toks) - 1))],
                   "budget_stops": sum(s.truncated for s in samples), "seconds": round(secs, 1),
                   "cut_by": {b: sum(t > b for t in toks) / len(toks) for b in args.budget}}
            rows.append(row)
            cuts = " ".join(f"cut@{b} {v:.0%}" for b, v in row["cut_by"].items())
            print(f"{fam:7s} {level:4d}  pass@1 {row['pass@1']:.2f}  pass@{args.k} {row[f'pass@{args.k}']:.2f}  "
                  f"signal {row['signal']:.2f}  tokens mean {row['mean_tokens']:.0f} p90 {row['p90_tokens']}  "
                  f"stops {row['budget_stops']}  {cuts}  ({secs:.0f}s)", flush=True)
    print(f"total {time.time() - t_all:.0f}s")
    backend.engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
