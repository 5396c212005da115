"""The gym's families: gold trajectories replay through the real tools and verify; verify rejects wrong
answers; splits are disjoint; everything is deterministic per seed.

Tests of the code family need the python sandbox and skip (saying why) where it cannot be set up;
OPENK2_REQUIRE_SANDBOX=1 turns that into a failure, as in tests/test_tools_sandbox.py.
"""

import json
import os
import random
import re
from collections import Counter

import pytest

from openk2 import gym
from openk2.chat import render
from openk2.gym import arith, chain, code, search
from openk2.gym.names import Names, split_of
from openk2.tools import sandbox

REASON = sandbox.unavailable_reason()
if REASON and os.environ.get("OPENK2_REQUIRE_SANDBOX") == "1":
    raise RuntimeError(f"OPENK2_REQUIRE_SANDBOX=1 but the sandbox is unavailable: {REASON}")
needs_sandbox = pytest.mark.skipif(REASON is not None, reason=f"python sandbox unavailable: {REASON}")

CASES = ([("arith", d) for d in arith.LEVELS] + [("chain", d) for d in chain.LEVELS]
         + [("search", d) for d in search.LEVELS]
         + [pytest.param("code", d, marks=needs_sandbox) for d in code.LEVELS])


def _check_gold(task, messages):
    """The gold conversation: starts with the task, every call answered by the real tool's exact
    output, one final answer that verify accepts."""
    assert messages[:len(task.messages)] == task.messages
    assert gym.replay(task, messages) == []
    content = gym.final_content(messages)
    assert content == f"Answer: {task.answer}"
    assert gym.verify(task, content) == 1.0
    for m in messages[len(task.messages):-1]:       # every step: a short reasoning, then one tool call
        if m["role"] == "assistant":
            assert m["reasoning_content"] and "\n" not in m["reasoning_content"]
            assert len(m["tool_calls"]) == 1
    assert messages[-1]["role"] == "assistant" and not messages[-1].get("tool_calls")
    render(messages, task.schemas(), add_generation_prompt=False)   # a valid K2 conversation


@pytest.mark.parametrize("fam,difficulty", CASES)
def test_gold_replays_and_verifies(fam, difficulty):
    for split in ("train", "eval"):
        task = gym.sample(fam, seed=1, index=difficulty, split=split, difficulty=difficulty)
        assert task.family == fam and task.difficulty == difficulty
        messages = gym.gold(task)
        _check_gold(task, messages)
        calls = sum(1 for m in messages if m["role"] == "tool")
        if fam == "chain":
            assert calls >= difficulty
        if fam == "search":
            assert calls >= 2 * difficulty


@pytest.mark.parametrize("fam", ["arith", "chain", "search"])
def test_recoveries_and_checks_replay(fam, monkeypatch):
    """With recoveries and self-checks forced, the gold still replays and verifies; the wrong step
    gets a real error (or wrong document) and is marked weight 0, the fix is trained."""
    mod = gym.family(fam)
    monkeypatch.setattr(mod, "P_RECOVERY", 1.0)
    if hasattr(mod, "P_CHECK"):
        monkeypatch.setattr(mod, "P_CHECK", 1.0)
    for i, d in enumerate(mod.LEVELS[:6]):
        task = gym.sample(fam, seed=2, index=i, split="eval", difficulty=d)
        messages = gym.gold(task)
        _check_gold(task, messages)
        mistakes = [k for k, m in enumerate(messages) if m.get("weight") == 0]
        if fam == "arith" and d == 1:
            assert mistakes == []                  # one operation: no parenthesis to drop
            continue
        assert len(mistakes) == 1
        wrong = messages[mistakes[0] + 1]["content"]
        if fam == "arith":
            assert wrong.startswith("Error: cannot parse")
        elif fam == "chain":
            assert wrong.startswith("Error: no entry for key")
        else:
            assert wrong.startswith("Error: no document") or task.meta["path"][0] not in wrong.split("\n")[0] \
                or any(n not in wrong.split("\n")[0] for n in task.meta["path"])
        assert messages[mistakes[0] + 2]["role"] == "assistant" and "weight" not in messages[mistakes[0] + 2]


@needs_sandbox
def test_code_bugs_give_real_errors_and_get_fixed(monkeypatch):
    monkeypatch.setattr(code, "P_RECOVERY", 1.0)
    seen = set()
    for i in range(40):
        task = gym.sample("code", seed=3, index=i, split="train", difficulty=3)
        kinds = [k for k, _, _ in code._bugs(task.meta["program"], task.meta["var"])]
        if "syntax" in kinds and "name" in kinds:
            break
    tool = task.make_tools()["python"]
    from openk2.tools import call
    for kind, lines, _ in code._bugs(task.meta["program"], task.meta["var"]):
        out = call(tool, {"code": "\n".join(lines)})
        expect = {"name": "NameError: name", "syntax": "SyntaxError: expected ':'", "print": "(no output)"}[kind]
        assert expect in out.content, (kind, out.content)
        seen.add(kind)
    assert seen == {"name", "syntax", "print"}
    messages = gym.gold(task)
    _check_gold(task, messages)
    assert [m.get("weight") for m in messages if m["role"] == "assistant"] == [0, None, None]


def _wrong_answers(task):
    a = task.answer
    if isinstance(a, int):
        return [a + 1, a - 1, a * 10, -a if a else 7]
    return [a + "a", a.split(" ")[0] + " X" if " " in a else "Zz" + a, "", "unknown"]


@pytest.mark.parametrize("fam", ["arith", "chain", "search", pytest.param("code", marks=needs_sandbox)])
def test_verify_rejects_wrong_answers(fam):
    for i in range(8):
        task = gym.sample(fam, seed=4, index=i, split="eval", difficulty=gym.family(fam).LEVELS[i % 3])
        assert gym.verify(task, f"Answer: {task.answer}") == 1.0
        for wrong in _wrong_answers(task):
            assert gym.verify(task, f"Answer: {wrong}") == 0.0, (task.answer, wrong)
        assert gym.verify(task, "") == 0.0
        assert gym.verify(task, None) == 0.0
        assert gym.verify(task, f"I think it might be {task.answer} or more.\nNot sure.") == 0.0


def test_verify_tolerates_what_does_not_matter():
    t = gym.Task("arith", 1, [], [("calculator", {})], 12345)
    for ok in ["Answer: 12345", "answer:12,345", "Answer: 12 345.", "**Answer:** 12345", "Answer: 12345 coins",
               "Reasoning...\nAnswer: 99\nAnswer: 12345", "12345", "  Answer :  12_345  "]:
        assert gym.verify(t, ok) == 1.0, ok
    for bad in ["Answer: 1234", "Answer: 12,34,5", "Answer: 123456", "Answer: 12345.5", "Answer: 12345 or 7",
                "12345 and then 1", "Answer: -12345"]:
        assert gym.verify(t, bad) == 0.0, bad
    s = gym.Task("search", 1, [], [], "Morel Guild")
    for ok in ["Answer: the Morel Guild", "Answer: morel  guild.", "Answer: `Morel Guild`"]:
        assert gym.verify(s, ok) == 1.0, ok
    for bad in ["Answer: Morel Gild", "Answer: Morel", "Answer: Morel Guild Bank"]:
        assert gym.verify(s, bad) == 0.0, bad
    c = gym.Task("code", 1, [], [], "[1, 2, 3]")
    assert gym.verify(c, "Answer: [1,2,3]") == 1.0 and gym.verify(c, "Answer: [1, 2]") == 0.0


def test_splits_are_disjoint():
    words = {"train": set(), "eval": set()}
    questions = {"train": set(), "eval": set()}
    for fam in ("arith", "chain", "search", "code"):
        for split in ("train", "eval"):
            for i in range(30):
                task = gym.sample(fam, seed=5, index=i, split=split, difficulty=gym.family(fam).LEVELS[i % 3])
                assert task.meta["split"] == split
                for name in task.meta["names"]:
                    for w in name.split(" "):
                        if w not in ("Guild", "Company", "Society", "Works", "Bank", "Club", "Press", "Trust"):
                            assert split_of(w) == split, (fam, split, name)
                            words[split].add(w.casefold())
                questions[split].add(task.question)
                if fam == "code":
                    assert split_of(task.question) == split
    assert not words["train"] & words["eval"]
    assert not questions["train"] & questions["eval"]
    assert len(words["eval"]) > 100


def test_deterministic_per_seed():
    for fam in ("arith", "chain", "search"):
        a = gym.sample(fam, seed=6, index=3, split="train")
        b = gym.sample(fam, seed=6, index=3, split="train")
        assert a.to_dict() == b.to_dict()
        assert gym.gold(a) == gym.gold(b)
        c = gym.sample(fam, seed=7, index=3, split="train")
        assert c.to_dict() != a.to_dict()
    # index k is the same whatever was generated before it, and in conversations() too
    first = [c["messages"] for c in gym.conversations("arith,chain", seed=8, n=6, workers=1)]
    again = [c["messages"] for c in gym.conversations("arith,chain", seed=8, n=6, workers=3)]
    assert first == again
    assert first[4] == gym.gold(gym.sample("arith", seed=8, index=2, split="train"))


def test_task_json_round_trip():
    task = gym.sample("search", seed=9, index=0, split="eval", difficulty=3)
    text = json.dumps(task.to_dict())
    back = gym.Task.from_dict(json.loads(text))
    assert back.to_dict() == task.to_dict()
    assert gym.replay(back, gym.gold(task)) == []
    with pytest.raises(ValueError, match="missing"):
        gym.Task.from_dict({"family": "arith"})


def test_replay_detects_a_changed_output():
    task = gym.sample("chain", seed=10, index=0, split="train", difficulty=3)
    messages = gym.gold(task)
    tampered = [dict(m) for m in messages]
    k = next(i for i, m in enumerate(tampered) if m["role"] == "tool")
    tampered[k]["content"] = "link 1 of 3; next: nowhere"
    problems = gym.replay(task, tampered)
    assert len(problems) == 1 and "nowhere" in problems[0]


def test_difficulty_spec():
    assert gym.parse_difficulty("arith=1-3,chain=1,10,300") == {"arith": [1, 2, 3], "chain": [1, 10, 300]}
    assert gym.parse_difficulty({"code": "2-3", "search": 4}) == {"code": [2, 3], "search": [4]}
    assert gym.parse_difficulty(None) == {}
    for bad, msg in [("arith=0", "outside"), ("chain=301", "outside"), ("1-3", "start with"),
                     ("poker=1", "unknown gym family"), ("arith=x", "not a number")]:
        with pytest.raises(ValueError, match=msg):
            gym.parse_difficulty(bad)
    with pytest.raises(ValueError, match="difficulty"):
        arith.sample(random.Random(0), 9)
    tasks = gym.tasks("arith,chain", n=4, seed=0, difficulty="chain=2,3")
    assert [t.difficulty for t in tasks] == [1, 2, 3, 4, 2, 3, 2, 3]
    assert all(t.meta["split"] == "eval" for t in tasks)


def test_a_repeated_level_is_drawn_that_much_more_often():
    """`openk2 rl --difficulty code=1,2,2,3` weights code 2: repeats are kept, not deduplicated."""
    assert gym.parse_difficulty("code=1,2,2,3") == {"code": [1, 2, 2, 3]}
    counts = Counter(gym.sample("code", 0, k, "rl", [1, 2, 2, 3]).difficulty for k in range(600))
    assert 240 < counts[2] < 360 and 100 < counts[1] < 200 and 100 < counts[3] < 200, counts


def test_conversations_and_export(tmp_path):
    convs = list(gym.conversations("arith,chain,search", seed=11, n=9))
    assert [c["family"] for c in convs] == ["arith", "chain", "search"] * 3
    for c in convs:
        names = [t["function"]["name"] for t in c["tools"]]
        assert names == {"arith": ["calculator"], "chain": ["lookup"], "search": ["search", "open"]}[c["family"]]
        render(c["messages"], c["tools"], add_generation_prompt=False)
        assert c["messages"][-1]["content"].startswith("Answer: ")
    out = tmp_path / "data.jsonl"
    assert gym.export(out, "arith,chain", n=4, seed=11, difficulty="chain=2") == 4
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(lines) == 4 and all(set(r) == {"messages", "tools", "context_window", "max_step_tokens"} for r in lines)
    assert lines[0]["context_window"] == gym.CONTEXT_WINDOW and lines[0]["max_step_tokens"] == gym.STEP_TOKENS
    assert lines[0]["messages"] == convs[0]["messages"]


def test_extra_tools_offer_the_agents_defaults_without_changing_the_gold():
    from openk2.agent_view import DEFAULT_TOOLS
    assert ",".join(gym.EXTRA_TOOLS) == DEFAULT_TOOLS      # what `openk2 agent` offers when given no --tools
    plain = list(gym.conversations("arith,chain,search", seed=11, n=30))
    mixed = list(gym.conversations("arith,chain,search", seed=11, n=30, extra_tools=0.5))
    offered = 0
    for p, m in zip(plain, mixed):
        assert m["messages"] == p["messages"]
        own = [t["function"]["name"] for t in p["tools"]]
        names = [t["function"]["name"] for t in m["tools"]]
        if names != own:
            offered += 1
            assert sorted(names) == sorted(set(own) | set(gym.EXTRA_TOOLS))   # each once, calculator included
            render(m["messages"], m["tools"], add_generation_prompt=False)
    assert 5 <= offered <= 25
    every = list(gym.conversations("chain", seed=11, n=5, extra_tools=1.0))
    assert all({"calculator", "python", "lookup"} == {t["function"]["name"] for t in c["tools"]} for c in every)
    with pytest.raises(ValueError, match="share"):
        next(gym.conversations("arith", n=1, extra_tools=1.5))


def test_names_near_and_typos():
    names = Names(random.Random(0), "eval")
    for _ in range(50):
        p = names.person()
        near = names.near(p)
        assert near is not None and near != p and len(near) == len(p)
        assert sum(a != b for a, b in zip(p, near)) == 1
        assert names.in_split(near)
    k = names.key()
    assert names.mistype(k) != k


def test_search_questions_are_possessive_chains():
    task = gym.sample("search", seed=12, index=0, split="train", difficulty=4)
    path, rels = task.meta["path"], task.meta["relations"]
    assert len(path) == 4 and len(rels) == 3
    assert re.search("'s ".join([re.escape(path[0])] + rels), task.question)
    titles = {d["title"] for d in task.tools[0][1]["docs"]}
    assert set(path) <= titles
    assert len(titles) > len(path)                  # distractors and unrelated entities


def test_cli_sample_and_export(tmp_path, capsys):
    from openk2.cli import main
    assert main(["gym", "sample", "arith", "--n", "2", "--difficulty", "3", "--check"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== arith/train/0/") == 2 and "replay: ok; verify: 1.0" in out
    assert main(["gym", "sample", "chain", "--n", "1", "--json", "--split", "eval"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["task"]["family"] == "chain" and rec["gold"][-1]["content"].startswith("Answer:")
    path = tmp_path / "x.jsonl"
    assert main(["gym", "export", "--tasks", "arith,search", "--n", "2", "--out", str(path)]) == 0
    assert len(path.read_text().splitlines()) == 4
    assert main(["gym", "export", "--tasks", "arith", "--n", "1", "--difficulty", "arith=9", "--out", str(path)]) == 2
    assert "outside 1-8" in capsys.readouterr().err


def test_module_interface_with_the_training_mix():
    """The pinned per-module interface: sample(rng, difficulty) with DEFAULT_DIFFICULTY (None: the
    family's training mix), gold(task, rng), verify(task, content); tools resolve to schemas."""
    from openk2 import tools as tools_mod
    for fam in ("arith", "chain", "search"):
        mod = gym.family(fam)
        seen = set()
        for i in range(30):
            rng = random.Random(f"{fam}:{i}")
            task = mod.sample(rng, mod.DEFAULT_DIFFICULTY)
            seen.add(task.difficulty)
            messages = mod.gold(task, rng)
            assert mod.verify(task, messages[-1]["content"]) == 1.0
            assert [tools_mod.get(n, **c).schema["function"]["name"] for n, c in task.tools]
        assert len(seen) >= 3, (fam, seen)          # a mix, not one level
