"""Does a model still solve gym tasks when the agent offers its default tools instead of the task's own?

`openk2 agent "question"` with no --tools offers calculator and python (agent_view.DEFAULT_TOOLS);
the gym's tasks offer only their family's tool. A model trained on one tool per task can fail the
first while passing the second. Per family and level: greedy runs on the same held-out tasks, once
with the default tools and once with the task's own (`openk2 eval`'s settings otherwise).

    python bench/default_tools.py [MODEL] [--n 12] [--levels arith=1,2,code=1,2] [--seed 11]
"""

import argparse

from openk2 import eval as ev
from openk2 import gym
from openk2.agent import run_many
from openk2.agent_view import DEFAULT_TOOLS


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: models/k2-nano)")
    p.add_argument("--n", type=int, default=12, help="tasks per level")
    p.add_argument("--levels", default="arith=1,2,code=1,2")
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    levels = gym.parse_difficulty(args.levels)
    backend, name, _ = ev.resolve_backend(args.model, [])
    window, step_tokens = ev.agent_settings(backend)
    settings = dict(max_steps=30, max_step_tokens=step_tokens, context_window=window, temperature=0,
                    max_total_tokens=2000)
    print(f"model {name}; default tools {DEFAULT_TOOLS}; {args.n} held-out tasks per level, seed {args.seed}")
    for fam, lv in levels.items():
        for level in lv:
            tasks = gym.tasks(fam, args.n, args.seed, "eval", {fam: [level]})
            scores = []
            for tools in (DEFAULT_TOOLS.split(","), None):      # None: each task's own tools
                inputs = [ev.task_input(t, None) for t in tasks]
                traces = run_many(inputs, backend, tools, seed=args.seed, **settings)
                scores.append(sum(gym.verify(t, tr.content if tr.stop_reason == "final" else "")
                                  for t, tr in zip(tasks, traces)))
            print(f"{fam} {level}: default tools {scores[0]:.0f}/{args.n}, own tool {scores[1]:.0f}/{args.n}")


if __name__ == "__main__":
    main()
