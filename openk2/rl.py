"""`openk2 rl`: reinforcement learning with verifiable rewards, as Kimi K1.5 / K2 did it, on the gym.

One step:
  1. prompts from the gym's "rl" split (openk2/rl_rollout.py), K trajectories each, all through the
     agent on the engine at once, at the step's temperature (decaying from --temperature to
     --temperature-end); tools run, their outputs are forced and masked out;
  2. rewards: the family's verifier, or for rubric families (gym.brief) a critic's pairwise
     preferences (openk2/critic.py); a run cut by its family's --budget gets -penalty on top;
  3. the K1.5 objective (openk2/rl_objective.py) over whole trajectories, pi_old recomputed by the
     training forward (INT4 fake-quant on when the rollouts ran INT4), plus --ptx-weight times the
     cross-entropy of gold trajectories (against forgetting); Muon(Clip) updates, QK-Clip, the
     router's bias step;
  4. `engine.update_weights` with the new weights, INT4-compressed for an INT4 engine
     (openk2/rl_policy.py), so the next rollouts sample from the updated policy;
  5. a metrics line (OUT/metrics.jsonl: reward, accuracy per family, tokens, truncations, drift
     from the start policy, tokens/s, seeds, timings) and, every --save-every steps, a checkpoint
     like training's (openk2.train.save_checkpoint: atomic, `latest`, optimizer and options; the
     model as latent weights, so a resume continues exactly where it stopped) and the curves
     (OUT/rl.png).

Resuming (--resume) reloads the policy, the optimizer and the options; the prompts and seeds of a
step are functions of (seed, step), so the run continues on the same task stream. The samples are
reproducible given the weights, up to the engine's batched float arithmetic.

Under torchrun each rank rolls out its share of the prompts on its own engine; gradients are summed
over ranks (one all-reduce of the flattened gradients: ranks may hold different numbers of
micro-batches), so every rank applies the same update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from openk2 import gym
from openk2 import muon as M
from openk2 import rl_objective as O
from openk2 import rl_rollout as R


class RLError(ValueError):
    """The run cannot go on (bad options, a non-finite loss); the message says why."""


@dataclass
class RLOptions:
    """Every field None means "the default" for a new run and "what the run used" on --resume."""
    model: str | None = None
    out: str | None = None
    tokenizer: str | None = None
    tasks: str | None = None
    difficulty: str | None = None
    steps: int | None = None
    prompts: int | None = None       # prompts per step (over all processes)
    samples: int | None = None       # K: trajectories per prompt
    kl_tau: float | None = None
    lr: float | None = None
    muon_lr: float | None = None
    weight_decay: float | None = None
    warmup: int | None = None
    optimizer: str | None = None
    qk_clip_tau: float | None = None
    router_bias_rate: float | None = None
    grad_clip: float | None = None
    updates: int | None = None       # optimizer steps per batch of rollouts
    budget: str | None = None
    truncation_penalty: float | None = None
    ptx_weight: float | None = None
    ptx_batch: int | None = None
    ptx_tasks: str | None = None
    ptx_difficulty: str | None = None  # levels of the PTX gold data per family ("" = the SFT mix)
    temperature: float | None = None
    temperature_end: float | None = None
    temperature_schedule: str | None = None
    top_p: float | None = None
    max_steps: int | None = None     # agent model calls per trajectory
    context_window: int | None = None
    micro_tokens: int | None = None
    qat: str | None = None
    critic: str | None = None
    critic_model_name: str | None = None
    drift_every: int | None = None
    seed: int | None = None
    save_every: int | None = None
    keep: int | None = None
    export: str | None = None
    device: str | None = None
    resume: bool = False
    quiet: bool = False


DEFAULTS = dict(tasks="arith,chain", steps=50, prompts=8, samples=4, kl_tau=0.1, lr=1e-4, weight_decay=0.0,
                warmup=0, optimizer="muonclip", qk_clip_tau=100.0, router_bias_rate=1e-3, grad_clip=1.0,
                updates=1, truncation_penalty=0.5, ptx_weight=0.1, ptx_batch=4, ptx_tasks="all",
                ptx_difficulty="",
                temperature=1.0, temperature_end=0.6, temperature_schedule="linear", top_p=1.0,
                max_steps=100, micro_tokens=16384, qat="auto", drift_every=1, seed=0, save_every=10,
                keep=2, device="auto")
RESUMABLE = {"out", "steps", "save_every", "keep", "device", "resume", "quiet", "export", "drift_every",
             "micro_tokens", "critic", "critic_model_name"}


def resolve(opts: RLOptions, saved: dict | None = None, has_critic: bool = False) -> RLOptions:
    """Fill unset options from the resumed run (set ones must agree with it) or the defaults.
    has_critic: a Critic object is supplied (no --critic needed for rubric families)."""
    out, clash = {}, []
    for f in dataclasses.fields(RLOptions):
        v = getattr(opts, f.name)
        if saved is not None and f.name in saved:
            s = saved[f.name]
            if v is None:
                v = s
            elif f.name not in RESUMABLE and v != s:
                clash.append(f"--{f.name.replace('_', '-')} {v} (the run used {s})")
        out[f.name] = DEFAULTS.get(f.name) if v is None else v
    if clash:
        raise RLError("--resume with options that differ from the run being resumed: " + "; ".join(clash))
    o = RLOptions(**out)
    if o.out is None:
        raise RLError("--out DIR is required")
    if o.model is None:
        raise RLError("MODEL is required: the checkpoint to start from (e.g. models/k2-nano)")
    if not Path(o.model).is_dir() and o.model not in _presets():
        raise RLError(f"MODEL {o.model!r} is neither a checkpoint directory nor a preset")
    for name in ("model", "tokenizer"):
        v = getattr(o, name)
        if v and Path(v).is_dir():
            setattr(o, name, str(Path(v).resolve()))
    checks = [(o.steps >= 1, "--steps must be >= 1"), (o.prompts >= 1, "--prompts must be >= 1"),
              (o.samples >= 2, "--samples must be >= 2 (the objective compares a prompt's samples)"),
              (o.kl_tau > 0, "--kl-tau must be > 0"), (o.lr > 0, "--lr must be > 0"),
              (o.updates >= 1, "--updates must be >= 1"), (o.ptx_weight >= 0, "--ptx-weight must be >= 0"),
              (o.ptx_batch >= 0, "--ptx-batch must be >= 0"), (o.truncation_penalty >= 0,
                                                               "--truncation-penalty must be >= 0"),
              (o.optimizer in ("muonclip", "muon", "adamw"), "--optimizer must be muonclip, muon or adamw"),
              (o.qat in ("auto", "none", "experts", "all"), "--qat must be auto, none, experts or all"),
              (o.micro_tokens >= 1, "--micro-tokens must be >= 1"), (o.max_steps >= 1, "--max-steps must be >= 1"),
              (o.save_every >= 1, "--save-every must be >= 1"), (o.keep >= 1, "--keep must be >= 1"),
              (0 < o.top_p <= 1, "--top-p must be in (0, 1]")]
    for ok, why in checks:
        if not ok:
            raise RLError(why)
    O.temperature_at(0, o.steps, o.temperature, o.temperature_end, o.temperature_schedule)  # validates
    fams = gym.parse_families(o.tasks)
    gym.parse_levels(o.difficulty, fams, "--difficulty", "--tasks")
    R.parse_budgets(o.budget, fams)
    sandboxed = [f for f in fams if any(name == "python" for name, _ in gym.sample(f, 0, 0, "rl").tools)]
    if sandboxed:  # else every rollout's python call fails, its reward is 0, and the run learns nothing
        from openk2.tools.sandbox import unavailable_reason
        why = unavailable_reason()
        if why:
            raise RLError(f"{', '.join(sandboxed)}: its tasks run the python tool, which cannot run here: {why}")
    if o.ptx_weight > 0 and o.ptx_batch > 0:
        gym.parse_levels(o.ptx_difficulty, gym.parse_families(o.ptx_tasks), "--ptx-difficulty", "--ptx-tasks")
    if any(gym.reward_kind(f) == "rubric" for f in fams) and not (o.critic or has_critic):
        raise RLError(f"{', '.join(f for f in fams if gym.reward_kind(f) == 'rubric')}: rewarded by a rubric; "
                      "give --critic self (the policy judges its own samples) or --critic URL (an endpoint)")
    return o


def _presets():
    from openk2.config import PRESETS
    return PRESETS


# ---------------------------------------------------------------------------------------------------
# Setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owned: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    from openk2.checkpoint import resolve_device
    try:
        device = resolve_device(device)
    except ValueError as e:
        raise RLError(str(e)) from None
    d = Dist(device=torch.device(device))
    if world > 1:
        d.rank, d.world = int(os.environ["RANK"]), world
        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            d.device = torch.device("cuda", local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
            d.owned = True
    return d


def _tokenizer(o: RLOptions, src: Path | None):
    from openk2.tokenizer import load_tokenizer
    for cand in (o.tokenizer, src, o.model):
        if cand and (Path(cand) / "tokenizer.json").is_file():
            return load_tokenizer(cand)
    raise RLError(f"no tokenizer: {o.model} has no tokenizer.json; pass --tokenizer DIR")


def _load_policy(src: str, qat: str, device):
    """(trainable policy on `device`, the qat actually used)."""
    from openk2.checkpoint import load_model
    from openk2 import rl_policy as P
    net = load_model(src)
    if qat == "none" and P.has_int4(net):
        raise RLError(f"{src} is INT4: its policy trains with INT4 fake-quant (--qat auto or experts), not --qat none")
    if qat == "auto":
        qat = "experts" if P.has_int4(net) else "none"
    bad = P.trainable(net, qat)
    if bad:
        print(f"openk2 rl: warning: {bad} INT4 weight groups of {src} could not be reproduced exactly by "
              "the training forward", file=sys.stderr)
    return net.to(device), qat


def _critic(o: RLOptions, backend, api_key):
    if not o.critic:
        return None
    from openk2.critic import Critic
    if o.critic == "self":
        return Critic(backend, seed=o.seed)
    if o.critic.startswith(("http://", "https://")):
        from openk2.agent_backends import EndpointBackend
        return Critic(EndpointBackend(o.critic, model=o.critic_model_name, api_key=api_key), seed=o.seed)
    raise RLError(f"--critic {o.critic!r}: expected 'self' or an http(s):// endpoint URL")


# ---------------------------------------------------------------------------------------------------
# The loop


def rl(opts: RLOptions, *, critic_api_key: str | None = None, critic=None, on_step=None) -> dict:
    """Run (or resume) an RL run; returns a summary. `critic` (a Critic) overrides --critic (tests,
    a custom judge); on_step(row) sees every metrics row."""
    from openk2.train import flush_denormals
    d = _init_distributed(opts.device or DEFAULTS["device"])
    try:
        with flush_denormals(d.device):
            return _rl(opts, d, critic_api_key, critic, on_step)
    finally:
        if d.owned:
            dist.destroy_process_group()


def _rl(opts: RLOptions, d: Dist, critic_api_key, critic_override, on_step) -> dict:
    from openk2.agent_backends import LocalBackend
    from openk2.engine import Engine
    from openk2.eval import agent_settings
    from openk2 import rl_policy as P
    from openk2.train import _clean_stale, _latent_weights, _truncate_metrics, latest_checkpoint, lr_factor, \
        save_checkpoint

    if opts.out is None:
        raise RLError("--out DIR is required")
    out = Path(opts.out)
    resume_from = latest_checkpoint(out)
    saved = None
    if resume_from is not None:
        if not opts.resume:
            raise RLError(f"{out} already holds a run (checkpoint {resume_from.name}); pass --resume to continue "
                          "it or choose a new --out")
        saved = json.loads((resume_from / "trainer.json").read_text())
    elif (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size and not opts.resume:
        raise RLError(f"{out} already holds a run (metrics.jsonl); pass --resume or choose a new --out")
    o = resolve(opts, saved["options"] if saved else None, has_critic=critic_override is not None)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        _clean_stale(out)
        _truncate_metrics(out / "metrics.jsonl", saved["step"] if saved else 0)

    fams = gym.parse_families(o.tasks)
    levels = gym.parse_difficulty(o.difficulty)
    budgets = R.parse_budgets(o.budget, fams)
    ptx_fams = gym.parse_families(o.ptx_tasks) if o.ptx_weight > 0 and o.ptx_batch > 0 else []
    ptx_levels = gym.parse_difficulty(o.ptx_difficulty)
    tok = _tokenizer(o, resume_from)

    # the policy (trainable), its start (for the drift), and the engine's INT4 copy
    policy, qat = _load_policy(str(resume_from or o.model), saved["qat"] if saved else o.qat, d.device)
    start = P.start_policy(_load_policy(o.model, qat, d.device)[0] if resume_from else policy)
    if tok.vocab_size > policy.config.vocab_size:
        raise RLError(f"the tokenizer has {tok.vocab_size} ids, the model {policy.config.vocab_size}")
    engine_net = P.engine_model(policy)
    n_traj = max(1, o.prompts // d.world + 1) * o.samples
    engine = Engine(engine_net, tok, cache_tokens=max(65536, n_traj * 2048), max_batch=max(64, n_traj))
    backend = LocalBackend(engine, tok, context_window=getattr(policy.config, "max_position_embeddings", None))
    window, step_tokens = agent_settings(backend, o.context_window, None)
    critic = critic_override or _critic(o, backend, critic_api_key)

    policy.train()
    policy.mla_impl = "naive"
    optimizer = M.build_optimizer(policy, o.optimizer, lr=o.lr, weight_decay=o.weight_decay, muon_lr=o.muon_lr,
                                  ns_dtype=torch.bfloat16 if d.device.type == "cuda" else torch.float32)
    step, elapsed0 = 0, 0.0
    if resume_from is not None:
        optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=d.device, weights_only=True))
        step, elapsed0 = saved["step"], saved["elapsed_s"]
    if d.main and step == 0:
        (out / "run.json").write_text(json.dumps({"options": dataclasses.asdict(o), "qat": qat,
                                                  "config": policy.config.to_hf(), "world_size": d.world,
                                                  "families": fams, "budgets": budgets,
                                                  "window": window, "step_tokens": step_tokens}, indent=2) + "\n")
    attns = M.attention_modules(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    start_weights = [p.detach().clone() for p in params]
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else contextlib.nullcontext())
    t_start = time.perf_counter()
    metrics = open(out / "metrics.jsonl", "a") if d.main else None
    last_saved, row, last_plot = resume_from, None, time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if d.main and not o.quiet else (lambda msg: None)
    say(f"openk2 rl: {o.model} ({qat} fake-quant), {', '.join(fams)}; {o.prompts} prompts x {o.samples} samples "
        f"per step, {o.steps} steps, window {window}, budgets {budgets or 'none'}")

    def state(step):
        return {"step": step, "elapsed_s": elapsed0 + time.perf_counter() - t_start, "qat": qat,
                "options": dataclasses.asdict(o), "world_size": d.world, "source": o.model}

    try:
        while step < o.steps:
            t0 = time.perf_counter()
            temp = O.temperature_at(step, o.steps, o.temperature, o.temperature_end, o.temperature_schedule)
            lr = lr_factor(step, o.steps, o.warmup, 0.0, 1.0)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr
            seed = R.step_seed(o.seed, step)
            tasks = R.step_tasks(fams, levels, o.seed, step, o.prompts, d.rank, d.world)
            samples = R.rollout(backend, tasks, o.samples, temperature=temp, seed=seed + d.rank * 100_003,
                                budgets=budgets, window=window, step_tokens=step_tokens, max_steps=o.max_steps,
                                top_p=o.top_p)
            t_roll = time.perf_counter()
            critic_stats = R.score(samples, critic, o.truncation_penalty)
            t_score = time.perf_counter()
            ptx = (R.gold_sequences(ptx_fams, o.seed, (step * d.world + d.rank) * o.ptx_batch, o.ptx_batch, tok,
                                    window, step_tokens, ptx_levels) if ptx_fams else [])
            stats = _update(policy, start, optimizer, attns, params, samples, ptx, o, d, autocast,
                            drift=o.drift_every and step % o.drift_every == 0)
            t_train = time.perf_counter()
            engine.update_weights(P.engine_state(policy, engine.model))
            t_end = time.perf_counter()
            step += 1
            row = _row(step, samples, fams, stats, critic_stats, o.ptx_weight, d)
            row.update(temperature=temp, lr=optimizer.param_groups[0]["lr"], seed=seed,
                       weight_drift=_weight_drift(params, start_weights),
                       rollout_tokens_per_s=row["generated_tokens"] / max(t_roll - t0, 1e-9),
                       train_tokens_per_s=row["train_tokens"] / max(t_train - t_score, 1e-9),
                       time_rollout_s=t_roll - t0, time_score_s=t_score - t_roll, time_train_s=t_train - t_score,
                       time_sync_s=t_end - t_train, step_seconds=t_end - t0, elapsed_s=state(step)["elapsed_s"])
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if on_step:
                on_step(row)
            say(_line(row, o.steps))
            if step % o.save_every == 0 or step == o.steps:
                if d.main:
                    with _latent_weights(policy, "none" if qat == "none" else qat):
                        last_saved = save_checkpoint(out, step, policy, optimizer, tok, state(step), o.keep)
                    if step == o.steps or time.perf_counter() - last_plot > 300:   # a plot costs seconds
                        _plot(out)
                        last_plot = time.perf_counter()
                if d.world > 1:
                    dist.barrier()
    finally:
        if metrics:
            metrics.close()
        engine.close()
    if o.export and d.main:
        _export(engine.model, tok, Path(o.export))
    return {"steps": step, "reward": row["reward"] if row else None, "out": str(out),
            "checkpoint": str(last_saved) if last_saved else None, "export": o.export}


def _update(policy, start, optimizer, attns, params, samples, ptx, o, d, autocast, drift: bool) -> dict:
    """The optimizer step(s) on one batch of rollouts (+ PTX): see the module docstring."""
    adv_all = O.advantages([s.reward for s in samples], [s.group for s in samples]) if samples else torch.zeros(0)
    # with one update per batch a zero-advantage trajectory has zero gradient: skip its forward
    pick = [i for i, s in enumerate(samples) if s.views and (o.updates > 1 or adv_all[i] != 0)]
    n_global = _sum(len(samples), d)
    n_ptx = sum(sum(m[1:]) for _, m in ptx)
    n_ptx_global = _sum(n_ptx, d)
    lengths = [[len(ids) for ids, _ in samples[i].views] for i in pick]
    batches = O.micro_batches(lengths, o.micro_tokens)
    ptx_batches = O.micro_batches([[len(ids)] for ids, _ in ptx], o.micro_tokens)
    old = torch.zeros(len(pick))
    adv = adv_all[pick] if pick else torch.zeros(0)
    out = {"rl_loss": 0.0, "ptx_loss": 0.0, "trained": len(pick), "train_tokens": 0, "drift_sum": 0.0,
           "drift_tokens": 0, "log_ratio": 0.0, "grad_norm": 0.0, "qk_clipped_heads": 0, "max_logit": 0.0}
    for u in range(o.updates):
        optimizer.zero_grad(set_to_none=True)
        running = [torch.full_like(a.max_logit, -math.inf) for a in attns]
        rl_sum, ratio_sum = 0.0, 0.0
        for mb in batches:
            rows = O.make_rows([samples[pick[i]].views for i in mb]).to(d.device)
            idx = torch.tensor(mb)
            with autocast:
                logp, tok_lp = O.trajectory_logprobs(policy, rows)
            if u == 0:
                old[idx] = logp.detach().float().cpu()
                if drift:
                    with torch.no_grad(), autocast:
                        ref = O.token_logprobs(start, rows)
                    out["drift_sum"] += float((tok_lp.detach() - ref).sum())
                    out["drift_tokens"] += tok_lp.numel()
                out["train_tokens"] += rows.tokens
            terms = O.k15_terms(logp.float(), old[idx].to(logp.device), adv[idx].to(logp.device), o.kl_tau)
            (terms.sum() / max(n_global, 1)).backward()
            rl_sum += float(terms.detach().sum())
            ratio_sum += float((logp.detach().float().cpu() - old[idx]).abs().sum())
            for r, a in zip(running, attns):
                torch.maximum(r, a.max_logit, out=r)
        ptx_sum = 0.0
        for mb in ptx_batches:
            rows = O.make_rows([[ptx[i]] for i in mb]).to(d.device)
            with autocast:
                ce, _ = O.ptx_loss(policy, rows)
            (ce * (o.ptx_weight / max(n_ptx_global, 1))).backward()
            ptx_sum += float(ce.detach())
            for r, a in zip(running, attns):
                torch.maximum(r, a.max_logit, out=r)
        if d.world > 1:
            _all_reduce_grads(params)
            stacked = torch.stack(running) if running else None
            if stacked is not None:
                dist.all_reduce(stacked, op=dist.ReduceOp.MAX)
                running = list(stacked)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else math.inf))
        rl_loss = _sum(rl_sum, d) / max(n_global, 1)
        if not (math.isfinite(rl_loss) and math.isfinite(grad_norm)):
            raise RLError(f"non-finite loss ({rl_loss}) or gradient norm ({grad_norm}); stopped before the update")
        optimizer.step()
        clipped = M.qk_clip(policy, o.qk_clip_tau, running) if o.optimizer == "muonclip" and running else 0
        M.update_router_bias(policy, o.router_bias_rate)
        layer_max = [float(r.max()) for r in running if torch.isfinite(r).any()]
        out.update(rl_loss=rl_loss, ptx_loss=_sum(ptx_sum, d) / max(n_ptx_global, 1), grad_norm=grad_norm,
                   qk_clipped_heads=out["qk_clipped_heads"] + clipped,
                   max_logit=max(layer_max) if layer_max else 0.0,
                   log_ratio=_sum(ratio_sum, d) / max(_sum(len(pick), d), 1))
    return out


def _sum(x, d: Dist):
    if d.world == 1:
        return x
    t = torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() if isinstance(x, float) else int(t.item())


def _all_reduce_grads(params):
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[at:at + n].view_as(p).clone()
        at += n


@torch.no_grad()
def _weight_drift(params, start) -> float:
    """||theta - theta_0|| / ||theta_0|| over all trainable parameters."""
    num = sum(float((p - s).float().pow(2).sum()) for p, s in zip(params, start))
    den = sum(float(s.float().pow(2).sum()) for s in start)
    return math.sqrt(num / max(den, 1e-30))


def _row(step, samples, fams, stats, critic_stats, ptx_weight, d: Dist) -> dict:
    """The step's metrics (over all ranks)."""
    recs = [{"family": s.task.family, "id": s.task.meta.get("id"), "reward": s.reward, "score": s.score,
             "correct": float(gym.verify(s.task, s.content)), "check": _check(s), "tokens": s.tokens,
             "truncated": s.truncated, "stop": s.trace.stop_reason, "group": s.group,
             "error": s.trace.error_line}
            for s in samples]
    if d.world > 1:
        everyone = [None] * d.world
        dist.all_gather_object(everyone, recs)
        recs = [r for part in everyone for r in part]

    def summary(rs):
        n = len(rs)
        if not n:
            return {"n": 0}
        out = {"n": n, "reward": sum(r["reward"] for r in rs) / n, "score": sum(r["score"] for r in rs) / n,
               "accuracy": sum(r["correct"] for r in rs) / n, "mean_tokens": sum(r["tokens"] for r in rs) / n,
               "truncated": sum(r["truncated"] for r in rs)}
        checked = [r["check"] for r in rs if r["check"] is not None]
        if checked:
            out["rubric_score"] = sum(checked) / len(checked)
        return out
    groups = {}
    for r in recs:
        groups.setdefault(r["group"], []).append(r["reward"])
    stops = {}
    for r in recs:
        stops[r["stop"]] = stops.get(r["stop"], 0) + 1
    row = {"step": step, **summary(recs), "families": {f: summary([r for r in recs if r["family"] == f]) for f in fams},
           "groups": len(groups), "groups_with_signal": sum(1 for g in groups.values() if max(g) > min(g)),
           "generated_tokens": sum(r["tokens"] for r in recs), "stop_reasons": stops,
           "prompts": sorted({r["id"] for r in recs}), **{k: _sum(v, d) for k, v in critic_stats.items()}}
    errors = [f"{r['id']}: {r['error']}" for r in recs if r["error"]]
    if errors:  # why a rollout ended in "error" (a task that outgrew the window, a backend failure): scored 0
        row["errors"] = errors
    row["truncations"] = row.pop("truncated")
    drift_n = _sum(stats["drift_tokens"], d)
    row.update(loss=stats["rl_loss"] + ptx_weight * stats["ptx_loss"], rl_loss=stats["rl_loss"],
               ptx_loss=stats["ptx_loss"], trained=_sum(stats["trained"], d),
               train_tokens=_sum(stats["train_tokens"], d),
               log_ratio=stats["log_ratio"],
               drift_kl=_sum(stats["drift_sum"], d) / drift_n if drift_n else None,
               grad_norm=stats["grad_norm"], max_logit=stats["max_logit"], qk_clipped_heads=stats["qk_clipped_heads"])
    return row


def _check(s) -> float | None:
    """A rubric family's programmatic reading of the sample (what the critic judged), for the logs."""
    mod = gym.family(s.task.family)
    return float(mod.rubric_score(s.task, s.content)) if hasattr(mod, "rubric_score") else None


def _line(row, total) -> str:
    fam = " ".join(f"{f} {v['accuracy']:.2f}/{v['mean_tokens']:.0f}t" for f, v in row["families"].items() if v["n"])
    drift = f" drift {row['drift_kl']:.4f}" if row.get("drift_kl") is not None else ""
    return (f"step {row['step']}/{total} reward {row['reward']:.3f} | {fam} | trunc {row['truncations']} "
            f"signal {row['groups_with_signal']}/{row['groups']} T {row['temperature']:.2f}{drift} "
            f"| {row['step_seconds']:.1f}s ({row['time_rollout_s']:.0f} roll, {row['time_train_s']:.0f} train)")


def _plot(out: Path):
    try:
        from openk2.rl_plot import plot_rl
        plot_rl([out], out / "rl.png")
    except Exception as e:  # a plot must never stop a run
        print(f"openk2 rl: could not plot ({type(e).__name__}: {e})", file=sys.stderr)


def _export(net, tok, dst: Path):
    """The policy as the engine runs it (INT4 when QAT): a checkpoint `openk2 serve/eval` load."""
    from openk2.checkpoint import save_model
    dst.mkdir(parents=True, exist_ok=True)
    save_model(net, dst)
    tok.save(dst)


def options_from_args(args) -> RLOptions:
    from openk2.train import fields_from_args
    return fields_from_args(RLOptions, args)


def main(argv: list[str] | None = None) -> int:
    """`python -m openk2.rl ARGS` (what torchrun launches) == `openk2 rl ARGS`."""
    from openk2.cli import main as cli_main
    return cli_main(["rl", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
