"""The agent loop with the scripted backend: tool round trips, appended ids equal to a full render,
RL sequences, budgets, malformed calls, concurrent calls, determinism, the trace JSON."""

import json
import threading
import time
from dataclasses import dataclass, field

import pytest
from agent_stub import RecordingEngine, call, calls, final

from openk2.agent import LocalBackend, Trace, resolve_tools, run, run_many
from openk2.chat import render_ids
from openk2.scripted import ScriptedEngine
from openk2.tokenizer import tiny_tokenizer
from openk2.tools import Tool

TOK = tiny_tokenizer()


def backend(script, **kw):
    eng = RecordingEngine(TOK, script, **kw)
    return LocalBackend(eng, TOK), eng


def test_tool_round_trip_and_appended_ids_equal_a_full_render():
    script = [calls("add first", call("calculator", {"expression": "17*23"}, 0)),
              calls("now both", call("calculator", {"expression": "391+1"}, 1),
                    call("calculator", {"expression": "2^10"}, 2)),
              final("done", "The answer is 392.")]
    b, eng = backend(script)
    t = run("What is 17*23+1?", b, tools=["calculator"])
    assert t.stop_reason == "final" and t.content == "The answer is 392."
    assert [r["content"] for s in t.steps for r in s.results] == ["391", "392", "1024"]
    assert [e["kind"] for e in eng.log] == ["submit", "extend", "extend"]   # history never re-rendered
    # the model saw its own reasoning of this turn and every result
    assert "add first" in eng.calls[2] and "## Return of functions.calculator:2\n1024" in eng.calls[2]
    # what was appended, id for id, is what the renderer gives for the whole conversation
    schemas = t.tools
    for k in range(len(t.steps)):
        upto = t.messages[:[i for i, m in enumerate(t.messages) if m["role"] == "assistant"][k]]
        assert t.prompt_ids(k) == render_ids(upto, schemas, TOK, add_generation_prompt=True)[0]
    # one RL sequence (no view change): exactly render_ids' ids and loss mask for the conversation
    (seq,) = t.sequences()
    ids, mask = render_ids(t.messages, schemas, TOK)
    assert seq["ids"] == ids and seq["mask"] == mask
    assert sum(seq["mask"]) == sum(s.generated_tokens for s in t.steps) == len(seq["logprobs"]) - seq["mask"].count(0)
    assert t.steps[0].prompt_ids is not None and t.steps[1].forced_ids is not None
    assert all(s.new_tokens == len(s.forced_ids) for s in t.steps[1:])


def test_reasoning_content_kept_and_first_step_may_omit_think():
    script = ["no think block" + calls("", call("calculator", {"expression": "1+1"}, 0))[len("<think></think>"):],
              final("x", "2")]
    b, eng = backend(script)
    t = run("1+1?", b, tools=["calculator"])
    assert t.stop_reason == "final" and t.steps[0].reasoning == "no think block"
    assert t.messages[1]["reasoning_content"] == "no think block"


def test_max_steps():
    b, _ = backend(lambda p: calls("again", call("calculator", {"expression": "1"}, 0)))
    t = run("loop", b, tools=["calculator"], max_steps=5)
    assert t.stop_reason == "max_steps" and len(t.steps) == 5 and t.content == ""
    assert len([m for m in t.messages if m["role"] == "tool"]) == 5


def test_max_step_tokens():
    b, eng = backend([final("a long line of careful thought " * 20, "never reached")])
    t = run("think", b, max_step_tokens=12)
    assert t.stop_reason == "max_step_tokens" and t.steps[0].generated_tokens == 12
    assert eng.log[0]["params"].max_tokens == 12 and t.steps[0].finish_reason == "length"


def test_max_total_tokens():
    step = calls("go on", call("calculator", {"expression": "1+2"}, 0))
    n = len(ScriptedEngine(TOK, [step]).submit([1]).result().output_ids)
    b, eng = backend(lambda p: step)
    t = run("loop", b, tools=["calculator"], max_total_tokens=3 * n + n // 2, max_step_tokens=10 * n)
    assert t.stop_reason == "max_total_tokens"
    assert [s.generated_tokens for s in t.steps] == [n, n, n, n // 2]
    assert eng.log[-1]["params"].max_tokens == n // 2


def test_wall_time_cancels_mid_step():
    b, eng = backend(lambda p: final("slow " * 200, "late"), delay=0.002)
    t0 = time.monotonic()
    t = run("slow", b, wall_time=0.15)
    assert t.stop_reason == "wall_time" and t.steps[0].finish_reason == "cancelled"
    assert time.monotonic() - t0 < 0.6 and 0 < t.steps[0].generated_tokens < 300


def test_stop_event_interrupts_and_keeps_the_trace():
    stop = threading.Event()

    seen = []

    def on_event(e):
        if e["kind"] == "tool_result":
            seen.append(e)
            if len(seen) == 2:
                stop.set()
    b, _ = backend(lambda p: calls("again", call("calculator", {"expression": "2"}, 0)))
    t = run("loop", b, tools=["calculator"], stop_event=stop, on_event=on_event)
    assert t.stop_reason == "interrupted" and len(t.steps) == 2 and len(t.messages) == 1 + 2 * 2


def test_malformed_calls_come_back_as_tool_errors():
    script = [
        calls("unknown tool", call("teleport", {"to": "mars"}, 0)),
        calls("bad json", call("calculator", '{"expression": "1+', 1)),
        calls("schema", call("calculator", {"expr": "1+1"}, 2), call("calculator", {"expression": 5}, 3)),
        "<think>no name</think><|tool_calls_section_begin|><|tool_call_begin|>:::<|tool_call_argument_begin|>{}"
        "<|tool_call_end|><|tool_calls_section_end|>",
        "",                                            # empty output: not a final answer
        "<think>unclosed</think><|tool_calls_section_begin|>" + call("calculator", {"expression": "6*7"}, 4),
        final("ok", "42"),
    ]
    b, eng = backend(script)
    t = run("try things", b, tools=["calculator"])
    assert t.stop_reason == "final" and t.content == "42" and len(t.steps) == 7
    res = [r for s in t.steps for r in s.results]
    assert res[0]["error"] and "unknown tool 'teleport'" in res[0]["content"] and "calculator" in res[0]["content"]
    assert res[1]["error"] and "invalid arguments" in res[1]["content"]
    assert res[2]["error"] and "expr" in res[2]["content"] and res[3]["error"]
    assert t.steps[3].errors and not t.steps[3].tool_calls
    assert any(m.get("name") == "format_error" for m in t.messages)
    assert t.steps[4].errors == ["empty output"]
    assert t.steps[5].errors and res[-1] == {**res[-1], "content": "42", "error": False}   # kept and run
    # every error reached the model
    seen = eng.calls[-1]
    for text in ("unknown tool 'teleport'", "invalid arguments", "names no function", "empty output", "not closed"):
        assert text in seen, text


def test_independent_calls_of_a_step_run_concurrently():
    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def slow(x: int) -> str:
        """Wait a little, then echo.

        Args:
            x: a number
        """
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return f"done {x}"
    tool = Tool(slow)
    script = [calls("fan out", *[call("slow", {"x": i}, i) for i in range(4)]), final("all back", "ok")]
    b, _ = backend(script)
    t = run("fan", b, tools=[tool])
    assert state["max"] == 4 and t.steps[0].tool_seconds < 0.6
    assert [r["content"] for r in t.steps[0].results] == [f"done {i}" for i in range(4)]
    assert [m["tool_call_id"] for m in t.messages if m["role"] == "tool"] == [f"functions.slow:{i}" for i in range(4)]


def test_seeds_are_per_step_and_reproducible():
    def script(text, params):
        return final("r", f"seed {params.seed}") if "Return" in text else calls("", call("calculator", {"expression": "1"}, 0))
    runs = []
    for _ in range(2):
        b, eng = backend(script, with_params=True)
        runs.append((run("s", b, tools=["calculator"], seed=7), [e["params"].seed for e in eng.log]))
    (t1, s1), (t2, s2) = runs
    assert s1 == s2 and len(set(s1)) == 2 and None not in s1 and t1.content == t2.content
    b, eng = backend(script, with_params=True)
    run("s", b, tools=["calculator"], seed=8)
    assert [e["params"].seed for e in eng.log] != s1


@dataclass
class Task:
    messages: list
    tools: list
    answer: str = ""
    meta: dict = field(default_factory=dict)


def test_task_object_tools_resolved_from_name_config_pairs():
    task = Task([{"role": "user", "content": "follow k0"}], [("lookup", {"table": {"k0": "k1", "k1": "END"}})])
    script = [calls("", call("lookup", {"key": "k0"}, 0)), calls("", call("lookup", {"key": "k1"}, 1)), final("", "END")]
    b, _ = backend(script)
    t = run(task, b)
    assert t.stop_reason == "final" and [r["content"] for s in t.steps for r in s.results] == ["k1", "END"]
    assert t.tools[0]["function"]["name"] == "lookup"
    with pytest.raises(ValueError, match="given twice"):
        resolve_tools(["calculator", "calculator"])
    with pytest.raises(ValueError, match="not a tool"):
        resolve_tools([42])
    with pytest.raises(ValueError, match="question"):
        run(42, b)


def test_backend_failure_is_a_stop_reason_not_a_crash():
    b, _ = backend([calls("", call("calculator", {"expression": "1"}, 0))])   # then the script runs out
    t = run("x", b, tools=["calculator"])
    assert t.stop_reason == "error" and "no more scripted completions" in t.error and len(t.steps) == 1
    # records and RL metrics carry its first line, without the traceback that follows
    assert "Traceback" in t.error and "no more scripted completions" in t.error_line and "\n" not in t.error_line


def test_trace_json_round_trip(tmp_path):
    script = [calls("c", call("calculator", {"expression": "2*21"}, 0)), final("d", "42")]
    b, _ = backend(script)
    events = []
    t = run("q", b, tools=["calculator"], seed=3, on_event=events.append)
    path = tmp_path / "trace.json"
    t.save(path)
    d = json.loads(path.read_text())
    assert d["stop_reason"] == "final" and d["content"] == "42" and d["seed"] == 3
    assert d["steps"][0]["tool_calls"][0]["function"]["name"] == "calculator"
    assert d["steps"][0]["results"][0]["content"] == "42" and d["generated_tokens"] == t.generated_tokens
    assert d["tool_calls"] == 1 and d["steps"][1]["generated_ids"] == t.steps[1].generated_ids
    back = Trace.from_dict(d)
    assert back.to_dict() == t.to_dict() and back.sequences() == t.sequences()
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "step" and kinds[-1] == "stop" and "tool_result" in kinds and "reasoning" in kinds
    assert "".join(e["text"] for e in events if e["kind"] == "content") == "42"


def test_run_many_is_parallel_and_independent_of_scheduling():
    def script(text, params):
        if "Return" not in text:
            return calls("", call("calculator", {"expression": f"{text.count('?')} * 1000 + {params.seed % 97}"}, 0))
        return final("", text[text.rfind("Return"):].split("\n")[1])
    questions = [f"q{i}" + "?" * i for i in range(6)]
    out = []
    for workers in (1, 6):
        b, eng = backend(script, delay=0.0005, with_params=True)
        out.append([t.content for t in run_many(questions, b, ["calculator"], workers=workers, seed=5)])
        if workers == 6:
            assert eng.max_in_flight > 1
    assert out[0] == out[1] and len(set(out[0])) == 6 and all(c.isdigit() for c in out[0])
