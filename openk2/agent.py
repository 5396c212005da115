"""The thinking agent: reason, call tools, read the results, reason again, for hundreds of steps.

    trace = run("What is 17 * 23?", backend, tools=["calculator"])
    trace.content, trace.stop_reason, trace.steps[i].tool_calls, trace.to_json()

One step is one model call. The model's output is parsed into reasoning / content / tool calls
(openk2.chat); the calls of a step run concurrently through `openk2.tools.call` (which turns every
bad argument into an error text rather than an exception), their results are appended as tool
messages, and the model is called again on the same turn, its earlier reasoning still in view (as
K2 requires). The run ends with a final answer (a step without tool calls) or a budget:

    stop_reason   final | max_steps | max_step_tokens | max_total_tokens | wall_time | error | interrupted

Malformed output never crashes the loop: an unknown tool, arguments that are not JSON or fail the
schema come back as that call's error result; format errors the parser reports (a call that names
no function, an unclosed section, ...) come back as one `format_error` system message, and a
malformed step with neither tool calls nor content is not taken as a final answer.

Context: the backend's window (or `context_window=`) bounds every request; openk2/agent_context.py
decides what the model sees when the conversation outgrows it. Backends: openk2/agent_backends.py
(the embedded engine, appending ids so each step costs only its new tokens; or an OpenAI-compatible
endpoint). Heavy mode: openk2/agent_heavy.py. The terminal view and CLI: openk2/agent_view.py.

Runs are independent and thread-safe given their own stop events: heavy mode, eval and RL run many
at once against one backend, and the engine batches them. Given a seed, step k of a run samples
with a seed derived from (seed, k), so a run is reproducible whatever else runs beside it.
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

from openk2.agent_backends import EndpointBackend, GenParams, LocalBackend  # noqa: F401  (re-exported)
from openk2.agent_context import ContextManager

STOP_REASONS = ("final", "max_steps", "max_step_tokens", "max_total_tokens", "wall_time", "error", "interrupted")
DEFAULT_MAX_STEPS = 400
DEFAULT_MAX_STEP_TOKENS = 4096


@dataclass
class Step:
    """One model call and the tool calls it made."""
    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)  # OpenAI tool calls, as the model wrote them
    results: list = field(default_factory=list)     # per call: {"id", "name", "content", "error", "seconds"}
    errors: list = field(default_factory=list)      # format errors in the output (shown to the model)
    finish_reason: str = ""      # stop | length | cancelled
    prompt_tokens: int = 0       # the request's prompt (view + generation header)
    new_tokens: int = 0          # prompt tokens computed for this step: the engine's count if it reports
                                 # cached_tokens, else those not in the previous request's sequence
    generated_tokens: int = 0
    seconds: float = 0.0         # model time
    tool_seconds: float = 0.0    # wall time of the step's (concurrent) tool calls
    context: dict | None = None  # the view changed before this step: see ContextManager.fit
    # local backend only (what RL trains on): the prompt is prompt_ids when the view was rendered
    # afresh for this step, else the previous step's prompt + generated_ids + this forced_ids.
    prompt_ids: list | None = None
    forced_ids: list | None = None
    generated_ids: list | None = None
    logprobs: list | None = None


@dataclass
class Trace:
    """A run: the whole conversation (nothing hidden), its steps, the final content and why it ended."""
    messages: list
    n_input: int = 0                 # messages[:n_input] were given to run()
    tools: list = field(default_factory=list)   # the OpenAI tool definitions the model saw
    steps: list = field(default_factory=list)
    content: str = ""                # the final answer ("" when the run ended without one)
    stop_reason: str = ""
    error: str | None = None
    seconds: float = 0.0
    seed: int | None = None
    trajectories: list = field(default_factory=list)  # heavy mode: the K runs
    aggregation: dict | None = None                   # heavy mode: {"method": vote|reflect, ...}

    @property
    def generated_tokens(self) -> int:
        return sum(s.generated_tokens for s in self.steps) + sum(t.generated_tokens for t in self.trajectories)

    @property
    def new_tokens(self) -> int:
        return sum(s.new_tokens for s in self.steps) + sum(t.new_tokens for t in self.trajectories)

    @property
    def tool_calls(self) -> int:
        return sum(len(s.tool_calls) for s in self.steps)

    @property
    def error_line(self) -> str | None:
        """The first line of `error` (a backend failure's traceback follows it): for eval records and RL
        metrics."""
        lines = (self.error or "").strip().splitlines()
        return lines[0] if lines else None

    def prompt_ids(self, k: int) -> list[int] | None:
        """The full prompt ids of step k (local backend), rebuilt from the appended pieces."""
        j = k
        while j >= 0 and self.steps[j].prompt_ids is None:
            j -= 1
        if j < 0 or self.steps[k].generated_ids is None:
            return None
        ids = list(self.steps[j].prompt_ids)
        for s in self.steps[j + 1:k + 1]:
            ids += self.steps[s.index - 1].generated_ids + s.forced_ids
        return ids

    def sequences(self) -> list[dict]:
        """Training sequences (local backend): one per view the model saw, each {"ids", "mask",
        "logprobs"} with mask 1 (and the sampling logprob) on generated tokens, 0 on prompt and
        forced tokens. Concatenating a view's prompt, outputs and forced ids gives exactly the
        sequence the engine ran."""
        out = []
        for s in self.steps:
            if s.generated_ids is None:
                return []
            if s.prompt_ids is not None:
                cur = {"ids": list(s.prompt_ids), "mask": [0] * len(s.prompt_ids), "logprobs": [0.0] * len(s.prompt_ids)}
                out.append(cur)
            else:
                cur["ids"] += s.forced_ids
                cur["mask"] += [0] * len(s.forced_ids)
                cur["logprobs"] += [0.0] * len(s.forced_ids)
            cur["ids"] += s.generated_ids
            cur["mask"] += [1] * len(s.generated_ids)
            cur["logprobs"] += list(s.logprobs)
        return out

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["steps"] = [asdict(s) for s in self.steps]
        d["trajectories"] = [t.to_dict() for t in self.trajectories]
        d["generated_tokens"], d["new_tokens"], d["tool_calls"] = self.generated_tokens, self.new_tokens, self.tool_calls
        return d

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json(indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        names = {f.name for f in fields(cls)}
        t = cls(**{k: v for k, v in d.items() if k in names})
        t.steps = [Step(**s) for s in d.get("steps", [])]
        t.trajectories = [cls.from_dict(x) for x in d.get("trajectories", [])]
        return t


# ---- tasks and tools --------------------------------------------------------------------------

def task_messages(task_or_messages) -> list:
    """A question (str), a list of messages, a dict with "messages", or a Task-like object."""
    x = task_or_messages
    if isinstance(x, str):
        return [{"role": "user", "content": x}]
    if isinstance(x, dict) and "messages" in x:
        x = x["messages"]
    elif hasattr(x, "messages") and not isinstance(x, (list, tuple)):
        x = x.messages
    if not isinstance(x, (list, tuple)) or not all(isinstance(m, dict) for m in x):
        raise ValueError("run() takes a question (str), a list of message dicts, or a task with .messages")
    return [dict(m) for m in x]


def resolve_tools(tools, task=None) -> list:
    """Tool objects from: Tool objects, names, (name, config) pairs, a dict name -> Tool, or None
    (then the task's own `tools`, a list of (name, config) pairs)."""
    if tools is None:
        tools = task.get("tools") if isinstance(task, dict) else getattr(task, "tools", None)
        if not tools:
            return []
    if isinstance(tools, dict):
        tools = list(tools.values())
    out = []
    for t in tools:
        if isinstance(t, str):
            from openk2 import tools as registry
            t = registry.get(t)
        elif isinstance(t, (list, tuple)) and len(t) == 2 and isinstance(t[0], str):
            from openk2 import tools as registry
            t = registry.get(t[0], **(t[1] or {}))
        if not (hasattr(t, "name") and hasattr(t, "schema")):
            raise ValueError(f"not a tool: {t!r} (expected a Tool, a name, or a (name, config) pair)")
        out.append(t)
    names = [t.name for t in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"tools given twice: {', '.join(dupes)}")
    return out


def call_tools(table: dict, calls: list) -> list[dict]:
    """Run one step's tool calls concurrently; results in call order, never an exception."""
    from openk2.tools import call_named

    def one(tc):
        fn = tc["function"]
        t0 = time.monotonic()
        res = call_named(table, fn["name"], fn["arguments"])
        return {"id": tc["id"], "name": fn["name"], "content": res.content, "error": bool(res.error),
                "seconds": round(time.monotonic() - t0, 6)}
    if len(calls) == 1:
        return [one(calls[0])]
    with ThreadPoolExecutor(max_workers=min(len(calls), 16), thread_name_prefix="openk2-tool") as pool:
        return list(pool.map(one, calls))


def format_error_message(errors: list) -> dict:
    lines = "\n".join(f"- {e}" for e in errors)
    return {"role": "system", "name": "format_error",
            "content": f"Your last message was malformed:\n{lines}\n"
                       "Call a tool with its name and a JSON object of arguments, or give your final answer."}


def _step_seed(seed, k):
    return None if seed is None else (seed * 1_000_003 + k) % (1 << 31)


# ---- the loop ---------------------------------------------------------------------------------

def run(task_or_messages, backend, tools=None, *, max_steps: int = DEFAULT_MAX_STEPS,
        max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, max_total_tokens: int | None = None,
        wall_time: float | None = None, context_window: int | None = None,
        temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
        on_event=None, stop_event: threading.Event | None = None) -> Trace:
    """Run the agent until a final answer or a budget; returns the Trace (never raises for what
    the model or a tool does; a backend failure ends the run with stop_reason "error").

    backend: LocalBackend(engine, tokenizer) or EndpointBackend(url, ...). tools: see resolve_tools.
    Budgets: max_steps model calls; max_step_tokens generated per call (also ends the run when a
    call fills the room left in the window); max_total_tokens generated in the whole run; wall_time
    seconds (checked between steps and between generated tokens). context_window: overrides the
    backend's (None: no limit).
    on_event(dict): streaming events for a live view (kind: step, context, reasoning, content,
    step_end,
    tool_call_start/args/end, error, tool_result, format_error, stop). stop_event: set it to stop
    cleanly (stop_reason "interrupted"; the trace keeps everything up to there).
    """
    for name, v in (("max_steps", max_steps), ("max_step_tokens", max_step_tokens)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    messages = task_messages(task_or_messages)
    tool_objs = resolve_tools(tools, task_or_messages)
    table = {t.name: t for t in tool_objs}
    schemas = [t.schema for t in tool_objs]
    trace = Trace(messages=messages, n_input=len(messages), tools=schemas, seed=seed)
    emit = on_event or (lambda e: None)
    t_start = time.monotonic()
    deadline = None if wall_time is None else t_start + wall_time
    stop_event = stop_event or threading.Event()

    def timed_out():
        return deadline is not None and time.monotonic() >= deadline

    def should_stop():
        return stop_event.is_set() or timed_out()

    try:
        session = backend.session(schemas)
        window = context_window or getattr(backend, "context_window", None)
        ctx = ContextManager(trace.messages, len(messages), window, session.count)
        n_calls = sum(len(m.get("tool_calls") or []) for m in messages if m.get("role") == "assistant")
        used = 0
        for k in range(max_steps):
            if stop_event.is_set():
                trace.stop_reason = "interrupted"
                break
            if timed_out():
                trace.stop_reason = "wall_time"
                break
            cap, by_total = max_step_tokens, False
            if max_total_tokens is not None:
                left = max_total_tokens - used
                if left <= 0:
                    trace.stop_reason = "max_total_tokens"
                    break
                if left < cap:
                    cap, by_total = left, True
            emit({"kind": "step", "index": k, "max_steps": max_steps})
            change = None
            if window is not None:
                change = ctx.fit(min(cap, window // 2))
                if change and (change["hidden_outputs"] or change["dropped_steps"]):
                    emit({"kind": "context", **change})
                prompt_len = session.count(ctx.view())
                if prompt_len >= window:
                    trace.stop_reason = "error"
                    if trace.steps:   # context management keeps the newest step whole: its results are unread
                        trace.error = (f"the task and the newest step ({len(trace.steps[-1].tool_calls)} tool calls "
                                       f"and their results) take {prompt_len} tokens, more than the context window "
                                       f"({window} tokens) even with every older step dropped")
                    else:
                        trace.error = (f"the task alone ({prompt_len} tokens) does not fit the context window "
                                       f"({window} tokens)")
                    break
                if window - prompt_len < cap:
                    cap, by_total = window - prompt_len, False
            view = ctx.view()
            t0 = time.monotonic()
            gen = session.generate(view, GenParams(cap, temperature, top_p, _step_seed(seed, k)),
                                   first_index=n_calls, on_event=emit, should_stop=should_stop)
            msg = gen.message
            step = Step(index=k, reasoning=msg.get("reasoning_content") or "", content=msg.get("content") or "",
                        tool_calls=msg.get("tool_calls") or [], errors=list(gen.errors),
                        finish_reason=gen.finish_reason, prompt_tokens=gen.prompt_tokens,
                        new_tokens=gen.new_tokens, generated_tokens=gen.generated_tokens,
                        seconds=round(time.monotonic() - t0, 6),
                        context=change if change and (change["hidden_outputs"] or change["dropped_steps"]) else None,
                        prompt_ids=gen.prompt_ids, forced_ids=gen.forced_ids,
                        generated_ids=gen.generated_ids, logprobs=gen.logprobs)
            trace.steps.append(step)
            trace.messages.append(msg)
            emit({"kind": "step_end", "index": k, "generated_tokens": step.generated_tokens,
                  "prompt_tokens": step.prompt_tokens, "new_tokens": step.new_tokens})
            used += gen.generated_tokens
            if gen.finish_reason == "cancelled":
                trace.stop_reason = "interrupted" if stop_event.is_set() else "wall_time"
                break
            if gen.finish_reason == "length":
                trace.stop_reason = "max_total_tokens" if by_total else "max_step_tokens"
                break
            n_calls += len(step.tool_calls)
            if step.tool_calls:
                t1 = time.monotonic()
                step.results = call_tools(table, step.tool_calls)
                step.tool_seconds = round(time.monotonic() - t1, 6)
                for r in step.results:
                    trace.messages.append({"role": "tool", "tool_call_id": r["id"], "name": r["name"],
                                           "content": r["content"]})
                    emit({"kind": "tool_result", **r})
            if step.errors and (step.tool_calls or not step.content.strip()):
                trace.messages.append(format_error_message(step.errors))
                emit({"kind": "format_error", "errors": step.errors})
            if not step.tool_calls and (step.content.strip() or not step.errors):
                trace.content = step.content
                trace.stop_reason = "final"
                break
        else:
            trace.stop_reason = "max_steps"
    except Exception as e:  # a backend failure (connection, engine error): keep what was done
        trace.stop_reason = "error"
        trace.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
    trace.seconds = round(time.monotonic() - t_start, 6)
    emit({"kind": "stop", "stop_reason": trace.stop_reason, "content": trace.content, "error": trace.error})
    return trace


def run_many(tasks, backend, tools=None, *, workers: int = 16, seed: int | None = None, **run_kwargs) -> list:
    """`run` over many tasks at once (eval, RL rollouts): `workers` threads against one backend (the
    engine batches their steps). Task i runs with seed seed+i, so results do not depend on
    `workers` or timing. Returns the Traces in task order."""
    tasks = list(tasks)
    if not tasks:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(tasks))), thread_name_prefix="openk2-run") as pool:
        futures = [pool.submit(run, task, backend, tools, seed=None if seed is None else seed + i, **run_kwargs)
                   for i, task in enumerate(tasks)]
        return [f.result() for f in futures]


def __getattr__(name):  # heavy mode lives in its own module (it imports run from here)
    if name in ("heavy", "default_normalise"):
        from openk2 import agent_heavy
        return getattr(agent_heavy, name)
    raise AttributeError(f"module 'openk2.agent' has no attribute {name!r}")
