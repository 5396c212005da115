"""Can a checkpoint copy? Teacher-forced accuracy on its own (loss-masked) tokens of gym conversations,
split into digit tokens and the rest.

In `arith` nearly every digit the model writes is copied from its context (the question's numbers,
the calculator's last result), while the other tokens are mostly the trajectory's fixed phrasing. A
model that has learned the format but not to copy scores high on "other" and low on "digits"; that
is how docs/results.md tracks the k2-nano runs' one missing skill.

    python bench/copy_accuracy.py CHECKPOINT_DIR runs/nano2/data/arith.jsonl [--last 40]
"""

from __future__ import annotations

import argparse
import json


def teacher_forced(model, tok, rec: dict) -> list[tuple[int, int]]:
    """(target, greedy prediction) for each of the model's own (loss-masked) tokens of the
    conversation's first view (a short task's whole conversation)."""
    import torch
    from openk2.data import render_record

    ids, mask = render_record(rec, tok)[0]
    with torch.no_grad():
        pred = model(torch.tensor([ids]))[0, :-1].argmax(-1).tolist()
    return [(ids[i], pred[i - 1]) for i in range(1, len(ids)) if mask[i]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("conversations", help="a gym export (.jsonl); its last --last records are scored")
    ap.add_argument("--last", type=int, default=40)
    args = ap.parse_args()

    from openk2.checkpoint import load_model
    from openk2.tokenizer import load_tokenizer

    model, tok = load_model(args.checkpoint).eval(), load_tokenizer(args.checkpoint)
    with open(args.conversations) as f:
        records = [json.loads(line) for line in f.readlines()[-args.last:]]
    hits = {"digits": [0, 0], "other": [0, 0]}
    for rec in records:
        for target, pred in teacher_forced(model, tok, rec):
            kind = "digits" if tok.decode([target]).strip().isdigit() else "other"
            hits[kind][0] += pred == target
            hits[kind][1] += 1
    print(f"{args.checkpoint}: " + "  ".join(f"{k} {h / max(n, 1):.3f} (n={n})" for k, (h, n) in hits.items()))


if __name__ == "__main__":
    main()
