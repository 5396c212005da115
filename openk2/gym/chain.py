"""chain: follow a chain of keys through a hidden table with `lookup`; report the value at its end.

    Start at the key "tomeli" and follow the chain with lookup. What value is at the end?
    lookup("tomeli")  -> "link 1 of 100; next: kabodu"
    ...
    lookup("rusefa")  -> "link 100 of 100; value: 4821"

Difficulty is the number of links (1-300): that many sequential calls, each depending on the previous
output. This is the long-horizon family (K2's 200-300 tool calls in one turn). Every output says
where the chain stands ("link 57 of 100"), and every gold reasoning line repeats it, so the model can
go on after the agent's context manager has hidden old outputs: the latest output and its own
recent reasoning are all it needs.

The table (in the task's tool configuration) holds the chain plus a few unrelated entries; keys are
generated words of the task's split. Gold: on ~10% of samples one call mistypes a key, reads the
tool's real "no entry" error and retries; on ~8% the last key is looked up again as a check.
"""

from __future__ import annotations

from openk2.gym.core import Task, Trajectory, user, verify_value
from openk2.gym.names import Names

NAME = "chain"
MAX_LINKS = 300
P_RECOVERY, P_CHECK = 0.10, 0.08           # gold: share of samples with a recovery / a self-check
DIFFICULTIES = range(1, MAX_LINKS + 1)
DEFAULT_DIFFICULTY = None                  # sample(rng, None): the training mix
LEVELS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 300)   # what the tests and the eval cover by default
QUESTIONS = (
    'Start at the key "{k}" and follow the chain with lookup. What value is at the end?',
    'Follow the chain of keys from "{k}" with lookup until it ends. What is the final value?',
    'The chain begins at key "{k}". Look up each link in turn and report the value at the end.',
)


def train_difficulty(rng) -> int:
    """Mostly short chains (every link is the same skill), some long ones (the views after the
    context manager hid old outputs, and link numbers up to 300, only occur there)."""
    r = rng.random()
    if r < 0.6:
        return rng.randint(1, 10)
    if r < 0.9:
        return rng.randint(11, 50)
    return rng.randint(51, MAX_LINKS)


def link_text(i: int, n: int, nxt: str | None, value: int | None) -> str:
    if nxt is not None:
        return f"link {i} of {n}; next: {nxt}"
    return f"link {i} of {n}; value: {value}"


def sample(rng, difficulty: int | None = None, split: str = "train") -> Task:
    if difficulty is None:                # the training mix
        difficulty = train_difficulty(rng)
    if not isinstance(difficulty, int) or not 1 <= difficulty <= MAX_LINKS:
        raise ValueError(f"chain difficulty must be 1-{MAX_LINKS} links, got {difficulty!r}")
    n = difficulty
    names = Names(rng, split)
    keys = [names.key() for _ in range(n)]
    value = rng.randint(1000, 9999)
    table = {}
    for i, k in enumerate(keys):
        table[k] = link_text(i + 1, n, keys[i + 1] if i + 1 < n else None, value if i + 1 == n else None)
    for _ in range(rng.randint(2, 5)):         # unrelated entries: a key off the chain leads nowhere useful
        m = rng.randint(2, 9)
        table[names.key()] = link_text(rng.randint(1, m), m, names.key(), None)
    items = list(table.items())
    rng.shuffle(items)
    question = rng.choice(QUESTIONS).format(k=keys[0])
    return Task(NAME, n, [user(question)], [("lookup", {"table": dict(items)})], value,
                {"split": split, "keys": keys, "names": list(table)})


def gold(task: Task, rng) -> list:
    t = Trajectory(task)
    keys, n = task.meta["keys"], task.difficulty
    typo_at = rng.randrange(n) if rng.random() < P_RECOVERY else None
    out = None
    for i, key in enumerate(keys):
        # "next: KEY" as the tool wrote it: the key follows the same tokens in the output and in the
        # reasoning, so writing it is what an induction head does (find the context, copy on).
        reasoning = (f"Start at {key}." if i == 0 else f"Link {i} of {n} done; next: {key}.")
        if i == typo_at:
            wrong = Names(rng, task.meta["split"]).mistype(key)
            if wrong not in task.tools[0][1]["table"]:
                res = t.call(reasoning, "lookup", mistake=True, key=wrong)
                assert res.error, res.content
                reasoning = f"I mistyped the key; it is {key}."
        out = t.call(reasoning, "lookup", key=key)
        assert not out.error and out.content.startswith(f"link {i + 1} of {n};"), out.content
    value = int(out.content.rsplit("value: ", 1)[1])
    if rng.random() < P_CHECK:
        again = t.call(f"Link {n} of {n}; value: {value}. Check it once more.", "lookup", key=keys[-1])
        assert again.content == out.content
        return t.answer(f"Same again; value: {value}.", value)
    return t.answer(f"Link {n} of {n} is the end; value: {value}.", value)


def verify(task: Task, content) -> float:
    return verify_value(content, task.answer)
