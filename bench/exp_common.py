"""What the optimizer experiments of issue 5 share: fixed data, a fixed model, launching and reading runs.

Used by bench/muon_vs_adamw.py (Muon vs AdamW learning-rate sweeps) and bench/qk_clip.py (QK-Clip
against exploding attention logits). Both must train on the same data with the same model for their
numbers to be comparable, so the recipe lives here once:

- data: gold trajectories of the gym's four families (`openk2 gym export`, train split, fixed seed),
  seen through a 512-token agent window (the model's sequence length, so no view is cut), and a
  2048-id BPE (`openk2 tokenizer train`) trained on their rendered text; built once under WORK/data;
- model: a small K2-shaped MoE (MLA, first layer dense, 16 fine-grained experts top-2 + 1 shared),
  written as an HF config.json;
- runs: `openk2 train` subprocesses (the command a user would type; printed and recorded), loss on
  all tokens, one seed, so every run sees the same batches in the same order;
- analysis: pure functions over metrics.jsonl rows (tested in tests/test_bench_experiments.py).

A run that finished is read back, not repeated; a run that did not finish is started again from
scratch (a resumed run's elapsed_s would hide the time lost to the interruption, and wall-clock is
one of the things compared).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SEQ_LEN = 512
VOCAB = 2048
DATA_SEED = 0
TRAIN_SEED = 0
# Conversations per family at --data-scale 1. Through a 512-token window a conversation renders to
# about 930 tokens (arith), 7.9k (chain: a long chain becomes many views), 1.9k (search), 310 (code)
# (measured with a 2048-id BPE), so these counts give each family a similar share of the tokens. At
# scale 0.2 this made 224k tokens in 562 rows of 513 (78% full), so scale 1 gives ~1.1M tokens in
# ~2,800 rows: ~350 steps of 8 rows without repeating one (check_data refuses a plan that would).
MIX = {"arith": 400, "chain": 50, "search": 200, "code": 1200}


def config_dict() -> dict:
    """The fixed model: K2's architecture at ~4M parameters (1.9M active). Small enough for ~3-minute
    runs on 2 CPU cores, big enough to have every K2 part: MLA with a compressed KV latent and a
    decoupled RoPE key, a dense first layer, fine-grained routed experts with a shared one."""
    from openk2.config import ModelConfig
    cfg = ModelConfig(
        vocab_size=VOCAB, hidden_size=192, intermediate_size=576, moe_intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=1024, rope_theta=50000.0, torch_dtype="float32").validate("bench config")
    return cfg.to_hf()


def openk2_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "openk2.cli", *map(str, args)]


def shown(cmd: list[str]) -> str:
    """A command as a user would type it (`openk2 ...` rather than `python -m openk2.cli ...`)."""
    if cmd[:3] == openk2_cmd()[:3]:
        cmd = ["openk2", *cmd[3:]]
    return " ".join(shlex.quote(str(c)) for c in cmd)


class Work:
    """The experiment's directory: data/, config.json, runs/NAME/, logs/NAME.log, plots/, cache/.

    Children get OMP_NUM_THREADS=threads and the render cache under WORK/cache (rendering the chain
    views takes seconds to minutes; every run of the experiment reuses the first one's)."""

    def __init__(self, root: str | Path, threads: int):
        self.root = Path(root).resolve()
        self.threads = threads
        self.data = self.root / "data"
        self.runs = self.root / "runs"
        self.logs = self.root / "logs"
        self.plots = self.root / "plots"
        for d in (self.data, self.runs, self.logs, self.plots):
            d.mkdir(parents=True, exist_ok=True)
        os.environ["OPENK2_CACHE"] = str(self.root / "cache")  # this process too (check_data renders)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO),
                    "OPENK2_CACHE": str(self.root / "cache")}
        self.commands: list[str] = []

    def sh(self, cmd: list[str], log: Path | None = None):
        """Run a command (children inherit this process's niceness), recording it for the report."""
        cmd = [str(c) for c in cmd]
        line = f"OMP_NUM_THREADS={self.threads} {shown(cmd)}"
        self.commands.append(line)
        print(f"$ {line}", flush=True)
        if log is None:
            subprocess.run(cmd, env=self.env, check=True, stdout=subprocess.DEVNULL)
            return
        with open(log, "w") as f:
            r = subprocess.run(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            raise SystemExit(f"failed (exit {r.returncode}): {shown(cmd)}\nsee {log}")

    # ---- data and model ------------------------------------------------------------------------
    def make_data(self, scale: float) -> dict:
        """Export the gym families, concatenate them into train.jsonl, train the tokenizer on the
        rendered text. Skipped when data/manifest.json says the same recipe was built."""
        mix = {f: max(1, round(n * scale)) for f, n in MIX.items()}
        recipe = {"mix": mix, "seed": DATA_SEED, "context_window": SEQ_LEN, "vocab": VOCAB}
        manifest = self.data / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old["recipe"] == recipe:
                self.commands += old["commands"]
                return old
            raise SystemExit(f"{self.data} holds data of another recipe ({old['recipe']}); "
                             f"use another --work or delete it")
        start = len(self.commands)
        parts = []
        for fam, n in mix.items():
            f = self.data / f"{fam}.jsonl"
            self.sh(openk2_cmd("gym", "export", "--tasks", fam, "--n", n, "--seed", DATA_SEED,
                               "--context-window", SEQ_LEN, "--out", f))
            parts.append(f)
        with open(self.data / "train.jsonl", "w") as out:
            for f in parts:
                out.write(f.read_text())
        self.commands.append(f"cat {' '.join(p.name for p in parts)} > train.jsonl")
        self._corpus(self.data / "train.jsonl", self.data / "corpus.txt")
        self.commands.append("render every conversation of train.jsonl to text > corpus.txt "
                             "(openk2.chat.render, bench/exp_common.py)")
        self.sh(openk2_cmd("tokenizer", "train", self.data / "corpus.txt", "--vocab-size", VOCAB,
                           "--out", self.data / "tokenizer"))
        out = {"recipe": recipe, "commands": self.commands[start:]}
        manifest.write_text(json.dumps(out, indent=1) + "\n")
        return out

    @staticmethod
    def _corpus(jsonl: Path, corpus: Path):
        from openk2.chat import render
        with open(jsonl) as src, open(corpus, "w") as dst:
            for line in src:
                rec = json.loads(line)
                dst.write(render(rec["messages"], rec.get("tools"), add_generation_prompt=False) + "\n")

    def write_config(self) -> tuple[Path, dict]:
        from openk2.config import ModelConfig
        path = self.root / "config.json"
        path.write_text(json.dumps(config_dict(), indent=2) + "\n")
        return path, ModelConfig.from_hf(path).param_counts()

    def check_data(self, steps: int, batch: int, seq_len: int = SEQ_LEN) -> dict:
        """Refuse a plan that would repeat data: steps * batch must fit in the first epoch's rows
        (renders and packs exactly as the trainer will, and fills the render cache for the runs)."""
        from openk2.data import open_data
        from openk2.tokenizer import load_tokenizer
        tok = load_tokenizer(self.data / "tokenizer")
        src = open_data(str(self.data / "train.jsonl"), seq_len, VOCAB, tok, TRAIN_SEED, loss_on="all")
        rows = len(src._rows_of(0))  # rows of epoch 0 (the trainer reads rows step*batch.. in order)
        info = {"describe": src.describe(), "rows": rows, "rows_needed": steps * batch}
        print(info["describe"], flush=True)
        if steps * batch > rows:
            raise SystemExit(f"{steps} steps x {batch} rows = {steps * batch} rows but the data has {rows}: "
                             f"raise --data-scale (in a new --work) or lower --steps")
        return info

    # ---- runs ----------------------------------------------------------------------------------
    def train(self, name: str, config: Path, steps: int, batch: int, optimizer: str, lr: float,
              tau: float | None = None, seq_len: int = SEQ_LEN) -> list[dict]:
        """One `openk2 train` run into runs/NAME; returns its metrics rows. Already complete: read."""
        from openk2.plot import read_metrics
        out = self.runs / name
        if is_complete(out, steps):
            self.commands.append(json.loads((out / "bench.json").read_text())["command"])
            print(f"{name}: complete, reused", flush=True)
            return read_metrics(out)
        if out.exists():
            shutil.rmtree(out)
        cmd = openk2_cmd("train", "--config", config, "--data", self.data / "train.jsonl",
                         "--tokenizer", self.data / "tokenizer", "--loss-on", "all", "--seq-len", seq_len,
                         "--batch-size", batch, "--steps", steps, "--optimizer", optimizer, "--lr", lr,
                         "--seed", TRAIN_SEED, "--save-every", steps, "--keep", 1, "--out", out)
        if tau is not None:
            cmd += ["--qk-clip-tau", tau]
        load0, t0 = os.getloadavg(), time.time()
        self.sh(cmd, self.logs / f"{name}.log")
        rows = read_metrics(out)
        (out / "bench.json").write_text(json.dumps({
            "command": self.commands[-1], "threads": self.threads, "wall_s": time.time() - t0,
            "loadavg_before": load0, "loadavg_after": os.getloadavg()}, indent=1) + "\n")
        print(f"{name}: {len(rows)} steps, loss {rows[-1]['loss']:.3f}, {rows[-1]['elapsed_s']:.0f} s", flush=True)
        return rows

    def plot(self, run_names: list[str], out_name: str) -> Path:
        out = self.plots / out_name
        self.sh(openk2_cmd("plot", *[self.runs / n for n in run_names], "--out", out))
        return out

    def run_info(self, name: str) -> dict:
        return json.loads((self.runs / name / "bench.json").read_text())


def is_complete(run_dir: Path, steps: int) -> bool:
    """Finished: bench.json written after the trainer exited, and the last logged step is `steps`."""
    m = Path(run_dir) / "metrics.jsonl"
    if not (m.is_file() and (Path(run_dir) / "bench.json").is_file()):
        return False
    lines = m.read_text().splitlines()
    try:
        return bool(lines) and json.loads(lines[-1])["step"] == steps
    except (json.JSONDecodeError, KeyError):
        return False


def machine() -> dict:
    """Where the numbers came from: CPU model, cores, torch, commit."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M")}


# ---------------------------------------------------------------------------------------------------
# Analysis: pure functions of metrics rows ({"step", "tokens", "elapsed_s", "loss", ...} per step)


def smoothed(rows: list[dict], window: int) -> list[dict]:
    """Trailing means over `window` steps of loss, tokens and elapsed_s: one point per window end.

    The per-step loss is noisy (each step is a different batch of packed conversations); a window's
    mean loss estimates the loss at the window's middle, so the point's tokens and elapsed_s are the
    window's means too. Every run of an experiment is smoothed with the same window."""
    w = max(1, min(window, len(rows)))
    out = []
    for end in range(w, len(rows) + 1):
        part = rows[end - w:end]
        out.append({"step": part[-1]["step"], **{k: sum(r[k] for r in part) / w
                                                   for k in ("loss", "tokens", "elapsed_s")}})
    return out


def final_loss(rows: list[dict], window: int) -> float:
    return smoothed(rows, window)[-1]["loss"]


def first_reach(curve: list[dict], target: float, x: str = "tokens") -> float | None:
    """Where (in `x`: tokens or elapsed_s) a smoothed curve first gets down to `target`, linearly
    interpolated between the two points that straddle it; None if it never does."""
    prev = None
    for p in curve:
        if p["loss"] <= target:
            if prev is None:
                return p[x]
            f = (prev["loss"] - target) / (prev["loss"] - p["loss"])
            return prev[x] + f * (p[x] - prev[x])
        prev = p
    return None


def loss_at(curve: list[dict], x: str, value: float) -> float | None:
    """The smoothed loss at `value` of `x` (tokens or elapsed_s), interpolated; None outside the curve."""
    for a, b in zip(curve, curve[1:]):
        if a[x] <= value <= b[x]:
            f = 0.0 if b[x] == a[x] else (value - a[x]) / (b[x] - a[x])
            return a["loss"] + f * (b["loss"] - a["loss"])
    if curve and curve[-1][x] == value:
        return curve[-1]["loss"]
    return None


def step_times(rows: list[dict], skip: int = 1) -> dict:
    """Medians over steps (the first `skip` left out: allocator and thread-pool warm-up) of the step
    time and its parts as the trainer logs them. Medians, because a shared machine's load spikes
    hit single steps."""
    rows = rows[skip:] if len(rows) > skip else rows
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"step_s": statistics.median(r["time_fwd_bwd_s"] + r["time_opt_s"] + r["time_clip_bias_s"]
                                        for r in rows),
            "fwd_bwd_s": med("time_fwd_bwd_s"), "opt_s": med("time_opt_s"), "tokens_per_s": med("tokens_per_s")}


def best_run(finals: dict) -> tuple:
    """(key, on_edge) of the lowest final loss in {lr: loss}; on_edge when that lr is the smallest or
    largest tried (the optimum may lie outside the sweep)."""
    key = min(finals, key=finals.get)
    lrs = sorted(finals)
    return key, len(lrs) > 1 and key in (lrs[0], lrs[-1])


def compare(base: list[dict], other: list[dict], window: int) -> dict:
    """`other` (Muon) against `base` (AdamW): how many tokens and seconds `other` needs to reach
    base's final smoothed loss (and the ratios: > 1 means other is faster), and both losses at
    equal tokens (base's end) and at equal wall-clock (the shorter run's end)."""
    a, b = smoothed(base, window), smoothed(other, window)
    target = a[-1]["loss"]
    tok, sec = first_reach(b, target, "tokens"), first_reach(b, target, "elapsed_s")
    t_eq = min(a[-1]["elapsed_s"], b[-1]["elapsed_s"])
    n_eq = min(a[-1]["tokens"], b[-1]["tokens"])
    return {"target_loss": target, "base_tokens": a[-1]["tokens"], "base_elapsed_s": a[-1]["elapsed_s"],
            "other_tokens_to_target": tok, "other_elapsed_s_to_target": sec,
            "token_ratio": None if not tok else a[-1]["tokens"] / tok,
            "time_ratio": None if not sec else a[-1]["elapsed_s"] / sec,
            "equal_tokens": {"tokens": n_eq, "base": loss_at(a, "tokens", n_eq), "other": loss_at(b, "tokens", n_eq)},
            "equal_time": {"elapsed_s": t_eq, "base": loss_at(a, "elapsed_s", t_eq),
                           "other": loss_at(b, "elapsed_s", t_eq)}}


def logit_stats(rows: list[dict], tau: float) -> dict:
    """Largest logged max attention logit (and its step), the first step it went above tau, and the
    last step's value."""
    top = max(rows, key=lambda r: r["max_logit"])
    over = [r["step"] for r in rows if r["max_logit"] > tau]
    return {"max_logit": top["max_logit"], "max_logit_step": top["step"],
            "first_step_over_tau": over[0] if over else None,
            "steps_over_tau": len(over), "final_max_logit": rows[-1]["max_logit"]}


def clip_stats(rows: list[dict], tau: float, parts: int = 4, clipping: bool = True) -> dict:
    """What QK-Clip did in a muonclip run (or, with clipping=False, would have done in a muon run),
    from its metrics.

    `qk_clipped_heads` is the number of (layer, head) pairs rescaled after that step: those whose max
    pre-softmax logit in the step's forward exceeded tau (openk2.muon.qk_clip). Which heads they were
    comes from `max_logit_heads` (the same per-head maxima the clip used): a head was clipped at a
    step exactly when its logged maximum is > tau. Heads ever clipped are counted over the whole run
    and per `parts` consecutive stretches of it (K2 reports 12.7% of heads clipped early, none later)."""
    heads = [r.get("max_logit_heads") for r in rows]
    n_heads = sum(len(layer) for layer in heads[0]) if heads and heads[0] else None
    events = [r["qk_clipped_heads"] for r in rows]
    steps = [r["step"] for r, n in zip(rows, events) if n]

    def ever(part):
        return {(i, j) for r in part for i, layer in enumerate(r["max_logit_heads"]) for j, s in enumerate(layer)
                if s > tau}

    out = {"clip_events": sum(events), "steps_with_clip": len(steps), "first_clip_step": steps[0] if steps else None,
           "last_clip_step": steps[-1] if steps else None, "heads_total": n_heads}
    if n_heads:
        if clipping:  # the per-head maxima must account for every logged clip, else they are not what it saw
            out["heads_match_events"] = all(len(ever([r])) == r["qk_clipped_heads"] for r in rows)
        size = -(-len(rows) // parts)
        out["heads_ever_clipped"] = len(ever(rows))
        out["heads_ever_clipped_frac"] = out["heads_ever_clipped"] / n_heads
        out["by_part"] = [{"steps": [p[0]["step"], p[-1]["step"]], "heads_clipped": len(ever(p)),
                           "frac": len(ever(p)) / n_heads}
                          for p in (rows[k:k + size] for k in range(0, len(rows), size))]
    return out


def paired_diff(rows_a: list[dict], rows_b: list[dict], from_step: int = 1) -> float | None:
    """Mean over steps >= from_step of loss_b - loss_a. Runs with one seed see the same batch at each
    step, so the batch-to-batch noise that swamps a single run's curve cancels in the difference."""
    a = {r["step"]: r["loss"] for r in rows_a}
    d = [r["loss"] - a[r["step"]] for r in rows_b if r["step"] >= from_step and r["step"] in a]
    return sum(d) / len(d) if d else None
