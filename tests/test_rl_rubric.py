"""The rubric family (gym.brief), the self-critique reward (openk2/critic.py) and the gym's RL split.

The critic here is a scripted model that reads the rubric *text* of the critic prompt and applies it
with its own simple rules (not the family's code): that it agrees with the family's programmatic
`rubric_score` shows the rubric says all the check checks, and that the critic plumbing (prompt,
both orders, verdict parsing, win shares) turns preferences into the right rewards."""

import re

import pytest

from openk2 import gym
from openk2.agent import LocalBackend
from openk2.critic import Critic, messages, parse_verdict
from openk2.gym import brief
from openk2.gym.names import split_of
from openk2.scripted import ScriptedEngine
from openk2.tokenizer import tiny_tokenizer


def test_gold_keeps_every_rule_at_every_difficulty_and_split():
    for split in ("train", "eval", "rl"):
        for d in brief.DIFFICULTIES:
            for i in range(20):
                task = gym.sample("brief", seed=3, index=i, split=split, difficulty=d)
                note = gym.final_content(gym.gold(task))
                assert brief.verify(task, note) == 1.0 and brief.rubric_score(task, note) == 1.0
                assert len(task.meta["facts"]) == d + 1 and brief.rubric(task) in task.question


def _variants(task, note):
    """The gold note and versions that break rules in known ways."""
    rules = {r["kind"]: r for r in task.meta["rules"]}
    first_value = rules["mentions"]["values"][0]
    return {
        "gold": note,
        "no fact": note.replace(first_value, "someone"),
        "long": note[:-1] + ", " + " and ".join(["everyone here knows and likes the work"] * 3) + ".",
        "forbidden": note.replace(" is ", f" is {rules['avoid']['word']} ", 1),
        "late name": "Note: " + note,
        "sentences": note + " Yes. Yes.",
        "empty": "",
        "two broken": ("Here is a note. " + note.replace(first_value, "someone")),
    }


def test_rubric_score_counts_the_rules_kept():
    task = gym.sample("brief", seed=0, index=1, split="eval", difficulty=3)
    v = _variants(task, gym.final_content(gym.gold(task)))
    s = {k: brief.rubric_score(task, t) for k, t in v.items()}
    assert s["gold"] == 1.0 and s["empty"] == 0.0
    assert s["no fact"] == pytest.approx(1 - 0.25 / 5)             # one of four facts missing
    for k in ("long", "forbidden", "late name", "sentences"):
        assert s[k] == pytest.approx(0.8), k
    assert s["two broken"] < s["late name"] and brief.verify(task, v["long"]) == 0.0


# ---- an independent critic that reads the rubric text --------------------------------------------

def _read_rubric(prompt):
    body = prompt.split("Rubric:\n", 1)[1]
    rubric, rest = body.split("\n\nResponse A:\n<<<\n", 1)
    a, rest = rest.split("\n>>>\n\nResponse B:\n<<<\n", 1)
    b = rest.split("\n>>>", 1)[0]
    return rubric, a, b


def _kept(rubric, text):
    if not text.strip():
        return 0.0
    score = 0.0
    for line in rubric.splitlines():
        if m := re.search(r"At most (\d+) sentences?", line):
            score += len(re.findall(r"[.!?](?:\s|$)", text)) <= int(m.group(1))
        elif m := re.search(r"At most (\d+) words", line):
            score += len(text.split()) <= int(m.group(1))
        elif m := re.search(r"Mention each of: (.*)\.$", line):
            values = m.group(1).split(", ")
            score += sum(v.lower() in text.lower() for v in values) / len(values)
        elif m := re.search(r'Start with "(.*)"', line):
            score += text.startswith(m.group(1))
        elif m := re.search(r'Never use the word "(\w+)"', line):
            score += re.search(rf"\b{m.group(1)}\b", text, re.I) is None
    return score


def reading_critic(prompt: str) -> str:
    rubric, a, b = _read_rubric(prompt)
    ka, kb = _kept(rubric, a), _kept(rubric, b)
    verdict = "A" if ka > kb else "B" if kb > ka else "tie"
    return f"<think>A keeps {ka}, B keeps {kb}.</think>Answer: {verdict}"


@pytest.fixture(scope="module")
def critic():
    tok = tiny_tokenizer()
    return Critic(LocalBackend(ScriptedEngine(tok, reading_critic), tok, context_window=None), workers=4)


def test_critic_preferences_agree_with_the_programmatic_check(critic):
    jobs, expected = [], []
    for i in range(6):
        task = gym.sample("brief", seed=5, index=i, split="rl", difficulty=1 + i % 3)
        v = [t for t in _variants(task, gym.final_content(gym.gold(task))).values() if t]
        for a in v:
            for b in v:
                if a is not b:
                    jobs.append((task.question, brief.rubric(task), a, b))
                    sa, sb = brief.rubric_score(task, a), brief.rubric_score(task, b)
                    expected.append(1.0 if sa > sb + 1e-9 else 0.0 if sb > sa + 1e-9 else 0.5)
    got = critic.compare(jobs)
    assert len(got) == len(jobs) > 200
    agree = sum(g == e for g, e in zip(got, expected))
    assert agree == len(jobs), [(j[2], j[3], g, e) for j, g, e in zip(jobs, got, expected) if g != e][:3]


def test_pairwise_rewards_rank_responses_like_the_check(critic):
    task = gym.sample("brief", seed=1, index=4, split="rl", difficulty=2)
    v = _variants(task, gym.final_content(gym.gold(task)))
    responses = [v["two broken"], v["gold"], v["empty"], v["long"]]
    rewards, stats = critic.rewards(task.question, brief.rubric(task), responses)
    # gold beats all three (1), long beats two broken and empty (2/3), two broken beats empty (1/3)
    assert rewards == pytest.approx([1 / 3, 1.0, 0.0, 2 / 3])
    assert stats == {"comparisons": 6, "unreadable": 0}           # 3 pairs x 2 orders; empty ones not asked
    assert sum(rewards) == pytest.approx(len(responses) / 2)      # win shares: half of all pairs each way


def test_unreadable_verdicts_count_as_ties_and_position_bias_cancels():
    tok = tiny_tokenizer()
    always_a = Critic(LocalBackend(ScriptedEngine(tok, lambda p: "Answer: A"), tok), workers=2)
    rewards, stats = always_a.rewards("q", "1. Be good.", ["one", "two", "three"])
    assert rewards == pytest.approx([0.5, 0.5, 0.5]) and stats["unreadable"] == 0   # both orders cancel
    babble = Critic(LocalBackend(ScriptedEngine(tok, lambda p: "I cannot decide"), tok), workers=2)
    rewards, stats = babble.rewards("q", "1. Be good.", ["one", "two"])
    assert rewards == [0.5, 0.5] and stats["unreadable"] == 2


def test_verdict_parsing_and_critic_prompt():
    assert [parse_verdict(t) for t in ("Answer: A", "so... answer: response b.", "Answer: Tie", "Answer: C", None)] \
        == [1.0, 0.0, 0.5, None, None]
    msgs = messages("Write X.", "1. Short.", "aa", "bb")
    assert msgs[0]["role"] == "system" and "Answer: A" in msgs[0]["content"]
    assert "Rubric:\n1. Short." in msgs[1]["content"] and msgs[1]["content"].index("aa") < msgs[1]["content"].index("bb")


# ---- the RL split ----------------------------------------------------------------------------------

def test_rl_split_uses_train_words_and_its_own_task_stream():
    for fam in ("arith", "chain", "search", "brief"):
        for i in range(5):
            rl_task = gym.sample(fam, seed=0, index=i, split="rl", difficulty=gym.family(fam).LEVELS[1])
            train_task = gym.sample(fam, seed=0, index=i, split="train", difficulty=gym.family(fam).LEVELS[1])
            assert rl_task.question != train_task.question
            for name in rl_task.meta["names"]:
                for w in name.split(" "):
                    if w not in ("Guild", "Company", "Society", "Works", "Bank", "Club", "Press", "Trust"):
                        assert split_of(w) == "train", (fam, name)
    code = [gym.sample("code", seed=0, index=i, split="rl") for i in range(10)]
    assert all(split_of(t.question) == "train" for t in code)


def test_rubric_families_are_named_not_part_of_all():
    assert "brief" not in gym.parse_families("all") and gym.parse_families("brief") == ["brief"]
    assert gym.reward_kind("brief") == "rubric" and gym.reward_kind("arith") == "verify"
    with pytest.raises(ValueError, match="brief"):
        gym.family("nope")
