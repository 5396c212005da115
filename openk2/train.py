"""`openk2 train`: pretraining and SFT with MuonClip, resumable to the bit, on 1 or N processes.

One step: the global batch (rows `step*B .. step*B+B-1` of the data, openk2.data) is split over the
processes and, within each, into micro-batches whose gradients accumulate; the loss is the sum of
per-token cross-entropies over the whole global batch divided by its number of trained tokens, so
1 process and N processes compute the same function. After the update: QK-Clip from the step's
per-head logit maxima (MAX over micro-batches and ranks), then the router bias from the step's
expert load (SUM over ranks), then metrics and, every `--save-every` steps, a checkpoint.

Checkpoints are directories `OUT/checkpoints/step-NNNNNNN/`: the model in the HF layout (loads
with openk2.load_model, transformers, vLLM), the tokenizer files when a tokenizer is in use,
`optimizer.pt`, `rng.pt`, and `trainer.json` (step, tokens, elapsed time, the run's options).
Each is written under a temporary name, fsynced, and renamed into place, so a kill at any moment
leaves the previous one whole; `OUT/latest` points at the newest. Resuming reloads all of it, and
because the data order is a function of the step, the run continues bit for bit (on CPU, same seed).

Runs under torchrun (`torchrun --nproc-per-node N -m openk2.train ...`) with DDP: gloo on CPU,
nccl on GPU. DDP does not broadcast buffers: the router bias is kept identical on all ranks by
computing it from all-reduced loads, and the per-step load counters are per-rank until reduced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from openk2.data import IGNORE, Batch, DataError, open_data
from openk2 import muon as M

CKPT_RE = re.compile(r"^step-(\d{7})$")


class TrainingError(ValueError):
    """The run cannot go on (bad options, a non-finite loss); the message says why and what is kept."""


@dataclass
class TrainOptions:
    """Every field None means "the default" for a new run and "what the run used" on --resume."""
    out: str | None = None
    data: str | None = None
    preset: str | None = None
    config: str | None = None
    init: str | None = None
    tokenizer: str | None = None
    steps: int | None = None
    batch_size: int | None = None  # sequences per optimizer step, over all processes
    micro_batch: int | None = None  # sequences per forward per process (default: no accumulation)
    seq_len: int | None = None
    lr: float | None = None
    muon_lr: float | None = None  # default: lr (right with the AdamW-matched scale)
    weight_decay: float | None = None
    warmup: int | None = None
    decay_frac: float | None = None
    min_lr_ratio: float | None = None
    optimizer: str | None = None
    muon_scale: str | None = None
    qk_clip_tau: float | None = None
    router_bias_rate: float | None = None
    grad_clip: float | None = None
    seed: int | None = None
    save_every: int | None = None
    keep: int | None = None
    qat: str | None = None
    gym_size: int | None = None
    loss_on: str | None = None  # conversations: "masked" (SFT: generated tokens) or "all" (pretraining)
    device: str | None = None
    resume: bool = False
    quiet: bool = False


DEFAULTS = dict(steps=1000, batch_size=16, seq_len=512, lr=3e-3, weight_decay=0.1, decay_frac=0.2,
                min_lr_ratio=0.1, optimizer="muonclip", muon_scale="adamw", qk_clip_tau=100.0,
                router_bias_rate=1e-3, grad_clip=1.0, seed=0, save_every=100, keep=2, qat="none",
                gym_size=10000, loss_on="masked", device="auto")
# Options that may change when resuming: how long, how often to save, how to split the batch.
RESUMABLE = {"out", "steps", "save_every", "keep", "micro_batch", "device", "resume", "quiet"}


def resolve(opts: TrainOptions, saved: dict | None = None) -> TrainOptions:
    """Fill unset options from the resumed run (checking set ones agree with it), else defaults."""
    out = {}
    clash = []
    for f in dataclasses.fields(TrainOptions):
        v = getattr(opts, f.name)
        if saved is not None and f.name in saved:
            s = saved[f.name]
            if v is None:
                v = s
            elif f.name not in RESUMABLE and _norm(f.name, v) != _norm(f.name, s):
                clash.append(f"--{f.name.replace('_', '-')} {v} (the run used {s})")
        if v is None:
            v = DEFAULTS.get(f.name)
        out[f.name] = v
    if clash:
        raise TrainingError("--resume with options that differ from the run being resumed: "
                            + "; ".join(clash) + ". Leave them out to keep the run's values, or start a new --out")
    o = TrainOptions(**out)
    if o.out is None:
        raise TrainingError("--out DIR is required")
    if o.data is None:
        raise TrainingError("--data is required (gym:FAMILY, FILE.jsonl or FILE.bin)")
    if o.warmup is None:
        o.warmup = min(100, max(1, o.steps // 20))
    if o.data and not o.data.startswith("gym:"):
        o.data = str(Path(o.data).resolve())
    for name in ("init", "config", "tokenizer"):
        if getattr(o, name):
            setattr(o, name, str(Path(getattr(o, name)).resolve()))
    checks = [(o.steps >= 1, "--steps must be >= 1"), (o.batch_size >= 1, "--batch-size must be >= 1"),
              (o.seq_len >= 1, "--seq-len must be >= 1"), (o.lr > 0, "--lr must be > 0"),
              (0 <= o.decay_frac <= 1, "--decay-frac must be in [0, 1]"),
              (o.optimizer in ("muonclip", "muon", "adamw"), "--optimizer must be muonclip, muon or adamw"),
              (o.qat in ("none", "experts", "all"), "--qat must be none, experts or all"),
              (o.save_every >= 1, "--save-every must be >= 1"), (o.keep >= 1, "--keep must be >= 1"),
              (o.qk_clip_tau > 0, "--qk-clip-tau must be > 0")]
    for ok, why in checks:
        if not ok:
            raise TrainingError(why)
    if sum(x is not None for x in (o.preset, o.config)) > 1:
        raise TrainingError("give at most one of --preset and --config")
    return o


def _norm(name, v):
    if name in ("data", "init", "config", "tokenizer") and v and not str(v).startswith("gym:"):
        return str(Path(v).resolve())
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def lr_factor(step: int, total: int, warmup: int, decay_frac: float, min_ratio: float) -> float:
    """Warmup-stable-decay (K2): linear warmup, constant, cosine decay to min_ratio over the last
    `decay_frac` of the steps. `step` counts from 0."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = int(round(decay_frac * total))
    start = total - decay_steps
    if step < start or decay_steps == 0:
        return 1.0
    progress = (step - start + 1) / decay_steps
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def find_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a directory gets its final name only when whole)."""
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if CKPT_RE.match(p.name) and (p / "trainer.json").is_file()),
                  key=lambda p: p.name)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = find_checkpoints(Path(out))
    return found[-1] if found else None


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, step: int, model, optimizer, tokenizer, trainer_state: dict, keep: int) -> Path:
    """Write `checkpoints/step-N` atomically (temp dir, fsync, rename), repoint `latest`, prune old ones."""
    from openk2.checkpoint import save_model
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save(tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved before (a resume that saved again): set the old one aside
        _discard(final)
    os.rename(tmp, final)
    _fsync(root)
    link = out / ".latest.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(Path("checkpoints") / final.name, link)
    os.replace(link, out / "latest")
    for old in find_checkpoints(out)[:-keep]:
        _discard(old)
    return final


def _discard(path: Path):
    """Rename first (atomic: the directory stops counting as a checkpoint), then delete."""
    gone = path.with_name(f".del-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _clean_stale(out: Path):
    root = out / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)


def _truncate_metrics(path: Path, step: int):
    """Keep the metrics of steps <= step (a killed run may have logged further, or half a line)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("step", 0) > step:
            break
        keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def _config_diff(a, b) -> list[str]:
    da, db = a.to_hf(), b.to_hf()
    skip = {"torch_dtype"}
    return [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in sorted(set(da) | set(db))
            if k not in skip and da.get(k) != db.get(k)]


# ---------------------------------------------------------------------------------------------------
# Setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owned: bool = False  # we called init_process_group (so we tear it down)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from openk2.checkpoint import resolve_device
    try:
        device = resolve_device(device)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    d = Dist(device=torch.device(device))
    if world > 1:
        d.rank, d.world = int(os.environ["RANK"]), world
        d.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(d.local_rank)
            d.device = torch.device("cuda", d.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
            d.owned = True
    return d


def _load_tokenizer(opts: TrainOptions, model_dir: Path | None):
    src = opts.tokenizer or (str(model_dir) if model_dir and (model_dir / "tokenizer.json").is_file() else None)
    if src is None:
        return None
    try:
        from openk2.tokenizer import load_tokenizer
    except ImportError:
        raise TrainingError("a tokenizer needs openk2.tokenizer, which is not in this checkout yet") from None
    return load_tokenizer(src)


def _build_model(opts: TrainOptions, resume_from: Path | None):
    from openk2.checkpoint import load_model
    from openk2.config import ModelConfig, preset
    asked = None
    if opts.config:
        asked = ModelConfig.from_hf(opts.config)
    elif opts.preset:
        asked = preset(opts.preset)
    src = resume_from or (Path(opts.init) if opts.init else None)
    if src is not None:
        model = load_model(src)
        if asked is not None:
            diff = _config_diff(asked, model.config)
            if diff:
                what = "--config" if opts.config else f"--preset {opts.preset}"
                raise TrainingError(f"{src}: checkpoint's config differs from {what}: " + "; ".join(diff[:8]))
        return model, src
    torch.manual_seed(opts.seed)
    if opts.config:
        from openk2.model import Transformer
        return Transformer(asked).float(), None
    return load_model(opts.preset or "k2-nano"), None


@contextlib.contextmanager
def _latent_weights(model, qat: str):
    """Checkpoints hold the latent (float) weights under QAT, so a resume continues exactly; the
    INT4 export is `openk2 quantize` of a checkpoint (QAT made it lossless)."""
    if qat == "none":
        yield
        return
    from openk2.quant import disable_qat, enable_qat
    disable_qat(model)
    try:
        yield
    finally:
        enable_qat(model, qat)


def _enable_qat(model, qat: str):
    if qat == "none":
        return
    try:
        from openk2.quant import enable_qat
    except ImportError:
        raise TrainingError(f"--qat {qat} needs openk2.quant.enable_qat (the INT4 work), which is not in "
                            "this checkout yet") from None
    enable_qat(model, qat)


# ---------------------------------------------------------------------------------------------------
# The loop


def denormals_flushed() -> bool:
    """Whether this thread flushes denormal floats now (torch can set the mode but not read it)."""
    return (torch.tensor([1e-39]) * 1.0).item() == 0.0  # 1e-39 is a float32 denormal


@contextlib.contextmanager
def flush_denormals(device: torch.device):
    """Flush denormal floats to zero on CPU for the duration, then restore the mode found.

    Why: once a model has trained a while its attention sharpens (k2-nano's SFT logs max_logit ~70)
    and its float32 math underflows into denormals, which x86 CPUs handle on a slow path. On the
    speedrun's SFT checkpoint openk2.train's SFT step ran 1.6x faster with them flushed, at one
    thread and at two (bench/train_speed.py --only denormal, docs/results.md). Values that small
    carry nothing for the loss; GPUs train in bf16. CPU only.
    torch sets the mode per thread: the OpenMP workers take it when they are created (at the first
    parallel op) and keep it, so this must be entered before anything runs in parallel, as
    `openk2 train` and `openk2 rl` do; workers created inside keep flushing after it exits."""
    if device.type != "cpu":
        yield
        return
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def train(opts: TrainOptions) -> dict:
    """Run (or resume) a training run; returns a summary. Raises TrainingError / DataError / ValueError
    with a message for anything the user can fix."""
    d = _init_distributed(opts.device or DEFAULTS["device"])
    try:
        with flush_denormals(d.device):
            return _train(opts, d)
    finally:
        if d.owned:
            dist.destroy_process_group()


def _train(opts: TrainOptions, d: Dist) -> dict:
    if opts.out is None:
        raise TrainingError("--out DIR is required")
    out = Path(opts.out)
    resume_from = latest_checkpoint(out)
    saved_state = None
    if resume_from is not None:
        if not opts.resume:
            raise TrainingError(f"{out} already holds a run (checkpoint {resume_from.name}); pass --resume to "
                                "continue it or choose a new --out")
        saved_state = json.loads((resume_from / "trainer.json").read_text())
    elif (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size and not opts.resume:
        raise TrainingError(f"{out} already holds a run (metrics.jsonl, no checkpoint yet); pass --resume to "
                            "restart it or choose a new --out")
    o = resolve(opts, saved_state["options"] if saved_state else None)
    if d.world > 1 and o.batch_size % d.world:
        raise TrainingError(f"--batch-size {o.batch_size} is not divisible by the {d.world} processes")
    per_rank = o.batch_size // d.world
    micro = o.micro_batch or per_rank
    if per_rank % micro:
        raise TrainingError(f"--micro-batch {micro} does not divide the {per_rank} sequences per process "
                            f"(--batch-size {o.batch_size} over {d.world} process(es))")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        if resume_from is None:
            _truncate_metrics(out / "metrics.jsonl", 0)
        else:
            _truncate_metrics(out / "metrics.jsonl", saved_state["step"])

    model, model_src = _build_model(o, resume_from)
    tokenizer = _load_tokenizer(o, resume_from or (Path(o.init) if o.init else None))
    cfg = model.config
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise TrainingError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                            f"{cfg.vocab_size}")
    data = open_data(o.data, o.seq_len, cfg.vocab_size, tokenizer, o.seed, o.gym_size, o.loss_on)
    _enable_qat(model, o.qat)
    model.to(d.device).train()
    model.mla_impl = "naive"
    # Newton-Schulz in fp32 on CPU (bf16 matmuls are ~30x slower without bf16 hardware: measured,
    # bench/train_speed.py), in bf16 on GPU (tensor cores; Muon is robust to it, as Keller Jordan's).
    optimizer = M.build_optimizer(model, o.optimizer, lr=o.lr, weight_decay=o.weight_decay,
                                  muon_lr=o.muon_lr, scale_mode=o.muon_scale,
                                  ns_dtype=torch.bfloat16 if d.device.type == "cuda" else torch.float32)
    step = 0
    tokens, elapsed = 0, 0.0
    if resume_from is not None:
        try:
            optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=d.device,
                                                 weights_only=True))
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainingError(f"{resume_from}/optimizer.pt does not fit this model/optimizer ({e})") from None
        rng = torch.load(resume_from / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        step, tokens, elapsed = saved_state["step"], saved_state["tokens"], saved_state["elapsed_s"]
    if d.main and step == 0:
        (out / "run.json").write_text(json.dumps({"options": dataclasses.asdict(o), "config": cfg.to_hf(),
                                                  "world_size": d.world}, indent=2) + "\n")
    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, broadcast_buffers=False)
    attns = M.attention_modules(model)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda"
                else contextlib.nullcontext())

    def trainer_state(step):
        return {"step": step, "tokens": tokens, "elapsed_s": elapsed_now(), "samples": step * o.batch_size,
                "options": dataclasses.asdict(o), "world_size": d.world, "source": str(model_src or "")}

    t_start = time.perf_counter()
    elapsed0 = elapsed

    def elapsed_now():
        return elapsed0 + time.perf_counter() - t_start

    last_saved = resume_from
    metrics = open(out / "metrics.jsonl", "a") if d.main else None
    progress = _Progress(o.steps, step, enabled=d.main and not o.quiet,
                         header=f"{data.describe()}\n{cfg.param_counts()['total_params'] / 1e6:.2f}M params, "
                                f"{o.optimizer}, batch {o.batch_size}x{o.seq_len}, {d.world} process(es), "
                                f"{per_rank // micro} micro-batch(es) of {micro} per process")
    row = None
    try:
        while step < o.steps:
            t0 = time.perf_counter()
            lr = lr_factor(step, o.steps, o.warmup, o.decay_frac, o.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr
            # every process reads the whole global batch's targets for the loss denominator: cheap
            # next to the forward, and it needs no communication
            full = data.batch(step * o.batch_size, o.batch_size)
            n_global = full.n_loss_tokens
            mine = full if d.world == 1 else data.batch(step * o.batch_size + d.rank * per_rank, per_rank)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, running = _forward_backward(net, attns, mine, micro, n_global, d, autocast)
            t_fb = time.perf_counter()
            if d.world > 1:
                dist.all_reduce(loss_sum)
                if running:
                    stacked = torch.stack(running)
                    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
                    running = list(stacked)
            loss = float(loss_sum) / max(n_global, 1)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else math.inf))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what = f"loss is {loss}" if not math.isfinite(loss) else f"gradient norm is {grad_norm}"
                raise TrainingError(f"step {step + 1}: {what}; stopped before the update. Last good checkpoint: "
                                    f"{last_saved if last_saved else 'none (no checkpoint was saved yet)'}")
            optimizer.step()
            t_opt = time.perf_counter()
            clipped = M.qk_clip(model, o.qk_clip_tau, running) if o.optimizer == "muonclip" else 0
            loads = M.update_router_bias(model, o.router_bias_rate)
            t_end = time.perf_counter()
            step += 1
            n_tok = o.batch_size * o.seq_len
            tokens += n_tok
            layer_max = [float(r.max()) for r in running]
            row = {"step": step, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "tokens": tokens,
                   "tokens_per_s": n_tok / (t_end - t0), "elapsed_s": elapsed_now(),
                   "max_logit": max(layer_max) if layer_max else 0.0, "max_logit_layers": layer_max,
                   # per head, so which heads QK-Clip touched (those above tau) can be read back
                   "max_logit_heads": [[float(x) for x in r.tolist()] for r in running],
                   "qk_clipped_heads": clipped, "expert_load_cv": M.load_cv(loads),
                   "expert_load": [[int(x) for x in ld.tolist()] for ld in loads],
                   "grad_norm": grad_norm, "loss_tokens": n_global,
                   "time_fwd_bwd_s": t_fb - t0, "time_opt_s": t_opt - t_fb, "time_clip_bias_s": t_end - t_opt}
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            progress.update(step, row)
            if step % o.save_every == 0 or step == o.steps:
                if d.main:
                    with _latent_weights(model, o.qat):
                        last_saved = save_checkpoint(out, step, model, optimizer, tokenizer, trainer_state(step),
                                                     o.keep)
                if d.world > 1:
                    dist.barrier()
                    last_saved = latest_checkpoint(out)
    finally:
        progress.close()
        if metrics:
            metrics.close()
    return {"steps": step, "loss": row["loss"] if row else None, "tokens": tokens,
            "checkpoint": str(last_saved) if last_saved else None, "out": str(out)}


def _forward_backward(net, attns, batch: Batch, micro: int, n_global: int, d: Dist, autocast):
    """This process's share of the step, `micro` rows per forward, gradients accumulating (DDP syncs
    on the last micro-batch only). Each micro-batch's summed cross-entropy is scaled by
    world / n_global, so after DDP's mean over ranks the gradient is that of the global batch's
    mean token loss. Returns (this process's summed loss, per-attention-module max logits)."""
    running = [torch.full_like(a.max_logit, -math.inf) for a in attns]
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    n_micro = len(batch) // micro
    for k in range(n_micro):
        mb = batch.slice(k * micro, micro).to(d.device)
        sync = contextlib.nullcontext() if (d.world == 1 or k == n_micro - 1) else net.no_sync()
        with sync:
            with autocast:
                keep = mb.targets != IGNORE
                logits = net(mb.inputs, positions=mb.positions, doc_ids=mb.doc_ids, logits_at=keep)
                ce = F.cross_entropy(logits.float(), mb.targets[keep], reduction="sum")
            (ce * (d.world / max(n_global, 1))).backward()
        loss_sum += ce.detach().double()
        for r, a in zip(running, attns):  # QK-Clip uses the max over all micro-batches
            torch.maximum(r, a.max_logit, out=r)
    return loss_sum, running


class _Progress:
    """A rich progress bar with ETA on a terminal; a plain line every 30 s (and at the end) otherwise."""

    def __init__(self, total: int, done: int, enabled: bool, header: str = ""):
        self.enabled, self.total, self.bar = enabled, total, None
        if not enabled:
            return
        from rich.console import Console
        self.console = Console(stderr=True)
        self.console.print(header)
        self.last_print = time.monotonic()
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=done, loss="-", tps="-")
            self.bar.start()

    def update(self, step: int, row: dict):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:.0f}")
        elif time.monotonic() - self.last_print > 30 or step == self.total:
            self.last_print = time.monotonic()
            self.console.print(f"step {step}/{self.total} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                               f"{row['tokens_per_s']:.0f} tok/s max_logit {row['max_logit']:.1f}")

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def heldout_loss(checkpoint: str | os.PathLike, data: str | os.PathLike, max_len: int = 1152) -> tuple[float, int]:
    """(mean cross-entropy, token count) of a checkpoint, teacher-forced, on the tokens the model
    generates (the SFT mask) of a conversation file it did not train on: read and rendered exactly
    as `openk2 train` renders its data (the agent's views when a record names a context window),
    each sequence cut to max_len tokens.

    Why: a pretrained k2-nano cannot yet be scored as an agent (every 2400-step draw answered 0 of 40
    arith tasks before SFT), but its loss on held-out gold arith separated the draws that went on to
    do arith after SFT from those that did not (docs/results.md, "choosing a draw" and "choosing
    after pretraining"): the speedrun's select stage keeps the pretraining draw with the lowest."""
    from openk2.checkpoint import load_model
    from openk2.data import read_conversations, render_conversations
    from openk2.tokenizer import load_tokenizer

    model, tok = load_model(checkpoint), load_tokenizer(checkpoint)
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in render_conversations(read_conversations(data), tok, str(data)):
            ids, keep = torch.from_numpy(ids[:max_len]), torch.from_numpy(mask[1:max_len]).bool()
            if not keep.any():
                continue
            ce = F.cross_entropy(model(ids[None])[0, :-1].float(), ids[1:], reduction="none")
            total += ce[keep].sum().item()
            n += int(keep.sum())
    if not n:
        raise DataError(f"{data}: no generated (masked) tokens in the first {max_len} of any conversation")
    return total / n, n


def fields_from_args(cls, args):
    """A dataclass of options from an argparse namespace: the fields it has, the rest ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def options_from_args(args) -> TrainOptions:
    return fields_from_args(TrainOptions, args)


def main(argv: list[str] | None = None) -> int:
    """`python -m openk2.train ARGS` (what torchrun launches) == `openk2 train ARGS`."""
    from openk2.cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
