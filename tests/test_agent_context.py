"""Context management: the chunked hiding rules, and a 300-step run in a small window through the
scripted engine (every request fits, the cached prefix keeps being reused, the views replay)."""

import re

from agent_stub import RecordingEngine, call, calls, final

from openk2.agent import LocalBackend, run
from openk2.agent_context import HIDDEN_MARKER, ContextManager, step_views, training_sequences
from openk2.chat import render_ids
from openk2.tokenizer import tiny_tokenizer
from openk2.tools import Tool

TOK = tiny_tokenizer()


def conversation(n_steps, out_chars=100):
    msgs = [{"role": "user", "content": "task " * 10}]
    for k in range(n_steps):
        msgs.append({"role": "assistant", "content": "", "reasoning_content": f"r{k}",
                     "tool_calls": [{"id": f"functions.t:{k}", "type": "function",
                                     "function": {"name": "t", "arguments": "{}"}}]})
        msgs.append({"role": "tool", "tool_call_id": f"functions.t:{k}", "name": "t", "content": "x" * out_chars})
    return msgs


def chars(view):
    return sum(len(m.get("content") or "") + len(m.get("reasoning_content") or "") + 10 for m in view)


def test_hides_oldest_half_of_visible_outputs_but_never_the_newest_step():
    msgs = conversation(9)
    ctx = ContextManager(msgs, 1, window=10_000, count=chars, low=1.0)   # hiding alone: no low-water mark
    before = list(ctx.view())
    assert ctx.fit(reserve=0) is None and ctx.view() == before
    ctx.window = chars(before) - 1
    ev = ctx.fit(reserve=0)
    view = ctx.view()
    hidden = [m for m in view if m.get("content") == HIDDEN_MARKER]
    assert ev["hidden_outputs"] == 4 == len(hidden) and ev["dropped_steps"] == 0 and ev["fits"]
    assert [m["tool_call_id"] for m in hidden] == [f"functions.t:{k}" for k in range(4)]
    assert ev["hidden"] == [2, 4, 6, 8]
    # untouched messages are the conversation's own objects (the local backend relies on it)
    assert all(v is m for v, m in zip(view, msgs) if v.get("content") != HIDDEN_MARKER)
    assert all(msgs[i]["content"] == "x" * 100 for i in ev["hidden"])   # the conversation keeps everything
    # appending continues the same view object, no change until the window is hit again
    msgs.append({"role": "assistant", "content": "done"})
    assert ctx.fit(0) is None and ctx.view()[-1] is msgs[-1]


def test_a_change_frees_the_window_down_to_the_low_water_mark():
    msgs = conversation(20)
    ctx = ContextManager(msgs, 1, window=None, count=chars)   # default low-water mark: half the window
    ctx.window = chars(ctx.view()) - 1
    ev = ctx.fit(reserve=100)
    assert ev["hidden_outputs"] == 9 and ev["dropped_steps"] > 0 and ev["tokens_after"] <= ctx.window / 2
    n = ev["tokens_after"]
    k = 0
    while ctx.fit(reserve=100) is None:   # then many steps fit before the next change
        msgs += conversation(1)[1:]
        k += 1
    assert k >= 5 and chars(ctx.view()) <= ctx.window / 2 and n < ctx.window / 2


def test_drops_oldest_steps_keeping_task_and_latest_step():
    msgs = conversation(8, out_chars=10)
    for m in msgs[1::2]:
        m["reasoning_content"] = "long reasoning " * 20   # steps are big even with outputs hidden
    ctx = ContextManager(msgs, 1, window=None, count=chars)
    ctx.window = 700
    ev = ctx.fit(reserve=50)
    view = ctx.view()
    assert ev["dropped_steps"] > 0 and ev["fits"] and chars(view) + 50 <= 700
    assert view[0] is msgs[0] and "earlier steps removed" in view[1]["content"]
    assert view[-1] is msgs[-1] and view[-2] is msgs[-2]   # the latest step is whole
    assert f"[{ev['dropped_total']} earlier steps" in view[1]["content"]
    # a window the task alone overflows: reported, nothing more to drop
    ctx.window = 20
    assert ctx.fit(reserve=0)["fits"] is False


def chain_tool():
    def chain(key: str) -> str:
        """Follow the chain.

        Args:
            key: a key like k12
        """
        n = int(key[1:])
        return f"next key: k{n + 1}. " + f"(record {n}: " + "lorem ipsum dolor sit amet " * 4 + ")"
    return Tool(chain)


RETURN = "## Return of functions.chain:"


def chain_script(length):
    def script(text):
        pos = text.rfind(RETURN)
        if pos < 0:
            return calls("Start at k0.", call("chain", {"key": "k0"}, 0))
        m = re.match(r"(\d+)\nnext key: k(\d+)", text[pos + len(RETURN):])
        idx, key = int(m.group(1)), int(m.group(2))
        if key == length:
            return final(f"The chain ended after {key} links.", f"The last key is k{key}.")
        return calls(f"Step {idx + 1}: the next key is k{key}; follow it.", call("chain", {"key": f"k{key}"}, idx + 1))
    return script


def lcp(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_300_step_run_in_a_small_window():
    window, step_tokens = 3072, 128
    eng = RecordingEngine(TOK, chain_script(300))
    t = run("Follow the chain from k0 until it ends; report the last key.", LocalBackend(eng, TOK, context_window=window),
            tools=[chain_tool()], max_step_tokens=step_tokens)
    assert t.stop_reason == "final" and t.content == "The last key is k300." and len(t.steps) == 301
    # every request, with room for its whole step, fits the window
    assert all(e["prompt"] + e["params"].max_tokens <= window for e in eng.log)
    assert max(e["prompt"] for e in eng.log) > window * 0.7   # the window was really used
    # prefill accounting, recomputed from the engine's side with a one-sequence prefix cache
    prev, forced, reprefill, total_prompt = [], 0, 0, 0
    for e in eng.log:
        p = e["req"].prompt_ids
        total_prompt += len(p)
        if e["kind"] == "extend":
            assert p[:len(prev)] == prev
            forced += e["forced"]
        else:
            reprefill += len(p) - lcp(p, prev)
        prev = p + e["req"].result().output_ids
    changes = [s.index for s in t.steps if s.context]
    submits = [k for k, e in enumerate(eng.log) if e["kind"] == "submit"]
    assert submits == [0] + changes                      # a new prompt only when the view changed
    assert 3 <= len(changes) <= 30 and min(b - a for a, b in zip(changes, changes[1:])) >= 5
    assert any(t.steps[k].context["hidden_outputs"] for k in changes)
    assert any(t.steps[k].context["dropped_steps"] for k in changes)
    assert reprefill <= len(changes) * window + len(eng.log[0]["req"].prompt_ids)
    # re-rendering every step would prefill total_prompt tokens; appending + chunked hiding:
    assert forced + reprefill < 0.2 * total_prompt
    assert sum(s.new_tokens for s in t.steps) == forced + reprefill
    # the trace replays: the recorded view changes reproduce every prompt the engine saw
    views = list(step_views(t.messages, t.n_input, [s.context for s in t.steps]))
    check = sorted({0, 300} | set(changes) | {k - 1 for k in changes} | set(range(0, 301, 37)))
    for k in check:
        assert render_ids(views[k], t.tools, TOK, add_generation_prompt=True)[0] == t.prompt_ids(k), k
    # and SFT rendering of the finished trajectory through the same manager gives the same sequences
    seqs = training_sequences(t.messages, t.n_input, t.tools, TOK, window, reserve=step_tokens)
    rl = t.sequences()
    assert len(seqs) == len(rl) == len(changes) + 1
    for (ids, mask), s in zip(seqs, rl):
        assert ids == s["ids"] and mask == s["mask"]


def test_task_larger_than_the_window_stops_with_an_error():
    eng = RecordingEngine(TOK, [final("", "x")])
    t = run("word " * 400, LocalBackend(eng, TOK, context_window=256))
    assert t.stop_reason == "error" and "does not fit the context window" in t.error and not eng.log


def test_a_step_whose_own_results_overflow_the_window_stops_with_an_error_naming_it():
    # one step calls the tool 12 times; context management keeps the newest step whole (the model has
    # not read its results), so the next view cannot fit and the run stops saying why
    eng = RecordingEngine(TOK, [calls("Fetch all.", *(call("chain", {"key": f"k{i}"}, i) for i in range(12))),
                                final("", "x")])
    t = run("Follow the chain.", LocalBackend(eng, TOK, context_window=1500), tools=[chain_tool()],
            max_step_tokens=1000)
    assert t.stop_reason == "error" and len(t.steps) == 1 and len(eng.log) == 1
    assert "the newest step (12 tool calls and their results)" in t.error and "(1500 tokens)" in t.error
