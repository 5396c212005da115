"""code: small programming questions answered by writing a program and running it with `python`.

    How many prime numbers are there from 1 to 100?
    python("n = 100\\ncount = 0\\nfor k in range(2, n + 1):\\n    if all(...):\\n        count += 1\\nprint(count)")
    -> "25"                                                             Answer: 25

Difficulty is the program's shape: 1 = one expression over a list, a number or a word (sum, max,
length, reverse, ...); 2 = a condition or a comprehension (sum of the even ones, count the multiples
of k, digit sum, k-th smallest, ...); 3 = a loop with state (Fibonacci, primes, Collatz steps, sum of
divisors, ...). Each template has a few wordings and random parameters; programs always put the
parameters in variables first and end with one print, so the answer is the one line printed.

Gold: a one-line plan, the program, the sandbox's real output, the answer. On ~25% of samples the
first program has a bug that the model must read and fix (agentic coding): a misspelt variable (the
real NameError traceback with its "Did you mean"), a block line without its colon (the real
SyntaxError), or a forgotten print ("(no output)"). Answers are computed independently in Python at
sampling time and the gold asserts the sandbox printed the same.
"""

from __future__ import annotations

import math
import re

from openk2.gym.core import Task, Trajectory, user, verify_value
from openk2.gym.names import Names, split_of, word_pool

NAME = "code"
DIFFICULTIES = (1, 2, 3)
P_RECOVERY = 0.25                          # gold: share of samples whose first program has a bug
DEFAULT_DIFFICULTY = None                  # sample(rng, None): the training mix
LEVELS = DIFFICULTIES


def train_difficulty(rng) -> int:
    return rng.choice(DIFFICULTIES)


def _list_text(nums) -> str:
    return ", ".join(map(str, nums[:-1])) + " and " + str(nums[-1])


def _nums(rng, lo=1, hi=99, k=None):
    return [rng.randint(lo, hi) for _ in range(k or rng.randint(4, 8))]


def _is_prime(k: int) -> bool:
    return k >= 2 and all(k % d for d in range(2, math.isqrt(k) + 1))


def _collatz(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


# Each template: (tier, make(rng, names) -> (questions, plan, program lines, main variable, answer)).
def t_sum(rng, names):
    nums = _nums(rng)
    return (("What is the sum of {L}?", "Add up {L}. What do you get?"), "Sum the list with sum().",
            [f"nums = {nums}", "print(sum(nums))"], "nums", sum(nums), {"L": _list_text(nums)})


def t_max(rng, names):
    nums = _nums(rng)
    return (("Which is the largest of {L}?", "What is the biggest number among {L}?"), "Take max() of the list.",
            [f"nums = {nums}", "print(max(nums))"], "nums", max(nums), {"L": _list_text(nums)})


def t_min(rng, names):
    nums = _nums(rng)
    return (("Which is the smallest of {L}?", "What is the lowest number among {L}?"), "Take min() of the list.",
            [f"nums = {nums}", "print(min(nums))"], "nums", min(nums), {"L": _list_text(nums)})


def t_prod(rng, names):
    nums = _nums(rng, 2, 30, rng.randint(3, 5))
    return (("What is the product of {L}?", "Multiply {L}. What is the result?"), "Multiply them with math.prod().",
            ["import math", f"nums = {nums}", "print(math.prod(nums))"], "nums", math.prod(nums),
            {"L": _list_text(nums)})


def t_range_sum(rng, names):
    n = rng.randint(10, 5000)
    return (("What is the sum of all whole numbers from 1 to {n}?", "Add every whole number from 1 to {n}. What is the total?"),
            "Sum range(1, n + 1).", [f"n = {n}", "print(sum(range(1, n + 1)))"], "n", n * (n + 1) // 2, {"n": n})


def t_len(rng, names):
    word = names.key() + names.key()[:rng.randint(0, 4)]
    return (('How many letters does the word "{w}" have?', 'What is the length of the word "{w}"?'),
            "Take len() of the word.", [f'word = "{word}"', "print(len(word))"], "word", len(word), {"w": word})


def t_reverse(rng, names):
    word = names.key()
    return (('What is "{w}" written backwards?', 'Reverse the word "{w}". What do you get?'),
            "Reverse the word with [::-1].", [f'word = "{word}"', "print(word[::-1])"], "word", word[::-1], {"w": word})


def t_even_sum(rng, names):
    nums = _nums(rng)
    which, r = rng.choice((("even", 0), ("odd", 1)))
    return ((f"What is the sum of the {which} numbers among {{L}}?", f"Add up only the {which} numbers in {{L}}."),
            f"Sum the numbers with x % 2 == {r}.",
            [f"nums = {nums}", f"print(sum(x for x in nums if x % 2 == {r}))"], "nums",
            sum(x for x in nums if x % 2 == r), {"L": _list_text(nums)})


def t_multiples(rng, names):
    a = rng.randint(1, 200)
    b, k = a + rng.randint(20, 2000), rng.randint(2, 13)
    return (("How many numbers from {a} to {b} are divisible by {k}?", "Count the multiples of {k} between {a} and {b}, both included."),
            "Count x in range(a, b + 1) with x % k == 0.",
            [f"a, b, k = {a}, {b}, {k}", "print(sum(1 for x in range(a, b + 1) if x % k == 0))"], "k",
            sum(1 for x in range(a, b + 1) if x % k == 0), {"a": a, "b": b, "k": k})


def t_digit_sum(rng, names):
    n = rng.randint(10 ** 5, 10 ** 12)
    return (("What is the sum of the digits of {n}?", "Add up the digits of {n}. What is the total?"),
            "Sum the digits of str(n).", [f"n = {n}", "print(sum(int(d) for d in str(n)))"], "n",
            sum(int(d) for d in str(n)), {"n": n})


def t_kth(rng, names):
    nums = _nums(rng, 1, 99, rng.randint(5, 8))
    k = rng.randint(2, len(nums) - 1)
    return (("Sort {L} from small to large. Which number is in position {k}?",
             "Counting from 1, which number is at position {k} when {L} are sorted?"),
            "Sort the list and take index k - 1.", [f"nums = {nums}", f"k = {k}", "print(sorted(nums)[k - 1])"], "nums",
            sorted(nums)[k - 1], {"L": _list_text(nums), "k": k})


def t_vowels(rng, names):
    word = names.key() + names.key()
    return (('How many vowels are in the word "{w}"?', 'Count the vowels (a, e, i, o, u) in "{w}".'),
            "Count the letters of the word that are in \"aeiou\".",
            [f'word = "{word}"', 'print(sum(1 for c in word if c in "aeiou"))'], "word",
            sum(1 for c in word if c in "aeiou"), {"w": word})


def t_squares(rng, names):
    n = rng.randint(5, 300)
    return (("What is the sum of the squares of the numbers from 1 to {n}?", "Add up k * k for every k from 1 to {n}."),
            "Sum k * k over range(1, n + 1).", [f"n = {n}", "print(sum(k * k for k in range(1, n + 1)))"], "n",
            sum(k * k for k in range(1, n + 1)), {"n": n})


def t_fib(rng, names):
    n = rng.randint(10, 80)
    return (("What is Fibonacci number {n}, if numbers 1 and 2 are both 1?",
             "The Fibonacci sequence starts 1, 1, 2, 3, 5. What is its number {n}?"),
            "Step a, b = b, a + b n times.",
            [f"n = {n}", "a, b = 0, 1", "for _ in range(n):", "    a, b = b, a + b", "print(a)"], "a", _fib(n), {"n": n})


def t_primes(rng, names):
    n = rng.randint(20, 2000)
    return (("How many prime numbers are there from 1 to {n}?", "Count the primes up to {n}."),
            "Loop over k and test each for a divisor.",
            [f"n = {n}", "count = 0", "for k in range(2, n + 1):",
             "    if all(k % d for d in range(2, int(k ** 0.5) + 1)):", "        count += 1", "print(count)"],
            "count", sum(_is_prime(k) for k in range(n + 1)), {"n": n})


def t_collatz(rng, names):
    n = rng.randint(3, 3000)
    return (("Starting from {n}, halve even numbers and map odd n to 3n + 1. How many steps until you reach 1?",
             "How many Collatz steps does {n} take to reach 1?"),
            "Loop until n is 1, counting steps.",
            [f"n = {n}", "steps = 0", "while n != 1:", "    n = n // 2 if n % 2 == 0 else 3 * n + 1",
             "    steps += 1", "print(steps)"], "steps", _collatz(n), {"n": n})


def t_divisors(rng, names):
    n = rng.randint(10, 5000)
    return (("What is the sum of all divisors of {n}, including 1 and {n}?", "Add up every number that divides {n} exactly."),
            "Loop d from 1 to n and add the divisors.",
            [f"n = {n}", "total = 0", "for d in range(1, n + 1):", "    if n % d == 0:", "        total += d",
             "print(total)"], "total", sum(d for d in range(1, n + 1) if n % d == 0), {"n": n})


def t_count_over(rng, names):
    nums = _nums(rng)
    t = rng.randint(10, 90)
    return (("How many of {L} are greater than {t}?", "Count the numbers above {t} in {L}."),
            "Loop over the list and count x > t.",
            [f"nums = {nums}", f"t = {t}", "count = 0", "for x in nums:", "    if x > t:", "        count += 1",
             "print(count)"], "count", sum(x > t for x in nums), {"L": _list_text(nums), "t": t})


TEMPLATES = {
    1: (t_sum, t_max, t_min, t_prod, t_range_sum, t_len, t_reverse),
    2: (t_even_sum, t_multiples, t_digit_sum, t_kth, t_vowels, t_squares),
    3: (t_fib, t_primes, t_collatz, t_divisors, t_count_over),
}


def sample(rng, difficulty: int | None = None, split: str = "train") -> Task:
    if difficulty is None:                # the training mix
        difficulty = train_difficulty(rng)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"code difficulty must be 1-3, got {difficulty!r}")
    names = Names(rng, split)
    for _ in range(100):       # the question's hash decides its split: train and eval never share one
        make = rng.choice(TEMPLATES[difficulty])
        wordings, plan, lines, var, answer, fields = make(rng, names)
        question = rng.choice(wordings).format(**fields)
        if split_of(question) == word_pool(split):
            break
    else:
        raise RuntimeError("could not draw a code question of this split")
    meta = {"split": split, "template": make.__name__[2:], "plan": plan, "program": lines, "var": var,
            "names": sorted(names.used)}
    return Task(NAME, difficulty, [user(question)], [("python", {})], answer, meta)


def _typo(var: str) -> str:
    return var * 2 if len(var) == 1 else var[:-1] if var.endswith("s") else var + "s"


def _bugs(lines: list, var: str) -> list:
    """(kind, buggy lines, fix note) the first attempt can have."""
    out = []
    last = lines[-1]
    if re.search(rf"\b{re.escape(var)}\b", last):
        typo = _typo(var)
        out.append(("name", lines[:-1] + [re.sub(rf"\b{re.escape(var)}\b", typo, last, count=1)],
                    f"I misspelt {var} as {typo}. Fixed:"))
    blocks = [i for i, ln in enumerate(lines) if ln.rstrip().endswith(":")]
    if blocks:
        i = blocks[0]
        out.append(("syntax", lines[:i] + [lines[i][:-1]] + lines[i + 1:], "A colon is missing at the end of a line. Fixed:"))
    if last.startswith("print(") and last.endswith(")"):
        out.append(("print", lines[:-1] + [last[len("print("):-1]], "Nothing was printed: the last line needs print(). Fixed:"))
    return out


def gold(task: Task, rng) -> list:
    t = Trajectory(task)
    lines, plan = task.meta["program"], task.meta["plan"]
    expected = str(task.answer)
    reasoning = plan
    if rng.random() < P_RECOVERY:
        kind, bad, note = rng.choice(_bugs(lines, task.meta["var"]))
        res = t.call(plan, "python", mistake=True, code="\n".join(bad))
        assert res.error or res.content == "(no output)", res.content
        reasoning = note
    out = t.call(reasoning, "python", code="\n".join(lines))
    assert not out.error and out.content == expected, (out.content, expected)
    return t.answer(f"The program printed {out.content}.", task.answer)


def verify(task: Task, content) -> float:
    return verify_value(content, task.answer)
