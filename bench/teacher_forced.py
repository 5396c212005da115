"""Teacher-forced accuracy of a checkpoint on its own (masked) tokens of gym conversations, per tool
family, the share of conversations with every own token right (greedy decoding cannot fail on
those: the best cheap predictor of the eval), and the first mispredicted tokens (target,
prediction): how docs/results.md found that k2-nano misses the copied tokens.

    python bench/teacher_forced.py CHECKPOINT_DIR TRAIN.jsonl       # 6 training conversations a family
    python bench/teacher_forced.py CHECKPOINT_DIR eval [--n 20]      # held-out gold (eval split, unseen words)
"""

import argparse
import json
import random

from copy_accuracy import teacher_forced  # bench/ is on sys.path when run as a script
from openk2.checkpoint import load_model
from openk2.tokenizer import load_tokenizer

FAMILIES = {"arith": "calculator", "chain": "lookup", "search": "search", "code": "python"}


def records(source: str, n: int) -> dict:
    """{family: [conversation records]}: from a JSONL file, or gold trajectories of eval tasks."""
    if source == "eval":
        from openk2 import gym
        out = {}
        for fam in FAMILIES:
            tasks = gym.tasks(fam, n=n, seed=1, split="eval",
                              difficulty="chain=1,2,3,5,10" if fam == "chain" else None)
            out[fam] = [{"messages": gym.gold(t), "tools": t.schemas()} for t in tasks]
        return out
    with open(source) as f:
        lines = f.readlines()
    random.seed(1)
    recs = [json.loads(line) for line in random.sample(lines, min(len(lines), 400))]
    return {fam: [r for r in recs if r["tools"][0]["function"]["name"] == tool][:n]
            for fam, tool in FAMILIES.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("source", help="a JSONL of conversations, or 'eval' for held-out gold trajectories")
    ap.add_argument("--n", type=int, default=None, help="conversations per family (6 from a file, 20 for eval)")
    a = ap.parse_args()
    model, tok = load_model(a.checkpoint).eval(), load_tokenizer(a.checkpoint)
    n = a.n or (20 if a.source == "eval" else 6)
    for fam, recs in records(a.source, n).items():
        accs, exact, wrong = [], 0, []
        for rec in recs:
            pairs = teacher_forced(model, tok, rec)
            accs.append(sum(t == p for t, p in pairs) / len(pairs))
            exact += all(t == p for t, p in pairs)
            wrong += [(tok.decode([t]), tok.decode([p])) for t, p in pairs if t != p][:2]
        print(f"{fam:7s} tokens {sum(accs) / len(accs):.3f}  all right {exact}/{len(recs)}  misses {wrong[:8]}")


if __name__ == "__main__":
    main()
