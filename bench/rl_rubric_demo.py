"""The self-critique rubric reward driving RL, on a model small enough to watch it in minutes.

k2-tiny is trained for a few seconds on gold `brief` notes (openk2/gym/brief.py), then `openk2 rl`
runs on the brief family with rewards from a critic: pairwise comparisons of each prompt's samples
against the rubric, win shares as rewards (openk2/critic.py). The critic here is a scripted judge
that reads the rubric's text in the critic prompt and counts the rules each response keeps (a
stand-in for a stronger model behind an endpoint, `--critic URL`; this tiny policy cannot judge
itself). The family's own programmatic check (`brief.rubric_score`) is logged beside the reward but
never used by the loop: if the critic's preferences carry the rubric, it rises.

    PYTHONPATH=. python bench/rl_rubric_demo.py --out /tmp/rubric_demo [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path


def reader(prompt: str) -> str:
    """The scripted critic: count the rules of the prompt's rubric that responses A and B keep."""
    body = prompt.split("Rubric:\n", 1)[1]
    rubric, rest = body.split("\n\nResponse A:\n<<<\n", 1)
    a, rest = rest.split("\n>>>\n\nResponse B:\n<<<\n", 1)
    b = rest.split("\n>>>", 1)[0]

    def kept(text):
        if not text.strip():
            return 0.0
        n = 0.0
        for line in rubric.splitlines():
            if m := re.search(r"At most (\d+) sentences?", line):
                n += len(re.findall(r"[.!?](?:\s|$)", text)) <= int(m.group(1))
            elif m := re.search(r"At most (\d+) words", line):
                n += len(text.split()) <= int(m.group(1))
            elif m := re.search(r"Mention each of: (.*)\.$", line):
                vals = m.group(1).split(", ")
                n += sum(v.lower() in text.lower() for v in vals) / len(vals)
            elif m := re.search(r'Start with "(.*)"', line):
                n += text.startswith(m.group(1))
            elif m := re.search(r'Never use the word "(\w+)"', line):
                n += re.search(rf"\b{m.group(1)}\b", text, re.I) is None
        return n
    ka, kb = kept(a), kept(b)
    return "<think></think>Answer: " + ("A" if ka > kb else "B" if kb > ka else "tie")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()

    from openk2.agent import LocalBackend
    from openk2.critic import Critic
    from openk2.rl import RLOptions, rl
    from openk2.scripted import ScriptedEngine
    from openk2.tokenizer import tiny_tokenizer
    from openk2.train import TrainOptions, train

    out = Path(args.out)
    tok = tiny_tokenizer()
    tok.save(out / "tok")
    t0 = time.time()
    if not (out / "sft" / "latest").exists():
        train(TrainOptions(out=str(out / "sft"), preset="k2-tiny", tokenizer=str(out / "tok"), data="gym:brief",
                           steps=args.sft_steps, batch_size=8, seq_len=512, gym_size=400, lr=3e-3, warmup=2,
                           save_every=args.sft_steps, quiet=True))
    print(f"sft: {time.time() - t0:.0f}s", flush=True)
    critic = Critic(LocalBackend(ScriptedEngine(tok, reader), tok), workers=8)
    rl(RLOptions(model=str(out / "sft" / "latest"), out=str(out / "rl"), tasks="brief", steps=args.steps,
                 prompts=args.prompts, samples=args.samples, budget="80", max_steps=2, lr=args.lr, ptx_batch=2,
                 ptx_tasks="brief", temperature=1.0, temperature_end=0.7, save_every=10, resume=True),
       critic=critic)
    rows = [json.loads(x) for x in (out / "rl" / "metrics.jsonl").read_text().splitlines()]
    k = max(1, len(rows) // 4)
    for name, part in (("first", rows[:k]), ("last", rows[-k:])):
        fam = [r["families"]["brief"] for r in part]
        print(f"{name} {k} steps: rubric score (check) {sum(f['rubric_score'] for f in fam) / k:.3f}, "
              f"all rules kept {sum(f['accuracy'] for f in fam) / k:.3f}, tokens {sum(f['mean_tokens'] for f in fam) / k:.0f}")
    print(f"total {time.time() - t0:.0f}s; curves: {out / 'rl' / 'rl.png'}")


if __name__ == "__main__":
    main()
