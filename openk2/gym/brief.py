"""brief: write a short note from given facts under written rules; judged by a rubric, not a verifier.

    Write a short note about Tavo Relin for the Kesmar newsletter.
    Facts: Tavo Relin is a baker. Tavo Relin lives in Kesmar. Tavo Relin was born in 1952.
    Rules:
    1. At most 2 sentences.
    2. At most 20 words.
    3. Mention each of: baker, Kesmar, 1952.
    4. Start with "Tavo Relin".
    5. Never use the word "very".

Many different notes are equally good, so there is no answer to compare with: this is the kind of
task Kimi K1.5/K2 reward with a self-critique rubric (openk2/critic.py: the model, or any
OpenAI-compatible endpoint, compares two responses against the rubric and the preferences become
the reward). The family is `REWARD = "rubric"`, which tells the RL loop to ask the critic.

Why rules a program can check: they make the critic itself testable. `rubric_score` is the
programmatic reading of the same rubric (the fraction of rules kept; the mention rule counts the
share of facts mentioned), so a critic's preferences can be compared with it, and `verify` (1.0 when
every rule is kept) lets `openk2 eval --tasks brief` measure the family like the others.

Difficulty 1-3: the number of facts to fit (2, 3, 4) under the same tight limits. Words are
whitespace-separated tokens; sentences end at ".", "!" or "?" followed by a space or the end. Only
the final content is judged (the reasoning is free). Gold: the facts folded into one or two
templated sentences that keep every rule (asserted when it is built).
"""

from __future__ import annotations

import re

from openk2.gym.core import Task, user
from openk2.gym.names import JOBS, Names

NAME = "brief"
REWARD = "rubric"                            # no verifier: the RL loop scores it with a critic
DIFFICULTIES = (1, 2, 3)
LEVELS = DIFFICULTIES
TOOLS = ()
FORBIDDEN = ("very", "really", "also", "just", "quite")
OPENINGS = ("Write a short note about {S} for the {T} newsletter.",
            "Write a brief introduction of {S} for a {T} notice board.",
            "Describe {S} in a short note for the people of {T}.")
LIMITS = {1: (2, 16), 2: (2, 20), 3: (2, 22)}   # difficulty -> (max sentences, max words)


def train_difficulty(rng) -> int:
    return rng.choice(DIFFICULTIES)


def _facts(rng, names: Names, who: str, town: str, n: int) -> list[dict]:
    """n facts about `who`: kind, the value the note must mention, and the sentence stating it."""
    job, year, org = rng.choice(JOBS), rng.randint(1900, 1999), names.org()
    pool = [{"kind": "job", "value": job, "text": f"{who} is a {job}."},
            {"kind": "town", "value": town, "text": f"{who} lives in {town}."},
            {"kind": "born", "value": str(year), "text": f"{who} was born in {year}."},
            {"kind": "employer", "value": org, "text": f"{who} works for the {org}."}]
    return pool[:n]


def sample(rng, difficulty: int | None = None, split: str = "train") -> Task:
    if difficulty is None:
        difficulty = train_difficulty(rng)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"brief difficulty must be 1-3, got {difficulty!r}")
    names = Names(rng, split)
    who, town = names.person(), names.place()
    facts = _facts(rng, names, who, town, difficulty + 1)
    rng.shuffle(facts)
    max_sentences, max_words = LIMITS[difficulty]
    rules = [{"kind": "max_sentences", "n": max_sentences}, {"kind": "max_words", "n": max_words},
             {"kind": "mentions", "values": [f["value"] for f in facts]},
             {"kind": "starts_with", "text": who}, {"kind": "avoid", "word": rng.choice(FORBIDDEN)}]
    meta = {"split": split, "who": who, "town": town, "facts": facts, "rules": rules,
            "names": [who, town] + [f["value"] for f in facts if f["kind"] == "employer"]}
    task = Task(NAME, difficulty, [], [], None, meta)
    opening = rng.choice(OPENINGS).format(S=who, T=town)
    task.messages = [user(f"{opening}\nFacts: {' '.join(f['text'] for f in facts)}\nRules:\n{rubric(task)}")]
    return task


# ---- the rubric --------------------------------------------------------------------------------

def rule_text(rule: dict) -> str:
    k = rule["kind"]
    if k == "max_sentences":
        return f"At most {rule['n']} sentence{'s' if rule['n'] != 1 else ''}."
    if k == "max_words":
        return f"At most {rule['n']} words."
    if k == "mentions":
        return "Mention each of: " + ", ".join(rule["values"]) + "."
    if k == "starts_with":
        return f'Start with "{rule["text"]}".'
    if k == "avoid":
        return f'Never use the word "{rule["word"]}".'
    raise ValueError(f"unknown rubric rule {k!r}")


def rubric(task: Task) -> str:
    """The rules as the model (and the critic) read them: a numbered list."""
    return "\n".join(f"{i}. {rule_text(r)}" for i, r in enumerate(task.meta["rules"], 1))


def words(text: str) -> list[str]:
    return text.split()


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def _contains(text: str, value: str) -> bool:
    return re.search(r"(?<![\w])" + re.escape(value.casefold()) + r"(?![\w])", text.casefold()) is not None


def check(task: Task, content) -> list[float]:
    """Per rule, how far `content` keeps it: 1.0 or 0.0 (mentions: the share of values mentioned)."""
    text = content if isinstance(content, str) else ""
    out = []
    for r in task.meta["rules"]:
        k = r["kind"]
        if not text.strip():
            out.append(0.0)
        elif k == "max_sentences":
            out.append(float(len(sentences(text)) <= r["n"]))
        elif k == "max_words":
            out.append(float(len(words(text)) <= r["n"]))
        elif k == "mentions":
            out.append(sum(_contains(text, v) for v in r["values"]) / len(r["values"]))
        elif k == "starts_with":
            out.append(float(text.lstrip().casefold().startswith(r["text"].casefold())))
        elif k == "avoid":
            out.append(float(not _contains(text, r["word"])))
        else:
            raise ValueError(f"unknown rubric rule {k!r}")
    return out


def rubric_score(task: Task, content) -> float:
    """The programmatic reading of the rubric: the mean of `check` (0.0 for an empty reply)."""
    scores = check(task, content)
    return sum(scores) / len(scores)


def verify(task: Task, content) -> float:
    """1.0 when every rule is kept (for `openk2 eval`; RL rewards this family with the critic)."""
    return 1.0 if all(s == 1.0 for s in check(task, content)) else 0.0


# ---- gold ----------------------------------------------------------------------------------------

def _phrase(f: dict) -> str:
    return {"job": f"a {f['value']}", "town": f"from {f['value']}", "born": f"born in {f['value']}",
            "employer": f"working for the {f['value']}"}[f["kind"]]


def gold(task: Task, rng) -> list:
    """A note that keeps every rule: "Tavo Relin is a baker from Kesmar, born in 1952." The order
    of the extra facts follows the task's (shuffled) fact list; rng picks between one sentence and
    two when both fit."""
    who, facts = task.meta["who"], task.meta["facts"]
    by = {f["kind"]: f for f in facts}
    rest = [f for f in facts if f["kind"] not in ("job", "town")]
    head = f"{who} is {_phrase(by['job'])} {_phrase(by['town'])}"
    candidates = [head + "".join(", " + _phrase(f) for f in rest) + "."]
    if rest:
        verb = {"born": "was born in {}", "employer": "works for the {}"}
        second = " and ".join(verb[f["kind"]].format(f["value"]) for f in rest)
        candidates.append(f"{head}. {who.split()[0]} {second}.")
    if rng.random() < 0.5:
        candidates.reverse()
    note = next((c for c in candidates if verify(task, c) == 1.0), None)
    assert note is not None, (task.meta, candidates)
    rules = task.meta["rules"]
    plan = (f"{len(facts)} facts in at most {rules[1]['n']} words and {rules[0]['n']} sentences, starting "
            f"with the name, without \"{rules[4]['word']}\".")
    return [dict(m) for m in task.messages] + [{"role": "assistant", "reasoning_content": plan, "content": note}]
