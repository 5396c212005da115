"""Baseline for "is it k2-nano or is it the data?": a plain GPT (multi-head attention with RoPE on
the whole head, dense GELU MLP, AdamW, no MLA/MoE/Muon) trained on exactly the packed SFT batches
`openk2 train --loss-on masked` sees, then the same teacher-forced probe as bench/teacher_forced.py
on held-out gold. docs/results.md uses it to show that the missing copy skill after a short run is
not an artefact of openk2's architecture or optimizer.

    python bench/plain_gpt_sft.py DATA.jsonl TOKENIZER_DIR --steps 400 [--width 192 --layers 6]
"""

import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from openk2.data import IGNORE, open_data
from openk2.model import document_mask
from openk2.tokenizer import load_tokenizer


def rope(x, pos, inv):
    ang = pos[:, None, :, None].float() * inv
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.h, self.n1, self.n2 = heads, nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x, pos, mask, inv):
        B, T, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.h, d // self.h).unbind(2)
        q, k, v = rope(q.transpose(1, 2), pos, inv), rope(k.transpose(1, 2), pos, inv), v.transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, d))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, heads):
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(vocab, d), nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.register_buffer("inv", 10000.0 ** (-torch.arange(0, d // heads, 2).float() / (d // heads)))
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, pos=None, mask=None):
        if pos is None:
            pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        if mask is None:
            mask = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        h = self.emb(ids)
        for b in self.blocks:
            h = b(h, pos, mask, self.inv)
        return self.head(self.norm(h))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("tokenizer")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1152)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(a.tokenizer)
    data = open_data(a.data, a.seq_len, tok.vocab_size, tok, 0, 10000, "masked")
    model = GPT(tok.vocab_size, a.width, a.layers, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    for step in range(a.steps):
        b = data.batch(step * a.batch, a.batch)
        decay = 1.0 if step < 0.8 * a.steps else (a.steps - step) / (0.2 * a.steps)
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / 10) * decay
        keep = b.targets != IGNORE
        loss = F.cross_entropy(model(b.inputs, b.positions, document_mask(b.doc_ids)[:, None])[keep], b.targets[keep])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {loss.item():.3f}", flush=True)
    sys.path.insert(0, "bench")
    from teacher_forced import FAMILIES, records
    model.eval()
    with torch.no_grad():
        for fam, recs in records("eval", 10).items():
            from openk2.data import render_record
            right = total = 0
            for rec in recs:
                ids, mask = render_record(rec, tok)[0]
                pred = model(torch.tensor([ids]))[0, :-1].argmax(-1).tolist()
                pairs = [(ids[i], pred[i - 1]) for i in range(1, len(ids)) if mask[i]]
                right += sum(t == p for t, p in pairs)
                total += len(pairs)
            print(f"{fam:7s} teacher-forced own tokens {right / total:.3f} (held-out gold, {len(recs)} conversations)")


if __name__ == "__main__":
    main()
