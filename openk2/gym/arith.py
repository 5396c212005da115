"""arith: word problems of 1-8 operations, solved with the calculator.

    Mira has 12 coins. Then Mira gets 5 more. Next, Mira doubles them. After that, Mira gives
    away 3. How many coins does Mira have now?

Difficulty is the number of operations after the starting amount. Every sentence is one operation
on the running amount (add, take away, multiply, divide exactly), phrased from a small set of
templates; all values stay non-negative integers below 100000, so the answer is one integer.

Gold: the first reasoning translates the whole question into a list of operations, in order
("Mira has 12; steps + 5, * 2, - 3."); then the operations are taken two at a time, one
calculator call per pair, always written the same way, "(12 + 5) * 2", and every later reasoning
carries the list of what is left ("Now 34; left - 3."). Why a list: each step is then local, a copy
of the front of the latest list and of the latest result; without it the model must find, far back
in the question, the sentence after the last one it used (the first k2-nano runs did not learn that
pointer). Why pairs: one call for the whole problem needs up to seven nested parentheses (counting a
small model gets wrong), one call per operation doubles the tokens.
On ~12% of samples the first call of a pair drops its closing parenthesis and the calculator's
real parse error leads to a corrected call (recovery); on ~10% the result is checked by undoing the
last pair in one more call (self-check).
"""

from __future__ import annotations

from openk2.gym.core import Task, Trajectory, user, verify_value
from openk2.gym.names import Names

NAME = "arith"
DIFFICULTIES = tuple(range(1, 9))
DEFAULT_DIFFICULTY = None                  # sample(rng, None): the training mix
LEVELS = DIFFICULTIES                      # what the tests and the eval cover by default


def train_difficulty(rng) -> int:
    return rng.choice(DIFFICULTIES)

TOOLS = ("calculator",)
MAX_VALUE = 99_999
P_RECOVERY, P_CHECK = 0.12, 0.10           # gold: share of samples with a recovery / a self-check

ITEMS = ("coins", "marbles", "stamps", "apples", "cards", "beads", "shells", "pens", "books", "eggs",
         "stones", "tickets")
CONNECTORS = ("Then", "Next,", "After that,", "Later,")
# op -> templates of the sentence's predicate; {n} is the operand, {S} the subject
ADD = ("{S} gets {n} more", "{S} finds {n} more", "{S} buys {n} more", "{S} is given {n} more")
SUB = ("{S} gives away {n}", "{S} loses {n}", "{S} sells {n}", "{S} uses up {n}")
MUL = ("{S} ends up with {n} times as many", "{S} multiplies them by {n}")
MUL2 = ("{S} doubles them",)
MUL3 = ("{S} triples them",)
DIV = ("{S} splits them into {n} equal piles and keeps one pile", "{S} keeps one of {n} equal shares")
DIV2 = ("{S} halves them",)
QUESTIONS = ("How many {items} does {S} have now?", "How many {items} does {S} have at the end?",
             "How many {items} are left with {S} in the end?")
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
INVERSE = {"add": "-", "sub": "+", "mul": "/", "div": "*"}


def _apply(op: str, v: int, n: int) -> int:
    return {"add": v + n, "sub": v - n, "mul": v * n, "div": v // n}[op]


def _choose_op(rng, v: int):
    """An operation valid on the running value v (result a non-negative integer <= MAX_VALUE)."""
    options = ["add", "sub", "mul", "div"]
    while True:
        op = rng.choice(options)
        if op == "add":
            n = rng.randint(1, 99)
        elif op == "sub":
            if v < 2:
                continue
            n = rng.randint(1, min(v - 1, 99)) if rng.random() < 0.9 else v   # rarely down to 0
        elif op == "mul":
            n = rng.choice((2, 2, 3, 3, 4, 5, 6, 7, 8, 9))
            if v * n > MAX_VALUE or v == 0:
                continue
        else:
            divisors = [d for d in range(2, 10) if v % d == 0 and v > 0]
            if not divisors:
                continue
            n = rng.choice(divisors)
        return op, n


def _sentence(rng, op: str, n: int) -> str:
    if op == "mul" and n in (2, 3) and rng.random() < 0.6:
        pool = MUL2 if n == 2 else MUL3
    elif op == "div" and n == 2 and rng.random() < 0.6:
        pool = DIV2
    else:
        pool = {"add": ADD, "sub": SUB, "mul": MUL, "div": DIV}[op]
    return rng.choice(pool).replace("{n}", str(n))


def sample(rng, difficulty: int | None = None, split: str = "train") -> Task:
    if difficulty is None:                # the training mix
        difficulty = train_difficulty(rng)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"arith difficulty must be 1-8 operations, got {difficulty!r}")
    names = Names(rng, split)
    who, items = names.first(), rng.choice(ITEMS)
    v = start = rng.randint(2, 99)
    steps = []
    for _ in range(difficulty):
        op, n = _choose_op(rng, v)
        pred = _sentence(rng, op, n)
        v = _apply(op, v, n)
        steps.append({"op": op, "n": n, "text": pred})
    parts = [f"{who} has {start} {items}."]
    for s in steps:
        conn = rng.choice(CONNECTORS)
        parts.append(f"{conn} {s['text'].replace('{S}', who)}.")
    parts.append(rng.choice(QUESTIONS).format(items=items, S=who))
    return Task(NAME, difficulty, [user(" ".join(parts))], [("calculator", {})], v,
                {"split": split, "start": start, "steps": steps, "who": who, "names": [who]})


def _expr(v: int, pair: list) -> str:
    first = f"{v} {SYMBOL[pair[0]['op']]} {pair[0]['n']}"
    if len(pair) == 1:
        return first
    return f"({first}) {SYMBOL[pair[1]['op']]} {pair[1]['n']}"


def _ops(steps: list) -> str:
    """"+ 5, * 2, - 3": the operations as the reasoning lists them."""
    return ", ".join(f"{SYMBOL[s['op']]} {s['n']}" for s in steps)


def gold(task: Task, rng) -> list:
    t = Trajectory(task)
    steps, v = task.meta["steps"], task.meta["start"]
    pairs = [steps[i:i + 2] for i in range(0, len(steps), 2)]
    two = [k for k, p in enumerate(pairs) if len(p) == 2]      # a pair has a parenthesis to drop
    broken = rng.choice(two) if two and rng.random() < P_RECOVERY else None
    for k, pair in enumerate(pairs):
        left = _ops(steps[2 * k:])
        reasoning = (f"{task.meta['who']} has {v}; steps {left}." if k == 0  # the question's own words
                     else f"Now {v}; left {left}.")
        expr = _expr(v, pair)
        if k == broken:
            bad = expr.replace(")", "", 1)
            t.call(reasoning, "calculator", mistake=True, expression=bad)
            reasoning = f"I left out a closing parenthesis. Again with {v}; left {left}."
        result = t.call(reasoning, "calculator", expression=expr)
        v_new = int(result.content)
        expected = v
        for s in pair:
            expected = _apply(s["op"], expected, s["n"])
        assert v_new == expected, (result.content, expected)
        prev, v = v, v_new
    if rng.random() < P_CHECK:
        last = pairs[-1]
        check = f"{v} {INVERSE[last[-1]['op']]} {last[-1]['n']}"
        if len(last) > 1:
            check = f"({check}) {INVERSE[last[0]['op']]} {last[0]['n']}"
        out = t.call(f"Check by undoing the last step{'s' if len(last) > 1 else ''}: it should give {prev}.",
                     "calculator", expression=check)
        ok = out.content == str(prev)
        assert ok, (check, out.content, prev)
        return t.answer(f"It gives back {prev}, so {v} is right.", v)
    return t.answer(f"Now {v}; nothing left: {task.meta['who']} has {v}.", v)


def verify(task: Task, content) -> float:
    return verify_value(content, task.answer)
