"""What one RL step learns from: prompts from the gym's RL split, K agent trajectories per prompt through
the engine, their rewards (verifier, or a critic against a rubric, minus a penalty when a budget cut
them), and gold conversations for the PTX loss.

Prompts: step s takes prompts s*P .. s*P+P-1 of the run, families in turn, each family's task index
counting up in the "rl" split (openk2/gym: train words, seeds of its own, so never an eval word);
difficulties are drawn from the levels given for the family. Under torchrun, rank r takes the
prompts j with j % world == r: the groups of K stay whole on one rank.

Rollouts: every trajectory of the step runs at once, one thread each, through `openk2.agent.run` on
one backend (the engine batches all their model calls); tools really run and their outputs are
forced into the sequence (the trajectory's views mask them out). Trajectory i of the step runs with
seed step_seed + i, so a step's samples are reproducible whatever the thread timing.

Budgets: a family's token budget is the run's `max_total_tokens`: a trajectory that would go past it
is cut there (stop_reason max_total_tokens) and, like any run a budget stopped (max_step_tokens,
max_steps), gets `score - penalty`. The agent settings are the gym's (window gym.CONTEXT_WINDOW
capped by the model's, gym.STEP_TOKENS per call): the views the model was trained on, as `openk2
eval` uses.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from openk2 import gym

BUDGET_STOPS = ("max_steps", "max_step_tokens", "max_total_tokens", "wall_time")


def parse_budgets(spec, families) -> dict:
    """"arith=300,chain=800" -> {"arith": 300, "chain": 800}; a bare number applies to every family;
    None or "" -> {} (no budget beyond the agent's own)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        out = dict(spec)
    else:
        out = {}
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            fam, _, value = part.rpartition("=")
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"budget {part!r}: expected FAMILY=TOKENS or TOKENS") from None
            for f in ([fam.strip()] if fam else families):
                out[f] = n
    for f, n in out.items():
        gym.family(f)
        if f not in families:
            raise ValueError(f"budget given for {f}, which is not among the RL families ({', '.join(families)})")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"budget of {f} must be a positive number of tokens, got {n!r}")
    return out


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of step `step`'s first trajectory (trajectory i uses this + i)."""
    return (seed * 1_000_003 + step * 65_537) % (1 << 31)


def step_tasks(families: list, levels: dict, seed: int, step: int, n_prompts: int,
               rank: int = 0, world: int = 1) -> list:
    """This rank's prompts of step `step`: [(prompt number in the run, Task)]."""
    out = []
    for j in range(n_prompts):
        if j % world != rank:
            continue
        k = step * n_prompts + j
        fam = families[k % len(families)]
        out.append((k, gym.sample(fam, seed, k // len(families), "rl", levels.get(fam))))
    return out


@dataclass
class Sample:
    """One trajectory and what the step makes of it."""
    task: object
    group: int                  # the prompt it answers (its K siblings share it)
    trace: object
    seed: int
    score: float = 0.0          # verifier reward, or the critic's win share
    reward: float = 0.0         # score, minus the penalty when a budget cut the run
    truncated: bool = False
    views: list = field(default_factory=list)   # [(ids, mask)]: what the objective trains on

    @property
    def tokens(self) -> int:
        return self.trace.generated_tokens

    @property
    def content(self) -> str:
        return self.trace.content if self.trace.stop_reason == "final" else ""


def rollout(backend, tasks: list, k: int, *, temperature: float, seed: int, budgets: dict | None = None,
            window: int | None = None, step_tokens: int = gym.STEP_TOKENS, max_steps: int = 400,
            top_p: float = 1.0, stop_event: threading.Event | None = None) -> list[Sample]:
    """K trajectories of each task, all at once; Samples in order (task 0's K first). `tasks` are
    Tasks or (number, Task) pairs (the number becomes the group)."""
    from openk2.agent import run
    from openk2.eval import task_input
    budgets = budgets or {}
    pairs = [t if isinstance(t, tuple) else (g, t) for g, t in enumerate(tasks)]
    jobs = [(g, task, seed + i * k + s) for i, (g, task) in enumerate(pairs) for s in range(k)]
    if not jobs:
        return []

    def one(job):
        g, task, sd = job
        trace = run(task_input(task, None), backend, None, max_steps=max_steps, max_step_tokens=step_tokens,
                    max_total_tokens=budgets.get(task.family), context_window=window,
                    temperature=temperature, top_p=top_p, seed=sd, stop_event=stop_event)
        views = [(s["ids"], s["mask"]) for s in trace.sequences()]
        return Sample(task, g, trace, sd, truncated=trace.stop_reason in BUDGET_STOPS, views=views)
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="openk2-rollout") as pool:
        return list(pool.map(one, jobs))


def score(samples: list[Sample], critic=None, penalty: float = 0.0) -> dict:
    """Fill each sample's score and reward. Verifier families: gym.verify of the final answer (0
    when the run ended without one). Rubric families: the critic's win shares within each group
    (all groups' comparisons in one batch). Returns {"critic_comparisons", "critic_unreadable"}."""
    rubric_groups: dict = {}
    for s in samples:
        if gym.reward_kind(s.task.family) == "rubric":
            rubric_groups.setdefault(s.group, []).append(s)
        else:
            s.score = float(gym.verify(s.task, s.content))
    stats = {"critic_comparisons": 0, "critic_unreadable": 0}
    if rubric_groups:
        if critic is None:
            fams = sorted({s.task.family for g in rubric_groups.values() for s in g})
            raise ValueError(f"{', '.join(fams)}: rewarded by a rubric, which needs a critic (--critic self or URL)")
        groups = list(rubric_groups.values())
        asks = []
        for g in groups:
            mod = gym.family(g[0].task.family)
            asks.append((g[0].task.question, mod.rubric(g[0].task), [s.content for s in g]))
        for g, (rewards, st) in zip(groups, critic.rewards_many(asks)):
            for s, r in zip(g, rewards):
                s.score = float(r)
            stats["critic_comparisons"] += st["comparisons"]
            stats["critic_unreadable"] += st["unreadable"]
    for s in samples:
        s.reward = s.score - (penalty if s.truncated else 0.0)
    return stats


def gold_tasks(families: list, seed: int, start: int, n: int, levels: dict | None = None) -> list:
    """Train-split tasks start .. start+n-1, families in turn; a family's levels drawn from
    `levels` (--ptx-difficulty) or, without, the SFT data's mix."""
    levels = levels or {}
    out = []
    for k in range(start, start + n):
        fam = families[k % len(families)]
        out.append(gym.sample(fam, seed, k // len(families), "train", levels.get(fam)))
    return out


def gold_sequences(families: list, seed: int, start: int, n: int, tokenizer, window: int | None,
                   step_tokens: int = gym.STEP_TOKENS, levels: dict | None = None) -> list:
    """The gold conversations of gold_tasks (without `levels`, the SFT data's distribution: the
    same task numbering as gym.conversations), rendered as the trainer renders them (the agent's
    views under `window`): [(ids, mask)] for the PTX loss."""
    from openk2.data import render_record
    out = []
    for task in gold_tasks(families, seed, start, n, levels):
        rec = {"messages": gym.gold(task), "tools": task.schemas(),
               **gym.check_agent_settings(window, step_tokens)}
        out += render_record(rec, tokenizer)
    return out
