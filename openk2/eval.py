"""The eval harness: the agent on sampled gym tasks, scored by the gym's verifiers.

    result = evaluate("models/k2-nano", "arith,chain", n=100, difficulty="chain=1,10,100,300", seed=0)
    result["families"]["chain"]["accuracy"], result["families"]["chain"]["by_difficulty"]["100"]
    print(openk2.report.format_table(result))          # `openk2 eval` prints this

MODEL: a backend object (`LocalBackend`, `EndpointBackend`: what the RL loop and the speedrun pass),
a checkpoint directory (the embedded engine), an http(s):// endpoint URL, None (the shipped
k2-nano), or a reference policy: "policy:oracle" (replays gold trajectories: 100%, the ceiling and a
check of the harness itself) or "policy:random" (random tool calls, then a random answer of the right
kind: chance; openk2/gym/policies.py).

What runs: n tasks per family from the eval split (`gym.tasks`: difficulties cycle through the given
levels, else each family's LEVELS), through `openk2.agent.run_many` (one backend, `workers` runs at
once, which the engine batches; task i runs with seed seed+i) or, with heavy=K, through
`agent_heavy.heavy` (K runs per task, votes compared by the gym's answer extractor). Families run
one after another so each family's tasks/s is its own wall time; within a family the wall time is
shared out over difficulties in proportion to their tasks' run time (runs overlap, so a row's
tasks/s says how fast this batching got through tasks of that difficulty).

Agent settings: local models run at temperature 0 under the gym's agent settings (window
gym.CONTEXT_WINDOW, or the model's own if smaller; gym.STEP_TOKENS per step), the ones their long
training trajectories were rendered under (openk2/data.py, `render_record`), so the model meets the
views it was trained on. Endpoints run with the agent's defaults, their window unmanaged unless
given, and a system message with the answer format (gym.ANSWER_HINT), which a model that never saw
the gym needs.

Scoring: reward = gym.verify(task, final content) (0 when the run ended without an answer). Per
family and per difficulty: accuracy (mean reward) with n, mean steps, mean tool calls, mean
generated tokens, budget stops (runs ended by max_steps / max_step_tokens / max_total_tokens /
wall_time), errors, mean seconds per task, tasks/s. The JSON (`--json OUT`) is the returned dict:
{"model", "split", "seed", "n", "settings", "families": {F: {"accuracy", "n", ..., "by_difficulty":
{"3": {...}}}}, "overall", "seconds", "tasks": [one record per task]}.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from openk2 import gym
from openk2.gym.core import extract_answer, normalise_text, parse_number

BUDGET_STOPS = ("max_steps", "max_step_tokens", "max_total_tokens", "wall_time")
POLICIES = ("policy:oracle", "policy:random")


def answer_key(content) -> str | None:
    """The answer in a final message as heavy mode's vote compares it (the gym's own reading:
    "Answer: 1,234" and "answer: 1234" are one vote)."""
    text = extract_answer(content)
    if text is None:
        return None
    number = parse_number(text)
    return str(number) if number is not None else normalise_text(text)


def resolve_backend(model, tasks, *, api_key=None, model_name=None, context_window=None, seed=0):
    """MODEL -> (backend, name, owned): owned backends (an engine this call started) are closed
    after the eval."""
    if hasattr(model, "session"):
        return model, getattr(model, "name", None) or type(model).__name__, False
    if model in POLICIES:
        from openk2.gym import policies
        if model == "policy:oracle":
            return policies.oracle_backend(tasks, context_window=context_window), model, False
        return policies.random_backend(tasks, seed=seed, context_window=context_window), model, False
    if isinstance(model, str) and model.startswith("policy:"):
        raise ValueError(f"unknown policy {model!r}; policies: {', '.join(POLICIES)}")
    from openk2.agent_view import DEFAULT_MODEL, make_backend
    backend = make_backend(model, api_key, model_name, context_window)
    return backend, model or DEFAULT_MODEL, not model or not str(model).startswith(("http://", "https://"))


def _is_local(backend) -> bool:
    from openk2.agent_backends import LocalBackend
    return isinstance(backend, LocalBackend)


def agent_settings(backend, context_window=None, max_step_tokens=None) -> tuple[int | None, int]:
    """(window, max_step_tokens) the eval runs with: given values win; local models get the gym's
    (window capped by the backend's own), endpoints the agent's defaults (window: the backend's)."""
    from openk2.agent import DEFAULT_MAX_STEP_TOKENS
    own = getattr(backend, "context_window", None)
    if _is_local(backend):
        window = context_window or (min(gym.CONTEXT_WINDOW, own) if own else gym.CONTEXT_WINDOW)
        return window, max_step_tokens or gym.STEP_TOKENS
    return context_window or own, max_step_tokens or DEFAULT_MAX_STEP_TOKENS


def task_input(task, hint: str | None) -> dict:
    """What the agent is given for a task: its messages (after a system message with the hint, if
    any) and its tools as (name, config) pairs."""
    messages = [dict(m) for m in task.messages]
    if hint:
        messages = [{"role": "system", "content": hint}] + messages
    return {"messages": messages, "tools": [list(t) for t in task.tools]}


def evaluate(model=None, families="all", n: int = 100, difficulty=None, seed: int = 0, *, split: str = "eval",
             temperature: float = 0.0, top_p: float = 1.0, max_steps: int | None = None,
             max_step_tokens: int | None = None, max_total_tokens: int | None = None,
             wall_time: float | None = None, context_window: int | None = None, heavy: int = 0,
             workers: int = 16, hint=None, api_key: str | None = None, model_name: str | None = None,
             label: str | None = None, progress=None) -> dict:
    """Run the agent on n eval tasks per family and score them; returns the result dict (module
    docstring). difficulty: a spec for gym.parse_difficulty ("arith=1-8,chain=1,10,100,300") or a
    dict. hint: None (endpoints get gym.ANSWER_HINT), True, False or a text. progress(done,
    total): called as tasks finish. label: the "model" name in the result."""
    from openk2.agent import DEFAULT_MAX_STEPS
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of tasks per family, got {n!r}")
    if not isinstance(heavy, int) or heavy < 0:
        raise ValueError(f"heavy must be 0 (off) or a number of trajectories, got {heavy!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    fams = gym.parse_families(families)
    levels = gym.parse_levels(difficulty, fams, among="the families evaluated")
    tasks = gym.tasks(fams, n, seed, split, levels)
    backend, name, owned = resolve_backend(model, tasks, api_key=api_key, model_name=model_name,
                                           context_window=context_window, seed=seed)
    try:
        window, step_tokens = agent_settings(backend, context_window, max_step_tokens)
        if hint is None or hint is True:
            hint = gym.ANSWER_HINT if (hint is True or not _is_local(backend)) else None
        hint = hint or None
        run_kwargs = dict(max_steps=max_steps or DEFAULT_MAX_STEPS, max_step_tokens=step_tokens,
                          max_total_tokens=max_total_tokens, wall_time=wall_time, context_window=window,
                          temperature=temperature, top_p=top_p)
        counter = _Progress(len(tasks), progress)
        out_families, records = {}, []
        t_start = time.monotonic()
        for fam in fams:
            first = next(i for i, t in enumerate(tasks) if t.family == fam)
            ftasks = [t for t in tasks if t.family == fam]
            inputs = [task_input(t, hint) for t in ftasks]
            t0 = time.monotonic()
            traces = _run(inputs, backend, heavy, workers, seed + first * max(1, heavy + 1), run_kwargs, counter)
            wall = time.monotonic() - t0
            recs = [_record(t, tr) for t, tr in zip(ftasks, traces)]
            records += recs
            out_families[fam] = summarise(recs, wall)
        seconds = time.monotonic() - t_start
    finally:
        if owned:
            close = getattr(getattr(backend, "engine", None), "close", None)
            if close:
                close()
    overall = summarise(records, seconds)
    overall.pop("by_difficulty")
    settings = {k: v for k, v in run_kwargs.items()}
    settings.update(heavy=heavy, workers=workers, hint=hint is not None)
    return {"model": label or name, "split": split, "seed": seed, "n": n,
            "difficulty": {f: sorted({t.difficulty for t in tasks if t.family == f}) for f in fams},
            "settings": settings, "families": out_families, "overall": overall,
            "seconds": round(seconds, 3), "tasks": records}


class _Progress:
    def __init__(self, total, callback):
        self.total, self.callback, self.done = total, callback, 0
        self.lock = threading.Lock()

    def step(self):
        if self.callback is None:
            return
        with self.lock:
            self.done += 1
            done = self.done
        self.callback(done, self.total)


def _run(inputs, backend, heavy, workers, seed, run_kwargs, counter) -> list:
    """Traces of `inputs`, in order: run_many, or heavy mode (K runs per task) on a pool."""
    from openk2.agent import run_many
    if not heavy:
        def on_event(e):
            if e["kind"] == "stop":
                counter.step()
        return run_many(inputs, backend, workers=workers, seed=seed, on_event=on_event, **run_kwargs)
    from openk2.agent_heavy import heavy as heavy_run

    def one(i):
        try:
            return heavy_run(inputs[i], backend, None, heavy, normalise=answer_key, seed=seed + i * (heavy + 1),
                             **run_kwargs)
        finally:
            counter.step()
    with ThreadPoolExecutor(max_workers=max(1, min(len(inputs), workers // heavy or 1)),
                            thread_name_prefix="openk2-eval") as pool:
        return list(pool.map(one, range(len(inputs))))


def _all_steps(trace) -> list:
    return list(trace.steps) + [s for t in trace.trajectories for s in t.steps]


def _record(task, trace) -> dict:
    """One task's outcome (JSON)."""
    steps = _all_steps(trace)
    content = trace.content if trace.stop_reason == "final" else ""
    rec = {"id": task.meta.get("id"), "family": task.family, "difficulty": task.difficulty,
           "reward": float(gym.verify(task, content)), "stop_reason": trace.stop_reason,
           "steps": len(steps), "tool_calls": sum(len(s.tool_calls) for s in steps),
           "generated_tokens": sum(s.generated_tokens for s in steps),
           "context_changes": sum(1 for s in steps if s.context), "seconds": round(trace.seconds, 4),
           "answer": task.answer, "given": extract_answer(content)}
    if trace.error_line:
        rec["error"] = trace.error_line
    if trace.aggregation:
        rec["aggregation"] = {k: trace.aggregation[k] for k in ("method", "votes") if k in trace.aggregation}
    return rec


def summarise(records: list, wall: float) -> dict:
    """Metrics of a group of task records; by_difficulty splits the group's wall time over
    difficulties in proportion to their tasks' run time (see the module docstring)."""
    out = _metrics(records, wall)
    busy = sum(r["seconds"] for r in records)
    by = {}
    for d in sorted({r["difficulty"] for r in records}):
        rows = [r for r in records if r["difficulty"] == d]
        share = sum(r["seconds"] for r in rows) / busy if busy > 0 else len(rows) / len(records)
        by[str(d)] = _metrics(rows, wall * share)
    out["by_difficulty"] = by
    return out


def _metrics(rows: list, wall: float) -> dict:
    k = len(rows)
    if k == 0:
        return {"accuracy": 0.0, "n": 0}

    def mean(key):
        return round(sum(r[key] for r in rows) / k, 2)
    return {"accuracy": round(sum(r["reward"] for r in rows) / k, 4), "n": k,
            "correct": sum(1 for r in rows if r["reward"] == 1.0),
            "mean_steps": mean("steps"), "mean_tool_calls": mean("tool_calls"),
            "mean_generated_tokens": mean("generated_tokens"),
            "budget_stops": sum(1 for r in rows if r["stop_reason"] in BUDGET_STOPS),
            "errors": sum(1 for r in rows if r["stop_reason"] == "error"),
            "mean_seconds": round(sum(r["seconds"] for r in rows) / k, 3),
            "tasks_per_s": round(k / wall, 3) if wall > 0 else None}
