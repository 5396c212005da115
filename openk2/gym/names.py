"""Generated names: people, places, organisations and table keys built from syllables, split by hash.

Why syllables: a model trained from scratch has no world knowledge, and should not need any. Names
made of a small syllable inventory ("Tavo Relin", "Kesmar", "morelika") tokenize into a few regular
pieces, carry no meaning the model could memorise, and are plentiful (tens of thousands per kind).

Why a hash split: every word is assigned to the train or the eval split by a hash of its spelling
(a quarter goes to eval), and a generator for one split only ever draws words of that split. So no
person, place, organisation or key of an evaluation task was ever seen in training, whatever the
seeds, and the test can check it word by word (`split_of`).

The third split, "rl" (the RL loop's prompts, openk2/rl.py), draws from the train words: RL
continues the training the model had, on its own task stream (its own seeds, openk2.gym.task_rng),
and never sees an eval word either. `word_pool(split)` says which pool a split draws from.
"""

from __future__ import annotations

import hashlib

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
CODAS = ("", "", "n", "r", "l", "s")
SPLITS = ("train", "eval", "rl")
POOLS = {"train": "train", "eval": "eval", "rl": "train"}   # split -> the words it draws

JOBS = ("weaver", "baker", "painter", "smith", "farmer", "potter", "singer", "teacher", "doctor",
        "sailor", "builder", "tailor", "miner", "glassmaker", "carpenter", "scribe")
ORG_KINDS = ("Guild", "Company", "Society", "Works", "Bank", "Club", "Press", "Trust")


def split_of(word: str) -> str:
    """The split a word belongs to: "eval" for a quarter of all spellings (by hash), else "train"."""
    h = hashlib.sha256(word.strip().casefold().encode()).digest()
    return "eval" if h[0] % 4 == 0 else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split


def word_pool(split: str) -> str:
    """The word pool ("train" or "eval", as `split_of` returns) that `split` draws from."""
    return POOLS[check_split(split)]


def _syllable(rng) -> str:
    return rng.choice(CONSONANTS) + rng.choice(VOWELS)


def _word(rng, n_syllables: int, coda: bool = True) -> str:
    w = "".join(_syllable(rng) for _ in range(n_syllables))
    return w + (rng.choice(CODAS) if coda else "")


class Names:
    """Draws words of one split, never the same one twice (so entities and keys in a task are distinct)."""

    def __init__(self, rng, split: str):
        self.rng, self.split = rng, check_split(split)
        self.pool = word_pool(split)
        self.used: set[str] = set()

    def in_split(self, name: str) -> bool:
        """Every word of `name` (an organisation's kind aside) belongs to this split's pool."""
        return all(split_of(p) == self.pool for p in name.split(" ") if p not in ORG_KINDS)

    def _fresh(self, make) -> str:
        for _ in range(1000):
            w = make()
            if w.casefold() not in self.used and self.in_split(w):
                self.used.add(w.casefold())
                return w
        raise RuntimeError("could not draw a fresh name (pool exhausted?)")

    def first(self) -> str:
        return self._fresh(lambda: _word(self.rng, 2).capitalize())

    def last(self) -> str:
        return self._fresh(lambda: _word(self.rng, self.rng.choice((2, 2, 3))).capitalize())

    def person(self) -> str:
        return f"{self.first()} {self.last()}"

    def place(self) -> str:
        return self._fresh(lambda: _word(self.rng, self.rng.choice((2, 2, 3))).capitalize())

    def org(self) -> str:
        return f"{self.place()} {self.rng.choice(ORG_KINDS)}"

    def key(self) -> str:
        return self._fresh(lambda: _word(self.rng, 3, coda=False))

    def near(self, name: str) -> str | None:
        """A fresh name one letter away from `name` (a vowel for a vowel or a consonant for a
        consonant) whose words stay in this split: the distractor a careless reader confuses with
        `name`. None when there is none (rare)."""
        words = name.split(" ")
        options = []
        for i, w in enumerate(words):
            if w in ORG_KINDS:                   # change the name part, not "Guild"
                continue
            for j, ch in enumerate(w):
                pool = VOWELS if ch.lower() in VOWELS else CONSONANTS
                for c in pool:
                    if c != ch.lower():
                        c = c.upper() if ch.isupper() else c
                        options.append(" ".join(words[:i] + [w[:j] + c + w[j + 1:]] + words[i + 1:]))
        options = [o for o in options if o.casefold() not in self.used and self.in_split(o)]
        if not options:
            return None
        choice = self.rng.choice(options)
        self.used.add(choice.casefold())
        return choice

    def mistype(self, word: str) -> str:
        """`word` with one vowel changed, not marked as used (a typo, not an entity)."""
        spots = [j for j, c in enumerate(word) if c.lower() in VOWELS]
        j = self.rng.choice(spots)
        c = self.rng.choice([v for v in VOWELS if v != word[j].lower()])
        return word[:j] + c + word[j + 1:]
