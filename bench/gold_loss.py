"""Which pretraining draw will do arith? The loss of each checkpoint on held-out gold, on the tokens
the model would generate.

A k2-nano draw's eval varies most in arith (0 to 10 of 30 after SFT+QAT at 2400 pretraining steps),
and the agent probe the speedrun's select stage uses cannot rank *pretrained* checkpoints (every one
scored 0 of 40: they call the calculator and answer, wrongly). This asks a cheaper question of them:
the mean cross-entropy, teacher-forced, on the masked (model-generated) tokens of gold arith
conversations exported at a seed the runs did not train on -- a few seconds a model. docs/results.md, "choosing a
draw", has what it read on six draws.

    python -m openk2.cli gym export --tasks arith --n 100 --seed 98 --difficulty arith=1-4 \\
        --context-window 2048 --out /tmp/arith98.jsonl
    python bench/gold_loss.py /tmp/arith98.jsonl runs/full2/pretrain/latest runs/full2/draw1/pretrain/latest

Each conversation is rendered whole (not as the agent window's views: arith 1-4 gold is short) with
the checkpoint's own tokenizer and cut to --max-len tokens (the speedrun's training rows are 1152).
"""

import argparse
import json

import torch

from openk2.chat import render_ids
from openk2.checkpoint import load_model
from openk2.tokenizer import load_tokenizer


def gold_loss(checkpoint: str, records: list[dict], max_len: int) -> tuple[float, int]:
    """(mean CE over the masked target tokens, how many tokens) of one checkpoint."""
    model, tok = load_model(checkpoint), load_tokenizer(checkpoint)
    total, n = 0.0, 0
    with torch.no_grad():
        for r in records:
            ids, mask = render_ids(r["messages"], r.get("tools"), tok)
            ids, mask = ids[:max_len], mask[:max_len]
            logits = model(torch.tensor([ids]))[0, :-1].float()
            ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            total += ce[keep].sum().item()
            n += int(keep.sum())
    return total / max(1, n), n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", help="gold conversations (openk2 gym export) at a seed the runs did not train on")
    ap.add_argument("checkpoints", nargs="+", help="checkpoint directories (e.g. RUN/pretrain/latest)")
    ap.add_argument("--max-len", type=int, default=1152)
    a = ap.parse_args()
    records = [json.loads(line) for line in open(a.data)]
    for ckpt in a.checkpoints:
        loss, n = gold_loss(ckpt, records, a.max_len)
        print(f"{ckpt}: masked CE {loss:.4f} over {n} tokens", flush=True)


if __name__ == "__main__":
    main()
