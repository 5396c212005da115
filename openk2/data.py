"""Training data: fixed-length rows of token ids with next-token targets, in an order that depends
only on the seed and the sample index.

Why index-addressed: sample i of the run is the same whatever the number of processes, the micro
batch size, or where the run was interrupted. Rank r of a global batch simply takes its slice, a
resume needs nothing but the step number, and 1 process equals N processes with the same global batch.

Three sources (the forms `openk2 train --data` accepts, DESIGN.md):
- `.bin`: uint32 token ids, one flat stream (plain pretraining). Cut into windows of seq_len+1
  tokens; windows are visited in a fresh seeded permutation each epoch. Every target counts.
- `.jsonl`: one `{"messages": [...], "tools": [...]}` per line, rendered by `openk2.chat.render_ids`
  into ids and a loss mask. Conversations are packed whole into rows (first fit over a few open
  rows, seeded order per epoch); each token attends only to its own conversation (a block-diagonal
  causal mask) and positions restart at 0 per conversation, so packing changes nothing but speed.
  Targets outside the mask (prompts, tool outputs, history, padding) do not count.
  A line may also name the agent settings it is to be seen under, `"context_window"` (and
  `"max_step_tokens"`): a conversation that outgrows that window (a 300-link gym chain) becomes the
  views the agent's context manager would show, one training sequence each (`render_record`).
- `gym:FAMILY[,FAMILY...]`: conversations generated in-process by openk2.gym (gold trajectories,
  with the gym's agent settings).

A batch is `Batch(inputs [B, T], targets [B, T] with -100 where no loss, positions, doc_ids)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IGNORE = -100


class DataError(ValueError):
    """Unusable training data; the message names the file (and line)."""


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64, IGNORE where no loss
    positions: torch.Tensor | None = None  # [B, T] per-document positions (packed conversations)
    doc_ids: torch.Tensor | None = None  # [B, T] which conversation each token belongs to

    def __len__(self):
        return self.inputs.shape[0]

    def to(self, device) -> "Batch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(mv(self.inputs), mv(self.targets), mv(self.positions), mv(self.doc_ids))

    def slice(self, start: int, n: int) -> "Batch":
        cut = lambda t: None if t is None else t[start:start + n]  # noqa: E731
        return Batch(cut(self.inputs), cut(self.targets), cut(self.positions), cut(self.doc_ids))

    @property
    def n_loss_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())


def _epoch_perm(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


# ---------------------------------------------------------------------------------------------------
# .bin token streams


class TokenStream:
    """A flat uint32 token file cut into windows of seq_len + 1 tokens (inputs + shifted targets)."""

    def __init__(self, path: str | Path, seq_len: int, vocab_size: int, seed: int = 0):
        self.path, self.seq_len, self.seed = Path(path), seq_len, seed
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such data file")
        size = self.path.stat().st_size
        if size % 4:
            raise DataError(f"{self.path}: {size} bytes is not a whole number of uint32 token ids "
                            "(corrupt or not a token file)")
        self.tokens = np.memmap(self.path, dtype=np.uint32, mode="r") if size else np.zeros(0, np.uint32)
        self.n_windows = max(0, (len(self.tokens) - 1) // seq_len)
        if self.n_windows == 0:
            raise DataError(f"{self.path}: {len(self.tokens)} tokens, fewer than one sequence of "
                            f"{seq_len + 1}; use a smaller --seq-len or more data")
        top = int(self.tokens.max())
        if top >= vocab_size:
            where = int(np.argmax(self.tokens >= vocab_size))
            raise DataError(f"{self.path}: token id {int(self.tokens[where])} at index {where} is outside "
                            f"the model's vocabulary (vocab_size {vocab_size})")
        self._perm = (None, None)

    def describe(self) -> str:
        return f"{self.path}: {len(self.tokens):,} tokens, {self.n_windows:,} windows of {self.seq_len + 1}"

    def _window(self, i: int) -> np.ndarray:
        epoch, j = divmod(i, self.n_windows)
        if self._perm[0] != epoch:
            self._perm = (epoch, _epoch_perm(self.n_windows, self.seed, epoch))
        w = int(self._perm[1][j])
        return self.tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1]

    def batch(self, start: int, n: int) -> Batch:
        rows = torch.from_numpy(np.stack([self._window(i) for i in range(start, start + n)]).astype(np.int64))
        return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


def write_tokens(path: str | Path, ids) -> Path:
    """Write token ids as a flat uint32 file (what `openk2 train --data FILE.bin` reads)."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= 2 ** 32):
        raise ValueError("token ids must be in [0, 2^32)")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arr.astype(np.uint32).tofile(tmp)
    tmp.replace(path)
    return path


def markov_tokens(n_tokens: int, vocab_size: int, seed: int = 0, order: int = 1, branching: int = 4,
                  zipf: float = 1.2) -> tuple[np.ndarray, float]:
    """A deterministic synthetic language: a Markov chain of the given order (1 or 2) in which every
    context has `branching` possible next tokens with Zipfian probabilities. Returns (tokens, the
    chain's entropy in nats per token): the loss floor a perfect model reaches, so optimizers can
    be compared on a fixed stream with a known optimum, without a tokenizer or a corpus. Order 1
    is a table of vocab x branching facts; order 2 (contexts hashed into 2^16) also needs attention
    to the previous token."""
    if order not in (1, 2):
        raise ValueError("order must be 1 or 2")
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, branching + 1) ** zipf
    p /= p.sum()
    entropy = float(-(p * np.log(p)).sum())
    n_ctx = vocab_size if order == 1 else 1 << 16
    table = rng.integers(0, vocab_size, size=(n_ctx, branching)).tolist()
    choice = rng.choice(branching, size=n_tokens, p=p).tolist()
    out = [0] * n_tokens
    a, b = int(rng.integers(vocab_size)), int(rng.integers(vocab_size))
    for i in range(n_tokens):
        ctx = b if order == 1 else (a * 1_000_003 + b * 7919) % n_ctx
        a, b = b, table[ctx][choice[i]]
        out[i] = b
    return np.asarray(out, dtype=np.int64), entropy


def text_tokens(files, tokenizer) -> np.ndarray:
    """Encode text files with a tokenizer into one stream, each file followed by EOS."""
    out = []
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise DataError(f"{f}: no such text file")
        out.extend(tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")))
        out.append(tokenizer.eos_id)
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# Conversations (JSONL, gym)


def read_conversations(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) per non-blank line; any bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    out, errors = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        why = _check_conversation(rec)
        if why:
            errors.append(f"{path}:{n}: {why}")
            continue
        out.append((n, rec))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise DataError("not a valid conversation file:\n  " + "\n  ".join(errors[:5]) + more)
    if not out:
        raise DataError(f"{path}: no conversations (the file is empty)")
    return out


def _check_conversation(rec) -> str | None:
    if not isinstance(rec, dict):
        return f"expected a JSON object with \"messages\", got {type(rec).__name__}"
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "\"messages\" must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"messages[{i}] must be an object with a string \"role\""
    tools = rec.get("tools")
    if tools is not None and not isinstance(tools, list):
        return "\"tools\" must be a list"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message (nothing to train on)"
    for key in ("context_window", "max_step_tokens"):
        v = rec.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            return f"\"{key}\" must be a positive number of tokens, got {v!r}"
    return None


def render_record(rec: dict, tokenizer) -> list[tuple[list, list]]:
    """A conversation record -> its training sequences [(ids, mask), ...]: one, `render_ids` of the
    whole conversation; or, when the record names a "context_window" that the agent would have had
    to manage, the views the agent's context manager shows (`agent_context.training_sequences`:
    one sequence per view, each output trained once, in the view it was generated in). The view
    decisions are the agent's own: the task is everything up to the last user message, and each
    step reserves min(max_step_tokens, window // 2) tokens, as `openk2.agent.run` does."""
    from openk2.chat import render_ids
    messages, tools = rec["messages"], rec.get("tools")
    ids, mask = render_ids(messages, tools, tokenizer)
    window = rec.get("context_window")
    if not window:
        return [(ids, mask)]
    from openk2.agent import DEFAULT_MAX_STEP_TOKENS
    reserve = min(rec.get("max_step_tokens") or DEFAULT_MAX_STEP_TOKENS, window // 2)
    if len(ids) + reserve <= window:   # every step's prompt is a prefix of this one: the view never changed
        return [(ids, mask)]
    from openk2.agent_context import training_sequences
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    n_task = users[-1] + 1 if users else next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return training_sequences(messages, n_task, tools, tokenizer, window, reserve)


def render_conversations(records, tokenizer, source: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each record through `render_record` -> (ids, mask) arrays (several per record when it is
    rendered as the agent's views); errors name the line."""
    out = []
    for line, rec in records:
        try:
            seqs = render_record(rec, tokenizer)
        except Exception as e:  # the renderer's own message says what was wrong
            raise DataError(f"{source}:{line}: cannot render this conversation ({e})") from None
        for ids, mask in seqs:
            ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)
            if len(ids) != len(mask):
                raise DataError(f"{source}:{line}: render_ids gave {len(ids)} ids but {len(mask)} mask values")
            out.append((ids, mask))
    return out


def gym_conversations(spec: str, tokenizer, n: int, seed: int):
    """`gym:FAMILY[,FAMILY...]` (or `gym:all`) -> n gold conversations from openk2.gym, families in
    turn, each family's training mix of difficulties, split "train", rendered as the agent shows
    them under the gym's agent settings (gym.CONTEXT_WINDOW, gym.STEP_TOKENS)."""
    try:
        import openk2.gym as gym
    except ImportError:
        raise DataError(f"--data {spec}: gym data needs openk2.gym, which is not in this checkout yet; "
                        "use a JSONL file of conversations or a .bin of token ids") from None
    families = spec.split(":", 1)[1]
    try:
        gym.parse_families(families)
    except ValueError as e:
        raise DataError(f"--data {spec}: {e}") from None
    keys = ("messages", "tools", "context_window", "max_step_tokens")
    records = [(k + 1, {key: c[key] for key in keys if key in c})
               for k, c in enumerate(gym.conversations(families, seed=seed, split="train", n=n))]
    return render_conversations(records, tokenizer, spec)


class PackedConversations:
    """Whole conversations packed into rows of seq_len + 1 tokens (padded at the end with `pad_id`,
    never split across rows); conversations longer than that are cut to seq_len + 1 tokens."""

    OPEN_ROWS = 16  # first fit over this many open rows: dense packing, order stays seed-determined

    def __init__(self, convs: list[tuple[np.ndarray, np.ndarray]], seq_len: int, vocab_size: int,
                 pad_id: int, seed: int = 0, source: str = "data"):
        self.seq_len, self.seed, self.pad_id, self.source = seq_len, seed, pad_id, source
        width = seq_len + 1
        self.truncated = sum(len(ids) > width for ids, _ in convs)
        self.convs = [(ids[:width], mask[:width]) for ids, mask in convs]
        self.no_loss = sum(int(m[1:].sum()) == 0 for _, m in self.convs)
        if self.no_loss == len(self.convs):
            raise DataError(f"{source}: no conversation has a token to train on (all loss masks are 0)")
        for k, (ids, _) in enumerate(self.convs):
            if len(ids) and int(ids.max()) >= vocab_size:
                raise DataError(f"{source}: conversation {k + 1} has token id {int(ids.max())}, outside the "
                                f"model's vocabulary ({vocab_size}); wrong tokenizer for this model?")
        self._epochs: list[list[list[int]]] = []  # per epoch: rows, each a list of conversation indices
        self._starts = [0]  # global index of each epoch's first row

    def describe(self) -> str:
        n_tok = sum(len(i) for i, _ in self.convs)
        rows = len(self._rows_of(0))
        s = (f"{self.source}: {len(self.convs):,} conversations, {n_tok:,} tokens, packed into {rows:,} rows "
             f"of {self.seq_len + 1} ({n_tok / (rows * (self.seq_len + 1)):.0%} full)")
        if self.truncated:
            s += f"; {self.truncated} cut to {self.seq_len + 1} tokens (raise --seq-len to keep them whole)"
        if self.no_loss:
            s += f"; {self.no_loss} with no trained tokens"
        return s

    def _pack(self, epoch: int) -> list[list[int]]:
        width = self.seq_len + 1
        rows, room, open_rows = [], [], []
        for k in _epoch_perm(len(self.convs), self.seed, epoch):
            n = len(self.convs[k][0])
            for r in open_rows:
                if room[r] >= n:
                    break
            else:
                rows.append([])
                room.append(width)
                open_rows.append(len(rows) - 1)
                if len(open_rows) > self.OPEN_ROWS:
                    open_rows.pop(0)
                r = open_rows[-1]
            rows[r].append(int(k))
            room[r] -= n
            if room[r] == 0:
                open_rows.remove(r)
        return rows

    def _rows_of(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            self._epochs.append(self._pack(len(self._epochs)))
            self._starts.append(self._starts[-1] + len(self._epochs[-1]))
        return self._epochs[epoch]

    def _row(self, i: int) -> list[int]:
        epoch = 0
        while True:
            rows = self._rows_of(epoch)
            if i < self._starts[epoch + 1]:
                return rows[i - self._starts[epoch]]
            epoch += 1

    def batch(self, start: int, n: int) -> Batch:
        width = self.seq_len + 1
        ids = np.full((n, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        pos = np.zeros((n, width), dtype=np.int64)
        doc = np.full((n, width), -1, dtype=np.int64)  # padding: its own "document"
        for b in range(n):
            at = 0
            for d, k in enumerate(self._row(start + b)):
                cid, cmask = self.convs[k]
                L = len(cid)
                ids[b, at:at + L], mask[b, at:at + L] = cid, cmask
                pos[b, at:at + L], doc[b, at:at + L] = np.arange(L), d
                at += L
            pos[b, at:] = np.arange(width - at)
        ids, mask, pos, doc = (torch.from_numpy(a) for a in (ids, mask, pos, doc))
        # target t+1 counts only if it is trained and belongs to the same conversation as input t
        keep = (mask[:, 1:] == 1) & (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
        targets = torch.where(keep, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
        return Batch(ids[:, :-1].contiguous(), targets, pos[:, :-1].contiguous(), doc[:, :-1].contiguous())


def open_data(spec: str, seq_len: int, vocab_size: int, tokenizer=None, seed: int = 0, gym_size: int = 10000,
              loss_on: str = "masked"):
    """`--data` -> a source with `batch(start, n) -> Batch` and `describe()`.

    loss_on "all" trains conversations on every token (prompts and tool outputs too: pretraining
    on the trajectories' text), "masked" only where render_ids' loss mask is 1 (SFT)."""
    spec = str(spec)
    if loss_on not in ("masked", "all"):
        raise DataError(f"loss_on must be 'masked' or 'all', got {loss_on!r}")

    def packed(convs, source):
        if loss_on == "all":
            convs = [(ids, np.ones_like(mask)) for ids, mask in convs]
        return PackedConversations(convs, seq_len, vocab_size, tokenizer.pad_id, seed, source)

    if spec.startswith("gym:"):
        _need_tokenizer(tokenizer, spec)
        return packed(gym_conversations(spec, tokenizer, gym_size, seed), spec)
    path = Path(spec)
    if path.suffix == ".bin":
        return TokenStream(path, seq_len, vocab_size, seed)
    if path.suffix in (".jsonl", ".json"):
        if tokenizer is None:
            read_conversations(path)  # a bad file is the first thing to hear about
            _need_tokenizer(tokenizer, spec)
        return packed(rendered_file(path, tokenizer), str(path))
    raise DataError(f"--data {spec}: expected gym:FAMILY[,...], a .jsonl file of conversations, or a .bin "
                    "file of uint32 token ids")


RENDER_CACHE_VERSION = 1  # bump when rendering changes what a record turns into


def rendered_file(path: Path, tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """`render_conversations` of a JSONL file, cached on disk by the file's and the tokenizer's
    content (rendering long trajectories as agent views costs minutes; a resumed run or a second
    stage on the same data should not pay it again). Cache: $OPENK2_CACHE or ~/.cache/openk2."""
    import hashlib
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    h = hashlib.sha256(f"v{RENDER_CACHE_VERSION}".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(tokenizer._tok.to_str().encode() if hasattr(tokenizer, "_tok") else repr(tokenizer).encode())
    cache = Path(os.environ.get("OPENK2_CACHE", "~/.cache/openk2")).expanduser() / "render" / f"{h.hexdigest()[:32]}.npz"
    if cache.exists():
        try:
            z = np.load(cache)
            ids, mask, offs = z["ids"].astype(np.int64), z["mask"].astype(np.int64), z["offsets"]
            return [(ids[a:b], mask[a:b]) for a, b in zip(offs[:-1], offs[1:])]
        except Exception:  # a damaged cache file is only a cache: render again
            pass
    convs = render_conversations(read_conversations(path), tokenizer, str(path))
    offs = np.cumsum([0] + [len(ids) for ids, _ in convs])
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, ids=np.concatenate([c[0] for c in convs]).astype(np.uint32),
                 mask=np.concatenate([c[1] for c in convs]).astype(np.uint8), offsets=offs)
        os.replace(tmp, cache)
    except OSError:
        pass  # no cache, no harm
    return convs


def _need_tokenizer(tokenizer, spec):
    if tokenizer is None:
        raise DataError(f"--data {spec}: conversations need a tokenizer: pass --tokenizer DIR, or --init a "
                        "checkpoint that has tokenizer.json")
