"""Self-critique rubric reward: a critic compares two responses against a rubric; preferences become rewards.

For tasks without a verifier (a note, an explanation, a plan), Kimi K1.5/K2 let the model judge
its own samples: shown the task, the rubric and two responses, the critic says which one keeps the
rubric better. Over the K responses to one prompt every pair is compared (both orders by default,
which cancels a critic's bias toward the first or second position), and a response's reward is its
share of wins, a tie counting half:

    reward_i = mean over j != i of P(i preferred to j)          in [0, 1]

so rewards sit on the same scale as a verifier's 0/1 and only their differences within the group
matter to the RL objective. A response that is empty (the run ended without a final answer) loses
to any non-empty one without asking the critic; two empty ones tie.

The critic is any agent backend: the policy's own engine (`LocalBackend`, self-critique proper),
an OpenAI-compatible endpoint (`EndpointBackend`: a stronger judge), or a scripted one in tests.
Each comparison is one agent step without tools, at temperature 0; the verdict is the last
"Answer: A | B | tie" line of the critic's reply (read by the gym's answer extractor; a reply that
never left its reasoning is read there). A reply without a readable verdict counts as a tie and is
counted in `stats["unreadable"]`.

    critic = Critic(backend)
    rewards, stats = critic.rewards(question, rubric, ["note one", "note two", "note three"])
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from openk2.gym.core import extract_answer

SYSTEM = ("You grade responses against a rubric. Read the task, the rubric and two responses. "
          "Decide which response keeps more of the rubric's rules; if they keep the same rules, "
          "the one that keeps them more fully is better, and if neither is better it is a tie. "
          "End your reply with one last line: 'Answer: A', 'Answer: B' or 'Answer: tie'.")


def messages(question: str, rubric: str, a: str, b: str) -> list:
    """The critic's conversation for one comparison."""
    body = (f"Task:\n{question}\n\nRubric:\n{rubric}\n\nResponse A:\n<<<\n{a}\n>>>\n\n"
            f"Response B:\n<<<\n{b}\n>>>\n\nWhich response follows the rubric better?")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": body}]


def parse_verdict(content) -> float | None:
    """1.0 (A is better), 0.0 (B is), 0.5 (tie), None (no readable verdict)."""
    text = extract_answer(content)
    if text is None:
        return None
    t = text.strip().strip(".").casefold().replace("response ", "")
    return {"a": 1.0, "b": 0.0, "tie": 0.5}.get(t)


class Critic:
    """Pairwise comparisons through an agent backend. `swap`: ask both orders of every pair.
    `workers`: comparisons in flight at once (an engine batches them)."""

    def __init__(self, backend, *, swap: bool = True, max_tokens: int = 512, temperature: float = 0.0,
                 workers: int = 16, seed: int = 0):
        if not hasattr(backend, "session"):
            raise ValueError("Critic needs an agent backend (LocalBackend or EndpointBackend)")
        self.backend, self.swap, self.max_tokens = backend, swap, max_tokens
        self.temperature, self.workers, self.seed = temperature, workers, seed

    def compare(self, jobs: list[tuple[str, str, str, str]]) -> list[float | None]:
        """Verdicts for (question, rubric, a, b) jobs, in order (see parse_verdict)."""
        from openk2.agent import run

        def one(i):
            q, r, a, b = jobs[i]
            trace = run(messages(q, r, a, b), self.backend, tools=[], max_steps=1,
                        max_step_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed + i)
            if trace.stop_reason == "final":
                return parse_verdict(trace.content)
            last = trace.steps[-1] if trace.steps else None   # a verdict left inside unclosed reasoning
            return parse_verdict(last.content or last.reasoning) if last is not None else None
        if not jobs:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(jobs))),
                                thread_name_prefix="openk2-critic") as pool:
            return list(pool.map(one, range(len(jobs))))

    def rewards(self, question: str, rubric: str, responses: list[str]) -> tuple[list[float], dict]:
        """Win shares of `responses` (one group: the K samples of one prompt)."""
        return self.rewards_many([(question, rubric, responses)])[0]

    def rewards_many(self, groups: list[tuple[str, str, list[str]]]) -> list[tuple[list[float], dict]]:
        """`rewards` for many groups, all comparisons in one batch."""
        jobs, where = [], []   # where[k] = (group, i, j): job k compares i (as A) with j (as B)
        prefs = []
        for g, (q, r, resp) in enumerate(groups):
            n = len(resp)
            p = [[None] * n for _ in range(n)]   # p[i][j]: evidence that i beats j
            prefs.append(p)
            for i in range(n):
                for j in range(i + 1, n):
                    ei, ej = bool(resp[i].strip()), bool(resp[j].strip())
                    if not (ei and ej):
                        p[i][j] = [1.0 if ei and not ej else 0.0 if ej and not ei else 0.5]
                        continue
                    p[i][j] = []
                    jobs.append((q, r, resp[i], resp[j]))
                    where.append((g, i, j, False))
                    if self.swap:
                        jobs.append((q, r, resp[j], resp[i]))
                        where.append((g, i, j, True))
        verdicts = self.compare(jobs)
        unreadable = [0] * len(groups)
        for (g, i, j, swapped), v in zip(where, verdicts):
            if v is None:
                unreadable[g] += 1
                v = 0.5
            prefs[g][i][j].append(1.0 - v if swapped else v)
        out = []
        for g, (q, r, resp) in enumerate(groups):
            n, p = len(resp), prefs[g]
            wins = [0.0] * n
            for i in range(n):
                for j in range(i + 1, n):
                    x = sum(p[i][j]) / len(p[i][j])
                    wins[i] += x
                    wins[j] += 1.0 - x
            rewards = [w / (n - 1) for w in wins] if n > 1 else [0.5] * n
            asked = sum(1 for (gg, *_rest) in where if gg == g)
            out.append((rewards, {"comparisons": asked, "unreadable": unreadable[g]}))
        return out
