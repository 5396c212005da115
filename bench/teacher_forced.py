"""Teacher-forced accuracy of a checkpoint on its own (masked) tokens of gym conversations, per tool
family, and the first mispredicted tokens: how docs/results.md found that k2-nano misses the copied tokens.

    python bench/teacher_forced.py CHECKPOINT_DIR TRAIN.jsonl
"""
import json, torch, sys, random
from openk2.checkpoint import load_model
from openk2.tokenizer import load_tokenizer
from openk2.data import render_record
ck = sys.argv[1]
m = load_model(ck); tok = load_tokenizer(ck)
lines = open(sys.argv[2]).readlines()
random.seed(1)
for fam in ["calculator", "lookup", "search", "python"]:
    recs = [json.loads(l) for l in random.sample(lines, 400)]
    recs = [r for r in recs if r["tools"][0]["function"]["name"] == fam][:6]
    accs = []
    for rec in recs:
        ids, mask = render_record(rec, tok)[0]
        ids = ids[:2048]; mask = mask[:2048]
        with torch.no_grad(): lg = m(torch.tensor([ids]))
        pred = lg[0, :-1].argmax(-1); tgt = torch.tensor(ids[1:]); mk = torch.tensor(mask[1:]).bool()
        accs.append((pred[mk] == tgt[mk]).float().mean().item())
        wrong = [(tok.decode([int(t)]), tok.decode([int(p)])) for t, p, k in zip(tgt, pred, mk) if k and t != p][:6]
    print(fam, [round(a, 3) for a in accs], wrong)
