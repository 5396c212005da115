"""`openk2 agent` and `openk2 chat`: the agent in a terminal, streamed with rich.

The view prints finished lines as they complete (reasoning dimmed, tool calls in cyan, results in
green or red, context changes in magenta) and keeps a live footer with the line being written and a
step counter; the final answer is a highlighted panel. Ctrl-C sets the run's stop event: the model
call stops at its next token, the run returns with stop_reason "interrupted", and the trace is
still written (--json). A second Ctrl-C quits at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

DEFAULT_MODEL = "models/k2-nano"
DEFAULT_TOOLS = "calculator,python"
_STYLE = {"reasoning": "dim italic", "content": "", "args": "cyan"}


class LiveView:
    """An `on_event` callback that draws a run (or a heavy run's K runs) in the terminal."""

    def __init__(self, console=None, max_steps: int | None = None, heavy: int = 0, result_chars: int = 400):
        from rich.console import Console
        self.console = console or Console(highlight=False)
        self.max_steps, self.heavy, self.result_chars = max_steps, heavy, result_chars
        self.lock = threading.RLock()
        self.kind, self.partial = None, ""
        self.step, self.tokens, self.hides = 0, 0, 0
        self.t0 = time.monotonic()
        self.status = {}        # heavy: trajectory -> short status
        self.live = None

    # ---- lifecycle ----
    def __enter__(self):
        from rich.live import Live
        self.live = Live(self._footer(), console=self.console, refresh_per_second=8, transient=True)
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        with self.lock:
            self._flush()
            if self.live is not None:
                self.live.__exit__(*exc)
                self.live = None

    # ---- drawing ----
    def _footer(self):
        from rich.console import Group
        from rich.text import Text
        secs = time.monotonic() - self.t0
        of = f"/{self.max_steps}" if self.max_steps else ""
        lines = []
        if self.partial:
            lines.append(Text(self.partial[-300:], style=_STYLE.get(self.kind, "")))
        for j in sorted(self.status):
            lines.append(Text(f"  #{j}: {self.status[j]}", style="dim"))
        lines.append(Text(f"step {self.step + 1}{of} · {self.tokens} tokens · {secs:.1f}s"
                          + (f" · {self.hides} context changes" if self.hides else ""), style="bold blue"))
        return Group(*lines)

    def _refresh(self):
        if self.live is not None:
            self.live.update(self._footer())

    def _print(self, *a, **kw):
        self.console.print(*a, **kw)

    def _flush(self):
        if self.partial:
            self._print(self.partial, style=_STYLE.get(self.kind, ""), markup=False)
        self.partial, self.kind = "", None

    def _stream(self, kind, text):
        if kind != self.kind:
            self._flush()
            self.kind = kind
        self.partial += text
        *done, self.partial = self.partial.split("\n")
        for line in done:
            self._print(line, style=_STYLE.get(kind, ""), markup=False)

    def __call__(self, e: dict):
        with self.lock:
            j = e.get("trajectory")
            if self.heavy and j is not None and j < self.heavy:
                self._heavy_event(j, e)
            else:
                self._event(e)
            self._refresh()

    def _heavy_event(self, j, e):
        k = e["kind"]
        if k == "step":
            self.status[j] = f"step {e['index'] + 1}"
            self.step = max(self.step, e["index"])
        elif k == "tool_call_start":
            self.status[j] = self.status.get(j, "").split(" →")[0] + f" → {e.get('name')}"
        elif k == "step_end":
            self.tokens += e["generated_tokens"]
        elif k == "stop":
            answer = (e.get("content") or "").strip().replace("\n", " ")
            self.status.pop(j, None)
            self._print(f"#{j} {e['stop_reason']}: {answer[:200]}", style="green" if answer else "yellow",
                        markup=False)

    def _event(self, e):
        from rich.panel import Panel
        k = e["kind"]
        if k == "step":
            self._flush()
            self.step = e["index"]
        elif k == "step_end":
            self.tokens += e["generated_tokens"]
        elif k in ("reasoning", "content"):
            self._stream(k, e["text"])
        elif k == "tool_call_start":
            self._flush()
            self.kind, self.partial = "args", f"→ {e.get('name')} "
        elif k == "tool_call_args":
            self._stream("args", e["text"])
        elif k == "tool_call_end":
            self._flush()
        elif k == "tool_result":
            self._flush()
            text = e["content"]
            if len(text) > self.result_chars:
                text = text[:self.result_chars] + f" … ({len(e['content'])} chars)"
            self._print(f"← {e['name']}: {text}", style="red" if e.get("error") else "green", markup=False)
        elif k == "format_error":
            self._flush()
            self._print("format error: " + "; ".join(e["errors"]), style="yellow", markup=False)
        elif k == "context":
            self._flush()
            self.hides += 1
            self._print(f"[context] hid {e['hidden_outputs']} tool outputs, dropped {e['dropped_steps']} steps: "
                        f"{e['tokens_before']} → {e['tokens_after']} tokens", style="magenta", markup=False)
        elif k == "stop":
            self._flush()
            if e["stop_reason"] == "final":
                self._print(Panel(e.get("content") or "", title="answer", border_style="bold green"))
            else:
                msg = f"stopped: {e['stop_reason']}"
                if e.get("error"):
                    msg += f" ({e['error'].splitlines()[0]})"
                self._print(msg, style="bold yellow", markup=False)


# ---- model and tools from the command line ------------------------------------------------------

def local_device() -> str:
    """Where embedded models run: OPENK2_DEVICE (auto, cpu or cuda; default auto: cuda when available)."""
    from openk2.checkpoint import resolve_device
    return resolve_device(os.environ.get("OPENK2_DEVICE"), "OPENK2_DEVICE")


def make_backend(model: str | None, api_key=None, model_name=None, context_window=None):
    """MODEL -> a backend: an http(s) URL is an OpenAI-compatible endpoint; a directory is a
    checkpoint for the embedded engine; nothing means the shipped k2-nano. The engine runs on the GPU
    when there is one (as `openk2 serve` does); OPENK2_DEVICE=cpu|cuda chooses."""
    from openk2.agent_backends import EndpointBackend, LocalBackend
    if model and model.startswith(("http://", "https://")):
        return EndpointBackend(model, model=model_name, api_key=api_key or os.environ.get("OPENAI_API_KEY"),
                               context_window=context_window)
    if model is None:
        here = [Path(DEFAULT_MODEL), Path(__file__).resolve().parent.parent / DEFAULT_MODEL]
        found = next((p for p in here if (p / "config.json").is_file()), None)
        if found is None:
            raise ValueError(f"no MODEL given and the shipped model ({DEFAULT_MODEL}) is not there yet; "
                             "pass a checkpoint directory or an http(s):// endpoint URL (e.g. `openk2 serve`, vLLM)")
        model = str(found)
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"MODEL {model!r} is neither a checkpoint directory nor an http(s):// URL "
                                "(presets have no trained weights to run an agent with)")
    try:
        from openk2.engine import Engine
    except ImportError:
        raise ValueError("the embedded engine (openk2.engine) is not in this build yet; "
                         "serve the model elsewhere and pass its http(s):// URL") from None
    from openk2 import load_model
    from openk2.tokenizer import load_tokenizer
    tok = load_tokenizer(path)
    net = load_model(str(path), device=local_device())
    window = context_window or getattr(getattr(net, "config", None), "max_position_embeddings", None)
    return LocalBackend(Engine(net, tok), tok, context_window=window)


def make_tools(names: str, search_corpus=None, sql_db=None, tool_modules=()) -> list:
    from openk2 import tools as registry
    out = []
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    for name in wanted:
        if name in ("search", "open"):
            if not search_corpus:
                raise ValueError(f"--tools {name} needs --search-corpus PATH (a directory of .txt/.md or a JSONL file)")
            if not any(t.name == name for t in out):
                out.append(registry.get(name, corpus=search_corpus))
            if name == "search" and "open" not in wanted:
                out.append(registry.get("open", corpus=search_corpus))
        elif name == "sql":
            if not sql_db:
                raise ValueError("--tools sql needs --sql-db FILE (an SQLite database)")
            out.append(registry.get("sql", database=sql_db))
        else:
            try:
                out.append(registry.get(name))
            except KeyError as e:
                raise ValueError(str(e.args[0])) from None
    for spec in tool_modules or ():
        out.append(registry.get(spec))
    return out


def _budgets(args) -> dict:
    return dict(max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                max_total_tokens=args.max_total_tokens, wall_time=args.wall_time,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _run_interruptibly(fn, stop_event: threading.Event):
    """Run fn() in a thread; the first Ctrl-C sets stop_event and waits for fn to return."""
    box, done = {}, threading.Event()

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the main thread)
            box["error"] = e
        finally:
            done.set()
    threading.Thread(target=target, daemon=True, name="openk2-agent").start()
    while not done.is_set():   # not Thread.join: an interrupted join can report a live thread as ended
        try:
            done.wait(0.1)
        except KeyboardInterrupt:
            if stop_event.is_set():
                raise
            stop_event.set()
    if "error" in box:
        raise box["error"]
    return box["value"]


# ---- commands ---------------------------------------------------------------------------------

def agent_main(args) -> int:
    from openk2.agent import heavy, run
    backend = make_backend(args.model, args.api_key, args.model_name, args.context_window)
    tools = make_tools(args.tools, args.search_corpus, args.sql_db, args.tool_module)
    stop = threading.Event()
    view = None if args.quiet else LiveView(max_steps=args.max_steps, heavy=args.heavy or 0)
    kw = dict(on_event=view, stop_event=stop, context_window=args.context_window, **_budgets(args))
    if args.heavy:
        def job():
            return heavy(args.question, backend, tools, args.heavy, **kw)
    else:
        def job():
            return run(args.question, backend, tools, **kw)
    if view is not None:
        with view:
            trace = _run_interruptibly(job, stop)
        agg = trace.aggregation or {}
        if agg.get("method") in ("vote", "plurality"):   # a reflection run drew its own answer
            from rich.panel import Panel
            votes = ", ".join(f"{a!r}: {n}" for a, n in sorted(agg["votes"].items(), key=lambda kv: -kv[1]))
            view.console.print(Panel(trace.content, title=f"answer ({agg['method']} of {agg['k']}: {votes})",
                                     border_style="bold green"))
    else:
        trace = _run_interruptibly(job, stop)
        print(trace.content if trace.stop_reason == "final" else f"stopped: {trace.stop_reason}")
    if args.json:
        trace.save(args.json)
    if trace.stop_reason == "final":
        return 0
    return 130 if trace.stop_reason == "interrupted" else 1


def chat_main(args) -> int:
    from rich.console import Console

    from openk2.agent import run
    console = Console(highlight=False)
    backend = make_backend(args.model, args.api_key, args.model_name, args.context_window)
    tools = make_tools(args.tools, args.search_corpus, args.sql_db, args.tool_module)
    history, turns = [], []
    console.print(f"openk2 chat · tools: {', '.join(t.name for t in tools) or 'none'} · "
                  "empty line or Ctrl-D to quit, Ctrl-C stops a running turn", style="dim")
    while True:
        try:
            text = console.input("[bold]you>[/bold] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        if not text.strip():
            break
        history = history + [{"role": "user", "content": text}]
        stop = threading.Event()
        view = LiveView(console, max_steps=args.max_steps)
        with view:
            trace = _run_interruptibly(lambda: run(history, backend, tools, on_event=view, stop_event=stop,
                                                   context_window=args.context_window, **_budgets(args)), stop)
        turns.append(trace)
        history = trace.messages
        if args.json:
            Path(args.json).write_text(json.dumps([t.to_dict() for t in turns], ensure_ascii=False, indent=1) + "\n")
    return 0


def add_common_arguments(s) -> None:
    s.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help=f"checkpoint directory or http(s):// endpoint URL (default: {DEFAULT_MODEL})")
    s.add_argument("--api-key", default=None, help="endpoint API key (default: $OPENAI_API_KEY)")
    s.add_argument("--model-name", default=None, help="endpoint model name (default: the first it lists)")
    s.add_argument("--tools", default=DEFAULT_TOOLS, help=f"comma-separated tools (default: {DEFAULT_TOOLS}; "
                   "also search, open, sql, lookup)")
    s.add_argument("--search-corpus", default=None, metavar="PATH", help="documents for search/open")
    s.add_argument("--sql-db", default=None, metavar="FILE", help="SQLite database for sql")
    s.add_argument("--tool-module", action="append", default=[], metavar="PKG.MOD:FN",
                   help="a Python function to offer as a tool (repeatable)")
    s.add_argument("--max-steps", type=int, default=400, help="model calls per turn (default 400)")
    s.add_argument("--max-step-tokens", type=int, default=4096, help="tokens generated per step (default 4096)")
    s.add_argument("--max-total-tokens", type=int, default=None, help="tokens generated per turn")
    s.add_argument("--wall-time", type=float, default=None, metavar="SECONDS", help="time limit per turn")
    s.add_argument("--context-window", type=int, default=None,
                   help="tokens the model sees at once (default: the model's; endpoints: unmanaged)")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0, K2's)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--json", default=None, metavar="TRACE.json", help="write the trace here (also on Ctrl-C)")
