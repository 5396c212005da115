"""The gym: task families with verifiable answers and gold tool-using trajectories (docs/gym.md).

Families (one module each): arith (calculator word problems, 1-8 operations), chain (lookup chains,
1-300 links), search (multi-hop questions over a generated knowledge base, 1-4 hops), code (small
programs run in the python sandbox, tiers 1-3); and, without a verifier, brief (a short note under
written rules, rewarded by a critic against the rubric; openk2/critic.py). Each module provides

    sample(rng, difficulty, split="train") -> Task      # rng: random.Random
    gold(task, rng) -> messages                          # the whole conversation, real tool outputs
    verify(task, content) -> 1.0 | 0.0                   # content: the final assistant message
    DIFFICULTIES, LEVELS (the default test/eval levels), train_difficulty(rng) (the training mix)

and this package adds seeding, splits and the data the trainer and the eval use:

    task = openk2.gym.sample("arith", seed=0, index=3, split="eval", difficulty=5)
    openk2.gym.tasks("arith,chain", n=100, seed=0, split="eval")          # for `openk2 eval`
    openk2.gym.conversations("arith,code", seed=0)     # endless {"messages", "tools", ...} for training
    openk2.gym.export("data.jsonl", "arith,search", n=1000)   # the same, as the JSONL of DESIGN.md

Long trajectories (a 300-link chain is ~20k tokens) outgrow any small model's window. The model is
trained on exactly the views the agent shows it: every conversation carries the agent settings it
is to be seen under ("context_window", "max_step_tokens"; defaults CONTEXT_WINDOW, STEP_TOKENS, the
ones `openk2 eval` runs local models with), and the trainer (openk2/data.py, `render_record`)
renders one that would outgrow that window through the agent's own context manager
(`agent_context.training_sequences`): one training sequence per view.

Determinism: task `index` of (family, split, seed) comes from its own `random.Random` seeded with
that tuple, so it is the same whatever else is generated, in whatever order or process.
Splits: "train" and "eval" draw names, keys and worlds from disjoint pools (openk2/gym/names.py), and
code questions are split by a hash of their text; the seeds of the two splits are separate too.
"rl" (the RL loop's prompts) draws from the train pool with seeds of its own: disjoint from eval
like train, and a task stream of its own (a short code question may recur, as within train).
"""

from __future__ import annotations

import importlib
import json
from concurrent.futures import ThreadPoolExecutor
import random
import re

from openk2.gym.core import (ANSWER_HINT, ANSWER_PREFIX, Task, extract_answer, final_content,  # noqa: F401
                             replay, verify_value)
from openk2.gym.names import SPLITS, check_split  # noqa: F401

FAMILIES = ("arith", "chain", "search", "code")
# Families without a verifier (`REWARD = "rubric"`): RL scores them with a critic (openk2/critic.py);
# their `verify` is the programmatic reading of the rubric. Not part of "all" (the verifiable set
# the speedrun trains on and `openk2 eval` reports by default); name them to use them.
RUBRIC_FAMILIES = ("brief",)
# The agent settings gym models are trained and evaluated under: k2-nano's agent window, and the
# most tokens one step may generate (a gold step is under ~150 tokens; the agent reserves
# min(STEP_TOKENS, window // 2) of the window for the step being generated).
CONTEXT_WINDOW = 4096
STEP_TOKENS = 1024
# The tools `openk2 agent` offers when given none (agent_view.DEFAULT_TOOLS). A model trained with only
# its family's tool in view can fail when a user's agent offers more (k2-nano of the fifth run: arith 1
# 12/12 with its own tool, 0/12 with these; bench/default_tools.py), so training data may show them
# too: `extra_tools`, the share of conversations that also offer them (the gold never calls them).
EXTRA_TOOLS = ("calculator", "python")


def family(name: str):
    """The module of family `name`."""
    if name not in FAMILIES + RUBRIC_FAMILIES:
        raise ValueError(f"unknown gym family {name!r}; families: {', '.join(FAMILIES + RUBRIC_FAMILIES)}")
    return importlib.import_module(f"openk2.gym.{name}")


def reward_kind(name: str) -> str:
    """"verify" (the family's verifier is the reward) or "rubric" (a critic's preferences are)."""
    return getattr(family(name), "REWARD", "verify")


def parse_families(families) -> list[str]:
    """"arith,chain" or ["arith", "chain"] (or "all") -> a checked list of family names."""
    if isinstance(families, str):
        families = FAMILIES if families.strip() == "all" else [f.strip() for f in families.split(",") if f.strip()]
    families = list(families)
    if not families:
        raise ValueError(f"name at least one gym family ({', '.join(FAMILIES)})")
    for f in families:
        family(f)
    return families


def parse_difficulty(spec) -> dict:
    """"arith=1-8,chain=1,10,100,300" -> {"arith": [1..8], "chain": [1, 10, 100, 300]}.

    Numbers after a family's "=" belong to it until the next "NAME="; "a-b" is a range.
    A dict passes through (values: an int, a list of ints, or such a string)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        return {f: _levels(f, v) for f, v in spec.items()}
    out, current = {}, None
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            current, part = (s.strip() for s in part.split("=", 1))
            family(current)
            out[current] = []
        if current is None:
            raise ValueError(f"difficulty {spec!r}: start with FAMILY=..., e.g. arith=1-8,chain=1,10,100")
        out[current] += _levels(current, part)
    return out


def parse_levels(spec, families, what: str = "difficulty", among: str = "the families") -> dict:
    """parse_difficulty, refusing levels for a family that is not among `families` (a typo, or a
    family left out of the run: either way the levels would be silently ignored)."""
    levels = parse_difficulty(spec)
    stray = [f for f in levels if f not in families]
    if stray:
        raise ValueError(f"{what} given for {', '.join(stray)}, which is not among {among} ({', '.join(families)})")
    return levels


def _levels(fam: str, value) -> list[int]:
    if isinstance(value, int):
        levels = [value]
    elif isinstance(value, (list, tuple, range)):
        levels = [int(v) for v in value]
    else:
        levels = []
        for piece in str(value).split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", piece)
            if not m:
                raise ValueError(f"difficulty of {fam}: {piece!r} is not a number or a range a-b")
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            levels += list(range(lo, hi + 1))
    valid = family(fam).DIFFICULTIES
    bad = [v for v in levels if v not in valid]
    if bad or not levels:
        raise ValueError(f"difficulty of {fam}: {bad or value} outside {min(valid)}-{max(valid)}")
    return levels


def task_rng(fam: str, split: str, seed: int, index: int) -> random.Random:
    return random.Random(f"openk2.gym:{fam}:{split}:{seed}:{index}")


def sample(fam: str, seed: int = 0, index: int = 0, split: str = "train", difficulty=None) -> Task:
    """Task `index` of (family, split, seed). difficulty: an int, a list to draw from (a level listed twice is drawn
    twice as often), or None for the family's training mix."""
    mod = family(fam)
    rng = task_rng(fam, check_split(split), seed, index)
    if difficulty is None:
        level = mod.train_difficulty(rng)
    elif isinstance(difficulty, (list, tuple, range)):
        level = rng.choice(list(difficulty))
    else:
        level = difficulty
    task = mod.sample(rng, level, split)
    task.meta.update({"seed": seed, "index": index, "id": f"{fam}/{split}/{seed}/{index}"})
    return task


def gold(task: Task, rng: random.Random | None = None) -> list:
    """The gold conversation of `task` (rng default: derived from the task's id, so it is stable)."""
    if rng is None:
        rng = random.Random(f"openk2.gym.gold:{task.meta.get('id', json.dumps(task.to_dict(), sort_keys=True))}")
    return family(task.family).gold(task, rng)


def verify(task: Task, content) -> float:
    return family(task.family).verify(task, content)


def tasks(families="all", n: int = 100, seed: int = 0, split: str = "eval", difficulty=None) -> list[Task]:
    """n tasks per family, their difficulties cycling through `difficulty` (a spec for
    parse_difficulty, e.g. "arith=1-8,chain=1,10,100,300") or else each family's LEVELS."""
    levels = parse_difficulty(difficulty)
    out = []
    for fam in parse_families(families):
        lv = levels.get(fam) or list(family(fam).LEVELS)
        out += [sample(fam, seed, i, split, lv[i % len(lv)]) for i in range(n)]
    return out


def conversations(families="all", seed: int = 0, split: str = "train", difficulty=None, n: int | None = None,
                  workers: int = 4, context_window: int | None = CONTEXT_WINDOW, max_step_tokens: int = STEP_TOKENS,
                  extra_tools: float = 0.0):
    """Gold conversations for training: yields {"messages", "tools", "family", "difficulty",
    "context_window", "max_step_tokens"} ("tools": the OpenAI schemas the model is shown), families
    in turn, forever unless n is given. The last two: the agent settings under which the trainer
    renders the conversation (views of the context manager once it outgrows the window; see the
    module docstring); context_window=None leaves them out (render whole).

    difficulty: None (each family's training mix), or a spec for parse_difficulty, whose levels are
    then drawn uniformly per sample. extra_tools: the share of conversations whose tools also include
    EXTRA_TOOLS, shuffled in with the task's own (drawn from its own generator, so the conversations
    themselves do not change). Conversation k is a function of (families, seed, split, k), so
    the output is the same for any `workers`: threads that build conversations ahead, in order
    (the python sandbox spends most of its ~0.1 s per call waiting on process setup, not CPU)."""
    fams = parse_families(families)
    levels = parse_difficulty(difficulty)
    check_split(split)
    agent = check_agent_settings(context_window, max_step_tokens)
    if not 0.0 <= extra_tools <= 1.0:
        raise ValueError(f"extra_tools is a share of conversations, 0..1; got {extra_tools}")

    def make(k):
        fam = fams[k % len(fams)]
        task = sample(fam, seed, k // len(fams), split, levels.get(fam))
        tools = task.schemas()
        if extra_tools and random.Random(f"tools:{seed}:{split}:{k}").random() < extra_tools:
            tools = _with_extra_tools(tools, random.Random(f"tools-order:{seed}:{split}:{k}"))
        return {"messages": gold(task), "tools": tools, "family": fam, "difficulty": task.difficulty, **agent}

    chunk = max(1, 8 * workers)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        k = 0
        while n is None or k < n:
            ks = range(k, k + chunk if n is None else min(n, k + chunk))
            yield from (pool.map(make, ks) if pool else map(make, ks))
            k = ks.stop
    finally:
        if pool:
            pool.shutdown(wait=False, cancel_futures=True)


def _with_extra_tools(own: list, rng: random.Random) -> list:
    """The task's tool schemas plus those of EXTRA_TOOLS it lacks, in a random order."""
    from openk2 import tools as tools_mod
    names = {t["function"]["name"] for t in own}
    schemas = own + [tools_mod.get(n).schema for n in EXTRA_TOOLS if n not in names]
    rng.shuffle(schemas)
    return schemas


def check_agent_settings(context_window, max_step_tokens) -> dict:
    """{"context_window", "max_step_tokens"} for a training record ({} when context_window is None)."""
    if context_window is None:
        return {}
    for name, v in (("context_window", context_window), ("max_step_tokens", max_step_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive number of tokens, got {v!r}")
    return {"context_window": context_window, "max_step_tokens": max_step_tokens}


def export(path, families="all", n: int = 1000, seed: int = 0, split: str = "train", difficulty=None,
           context_window: int | None = CONTEXT_WINDOW, max_step_tokens: int = STEP_TOKENS,
           extra_tools: float = 0.0) -> int:
    """Write n gold conversations as JSONL {"messages", "tools"} (DESIGN.md's SFT format) plus the
    agent settings the trainer renders them under ("context_window", "max_step_tokens"; see
    conversations); returns n."""
    count = 0
    keys = ("messages", "tools", "context_window", "max_step_tokens")
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations(families, seed, split, difficulty, n, context_window=context_window,
                                  max_step_tokens=max_step_tokens, extra_tools=extra_tools):
            f.write(json.dumps({k: conv[k] for k in keys if k in conv}, ensure_ascii=False) + "\n")
            count += 1
    return count


def format_conversation(messages: list, width: int = 160) -> str:
    """A conversation for a person to read: one block per message, tool calls as name(arguments)."""
    lines = []
    for m in messages:
        role = m["role"]
        if role == "assistant":
            if m.get("reasoning_content"):
                lines.append(f"  [think] {m['reasoning_content']}")
            for tc in m.get("tool_calls") or []:
                lines.append(f"  -> {tc['function']['name']}({tc['function']['arguments']})")
            if m.get("content"):
                lines.append(f"assistant: {m['content']}")
        elif role == "tool":
            body = m["content"]
            lines += [f"  <- {ln}" for ln in body.splitlines()] or ["  <- "]
        else:
            lines.append(f"{role}: {m['content']}")
    return "\n".join(ln if len(ln) <= width else ln[:width - 3] + "..." for ln in lines)
