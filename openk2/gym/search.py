"""search: multi-hop questions over a generated knowledge base, answered with `search` and `open`.

    In which year was Tavo Relin's mentor's employer founded?
    search("Tavo Relin") -> open("tavo-relin") -> "... Tavo Relin's mentor is Sana Kurel. ..."
    search("Sana Kurel") -> open("sana-kurel") -> "... Sana Kurel works for the Morel Guild. ..."
    search("Morel Guild") -> open("morel-guild") -> "... The Morel Guild was founded in 1902. ..."
    Answer: 1902

A small BrowseComp. Each task brings its own world: fictional people, towns and organisations with
generated names, each described by a short document (a few templated sentences, shuffled). Difficulty
is the number of hops, 1-4: the documents that must be read in turn, each naming the next entity.
The question is a possessive chain read left to right ("X's mentor's employer"), so the order of the
hops is the order of the words. Every entity on the path has one or two distractors whose names
differ by one letter ("Sana Kurol") and whose documents say other things; search also returns the
documents that merely mention a name. Answers are a name or a number.

Per-task corpus (why not one shared corpus per split): the documents travel in the task's tool
configuration (`docs=[...]`), so a task is one self-contained JSON object, evaluation needs no cache
directory and no build step, and replaying a task anywhere gives the same search results. A world of
10-25 short documents costs a few KB and an in-memory index built in about a millisecond.

Gold: search for each entity by name, open its id, read the fact that names the next one. Every
reasoning carries what is still needed, in the question's order ("Find Tavo Relin; need mentor,
employer, founded."), so each step is local: the front of the latest list says which sentence of the
open document to read, and no step has to work out, far back in the question, how far it has got.
On ~15% of samples one open goes wrong first: the distractor's id (the model notices the name
differs), the name instead of the id or a mistyped id (the tool's real "no document" error), then
the right id.
"""

from __future__ import annotations

from openk2.gym.core import Task, Trajectory, user, verify_value
from openk2.gym.names import JOBS, Names

NAME = "search"
DIFFICULTIES = (1, 2, 3, 4)
DEFAULT_DIFFICULTY = None                  # sample(rng, None): the training mix
LEVELS = DIFFICULTIES
SEARCH_K = 3
SNIPPET_TOKENS = 10
P_RECOVERY = 0.15                          # gold: share of samples that open a wrong id first

# kind -> relation -> kind of the entity it points to
RELATIONS = {
    "person": {"mentor": "person", "employer": "org", "hometown": "place"},
    "org": {"leader": "person", "town": "place"},
    "place": {"mayor": "person"},
}
VALUES = {"person": ("job", "born"), "org": ("founded",), "place": ("founded", "population")}

QUESTIONS = {
    ("person", "job"): ("What is {S}'s job?", "What does {S} do for a living?"),
    ("person", "born"): ("In which year was {S} born?", "What year was {S} born in?"),
    ("person", "mentor"): ("Who is {S}'s mentor?", "Who was {S} taught by?"),
    ("person", "employer"): ("Which organisation does {S} work for?", "Who employs {S}?"),
    ("person", "hometown"): ("Where did {S} grow up?", "What is {S}'s hometown?"),
    ("org", "founded"): ("In which year was {S} founded?", "When was {S} founded?"),
    ("org", "leader"): ("Who leads {S}?", "Who is the leader of {S}?"),
    ("org", "town"): ("In which town is {S} based?", "Where is {S} based?"),
    ("place", "founded"): ("In which year was {S} founded?", "When was {S} founded?"),
    ("place", "population"): ("How many people live in {S}?", "What is the population of {S}?"),
    ("place", "mayor"): ("Who is the mayor of {S}?", "Who is {S}'s mayor?"),
}


def train_difficulty(rng) -> int:
    return rng.choice(DIFFICULTIES)


def slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _mention(entity: dict) -> str:
    """How an entity is named in running text: organisations take "the"."""
    return ("the " if entity["kind"] == "org" else "") + entity["name"]


def _fact(e: dict, attr: str, world: dict, rng) -> str:
    """One sentence of e's document stating attribute `attr`."""
    n, v = e["name"], e[attr]
    ref = _mention(world[v]) if attr in RELATIONS[e["kind"]] else v
    if e["kind"] == "person":
        return rng.choice({
            "job": (f"{n} is a {v}.", f"{n} works as a {v}."),
            "born": (f"{n} was born in {v}.", f"{n} was born in the year {v}."),
            "mentor": (f"{n}'s mentor is {ref}.", f"{n} was taught by {ref}."),
            "employer": (f"{n} works for {ref}.", f"{n} is employed by {ref}."),
            "hometown": (f"{n} grew up in {ref}.", f"{n}'s hometown is {ref}."),
        }[attr])
    if e["kind"] == "org":
        the = "The " + n
        return rng.choice({
            "founded": (f"{the} was founded in {v}.", f"{the} dates from {v}."),
            "leader": (f"{the} is led by {ref}.", f"The leader of the {n} is {ref}."),
            "town": (f"{the} is based in {ref}.", f"{the} has its home in {ref}."),
        }[attr])
    return rng.choice({
        "founded": (f"{n} was founded in {v}.", f"{n} dates from {v}."),
        "population": (f"{n} has {v} inhabitants.", f"{v} people live in {n}."),
        "mayor": (f"The mayor of {n} is {ref}.", f"{n} is governed by {ref} as mayor."),
    }[attr])


def _document(e: dict, world: dict, rng) -> dict:
    intro = {"person": None, "org": f"The {e['name']} is an organisation.", "place": f"{e['name']} is a town."}[e["kind"]]
    attrs = list(VALUES[e["kind"]]) + list(RELATIONS[e["kind"]])
    if e["kind"] == "person":            # the job sentence introduces a person
        attrs.remove("job")
        intro = _fact(e, "job", world, rng)
    rng.shuffle(attrs)
    text = " ".join([intro] + [_fact(e, a, world, rng) for a in attrs])
    return {"id": slug(e["name"]), "title": e["name"], "text": text}


class _World:
    def __init__(self, rng, split):
        self.rng, self.names = rng, Names(rng, split)
        self.entities: dict = {}        # name -> entity

    def new(self, kind: str, name: str | None = None) -> dict:
        if name is None:
            name = {"person": self.names.person, "org": self.names.org, "place": self.names.place}[kind]()
        e = {"kind": kind, "name": name}
        self.entities[name] = e
        return e

    def fill(self, e: dict) -> dict:
        """Give e every attribute; related entities are new names (documented only if on a path)."""
        rng = self.rng
        if e["kind"] == "person":
            e["job"], e["born"] = rng.choice(JOBS), rng.randint(1900, 1999)
        elif e["kind"] == "org":
            e["founded"] = rng.randint(1700, 1990)
        else:
            e["founded"], e["population"] = rng.randint(1200, 1950), rng.randint(1000, 90000)
        for rel, kind in RELATIONS[e["kind"]].items():
            if rel not in e:
                e[rel] = self.new(kind)["name"]
        return e


def sample(rng, difficulty: int | None = None, split: str = "train") -> Task:
    if difficulty is None:                # the training mix
        difficulty = train_difficulty(rng)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"search difficulty must be 1-4 hops, got {difficulty!r}")
    from openk2 import tools as tools_mod
    for _ in range(50):
        task = _attempt(rng, difficulty, split)
        search = tools_mod.get("search", **task.tools[0][1])
        # each entity on the path must be among the results of a search for its exact name
        if all(f"(id: {slug(name)})" in search(query=name) for name in task.meta["path"]):
            return task
    raise RuntimeError("could not build a search task whose entities are all findable")


def _attempt(rng, hops: int, split: str) -> Task:
    w = _World(rng, split)
    kind = rng.choice(("person", "person", "org", "place"))
    path = [w.new(kind)]
    rels = []
    for _ in range(hops - 1):
        rel = rng.choice(sorted(RELATIONS[path[-1]["kind"]]))
        nxt = w.new(RELATIONS[path[-1]["kind"]][rel])
        path[-1][rel] = nxt["name"]
        rels.append(rel)
        path.append(nxt)
    last = path[-1]
    final = rng.choice(list(VALUES[last["kind"]]) + sorted(RELATIONS[last["kind"]]))
    documented = list(path)
    for e in path:                                   # one or two near-name distractors per hop
        for _ in range(rng.choice((1, 1, 2))):
            near = w.names.near(e["name"])
            if near is not None:
                documented.append(w.new(e["kind"], near))
    for _ in range(rng.randint(1, 3)):               # a few unrelated entities
        documented.append(w.new(rng.choice(("person", "org", "place"))))
    for e in list(documented):
        w.fill(e)
    rng.shuffle(documented)
    docs = [_document(e, w.entities, rng) for e in documented]
    for e in path:
        e["doc"] = slug(e["name"])

    subject = _mention(path[0])
    for rel in rels:
        subject += f"'s {rel}"
    question = rng.choice(QUESTIONS[(last["kind"], final)]).format(S=subject)
    question = question[0].upper() + question[1:]
    answer = last[final]
    if final in RELATIONS[last["kind"]]:
        answer = w.entities[answer]["name"]
    tools = [("search", {"docs": docs, "k": SEARCH_K, "snippet_tokens": SNIPPET_TOKENS}),
             ("open", {"docs": docs})]
    meta = {"split": split, "path": [e["name"] for e in path], "relations": rels, "final": final,
            "kinds": [e["kind"] for e in path], "names": sorted(w.entities)}
    return Task(NAME, hops, [user(question)], tools, answer, meta)


def _read(doc_text: str, name: str, attr: str, kind: str) -> str:
    """The sentence of a document that states `attr` (the gold reasoning quotes it)."""
    for s in doc_text.split(". "):
        s = s.rstrip(".") + "."
        if _states(s, attr, kind):
            return s
    raise AssertionError(f"no sentence about {attr} in {doc_text!r}")


def _states(sentence: str, attr: str, kind: str) -> bool:
    cues = {"job": (" is a ", " works as a "), "born": (" born ",), "mentor": ("mentor", "taught by"),
            "employer": ("works for", "employed by"), "hometown": ("grew up", "hometown"),
            "founded": ("founded", "dates from"), "leader": ("led by", "leader"),
            "town": ("based in", "home in"), "population": ("inhabitants", "people live"),
            "mayor": ("mayor",)}[attr]
    if attr == "job" and (" is a town" in sentence or " is an organisation" in sentence):
        return False
    return any(c in sentence for c in cues)


def _one_letter_apart(a: str, b: str) -> bool:
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def gold(task: Task, rng) -> list:
    t = Trajectory(task)
    path, rels, kinds = task.meta["path"], task.meta["relations"], task.meta["kinds"]
    docs = {d["id"]: d for d in task.tools[0][1]["docs"]}
    slip = rng.randrange(len(path)) if rng.random() < P_RECOVERY else None
    wanted = list(rels) + [task.meta["final"]]
    reasoning = f"Find {path[0]}; need {', '.join(wanted)}."
    for j, name in enumerate(path):
        need = f"need {', '.join(wanted[j:])}."
        results = t.call(reasoning, "search", query=name).content
        sid = slug(name)
        reasoning = f"{name} (id: {sid}); {need}"   # the result's own words: the id is copied on from the name
        if j == slip:
            others = [d for d in docs if f"(id: {d})" in results and _one_letter_apart(docs[d]["title"], name)]
            by_name = " " in name          # a one-word name opens by itself (the tool ignores case)
            if others and (not by_name or rng.random() < 0.6):
                wrong = docs[others[0]]["title"]
                t.call(reasoning.replace(name, wrong, 1).replace(sid, others[0]), "open", mistake=True,
                       doc_id=others[0])
                reasoning = f"That is {wrong}, not {name}. Open {sid}; {need}"
            elif by_name:
                res = t.call(f"Open {name}; {need}", "open", mistake=True, doc_id=name)
                assert res.error, res.content
                reasoning = f"Ids come from the search results: {name} is {sid}; {need}"
            else:                          # a typo in the id
                wrong = Names(rng, task.meta["split"]).mistype(sid)
                if wrong not in docs:
                    res = t.call(reasoning.replace(sid, wrong), "open", mistake=True, doc_id=wrong)
                    assert res.error, res.content
                    reasoning = f"I mistyped the id; it is {sid}; {need}"
        page = t.call(reasoning, "open", doc_id=sid).content
        fact = _read(docs[sid]["text"], name, wanted[j], kinds[j])
        assert fact in page, (fact, page)
        if j + 1 < len(path):
            reasoning = f"{fact} Find {path[j + 1]}; need {', '.join(wanted[j + 1:])}."
    return t.answer(f"{fact} So the answer is {task.answer}.", task.answer)


def verify(task: Task, content) -> float:
    return verify_value(content, task.answer)
