"""Teacher-forced accuracy of a checkpoint on its own (masked) tokens of gym conversations, per tool
family (6 conversations each), and the last one's first mispredicted tokens (target, prediction):
how docs/results.md found that k2-nano misses the copied tokens.

    python bench/teacher_forced.py CHECKPOINT_DIR TRAIN.jsonl
"""

import json
import random
import sys

from copy_accuracy import teacher_forced  # bench/ is on sys.path when run as a script
from openk2.checkpoint import load_model
from openk2.tokenizer import load_tokenizer


def main():
    model, tok = load_model(sys.argv[1]).eval(), load_tokenizer(sys.argv[1])
    with open(sys.argv[2]) as f:
        lines = f.readlines()
    random.seed(1)
    for tool in ("calculator", "lookup", "search", "python"):  # the four families, by their tool
        recs = [json.loads(line) for line in random.sample(lines, 400)]
        recs = [r for r in recs if r["tools"][0]["function"]["name"] == tool][:6]
        accs, wrong = [], []
        for rec in recs:
            pairs = teacher_forced(model, tok, rec)
            accs.append(sum(t == p for t, p in pairs) / len(pairs))
            wrong = [(tok.decode([t]), tok.decode([p])) for t, p in pairs if t != p][:6]
        print(tool, [round(a, 3) for a in accs], wrong)


if __name__ == "__main__":
    main()
