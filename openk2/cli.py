"""The `openk2` command. One subcommand per job; heavy libraries are imported inside the handlers,
so `openk2 --help` and `openk2 info` start in well under a second."""

from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from openk2.info import model_info, format_info
    info = model_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _demo(args) -> int:
    from openk2.demo import main as demo_main
    return demo_main()


# ---- train / plot (owner: train) ------------------------------------------------------------------

def _train(args) -> int:
    import os
    from openk2.train import options_from_args, train
    summary = train(options_from_args(args))
    if not args.quiet and os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return 0


def _plot(args) -> int:
    from openk2.plot import plot_runs
    print(plot_runs(args.runs, args.out))
    return 0


def _loss(args) -> int:
    from openk2.train import heldout_loss
    rows = []
    for ckpt in args.checkpoints:
        loss, n = heldout_loss(ckpt, args.data, args.max_len)
        rows.append({"checkpoint": ckpt, "loss": loss, "tokens": n})
        print(f"{ckpt}: masked CE {loss:.4f} over {n} tokens", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"data": args.data, "max_len": args.max_len, "results": rows}, f, indent=1)
    return 0


def _add_train_plot(sub) -> None:
    # Defaults are None: a new run takes openk2.train.DEFAULTS, a --resume the run's own values.
    s = sub.add_parser("train", help="pretrain / SFT with MuonClip (torchrun-ready, resumable)",
                       description="Train a K2-architecture model. Under torchrun: "
                                   "torchrun --nproc-per-node N -m openk2.train ARGS")
    m = s.add_argument_group("model")
    m.add_argument("--preset", help="start from a preset's random init (default k2-nano)")
    m.add_argument("--config", help="start from a config.json's random init")
    m.add_argument("--init", metavar="CHECKPOINT", help="start from a checkpoint's weights (e.g. SFT after pretraining)")
    m.add_argument("--tokenizer", metavar="DIR", help="tokenizer.json directory (default: the checkpoint's)")
    m.add_argument("--qat", choices=("none", "experts", "all"), help="INT4 fake-quant training (default none)")
    g = s.add_argument_group("data")
    g.add_argument("--data", help="gym:FAMILY[,...] | FILE.jsonl (conversations) | FILE.bin (uint32 token ids)")
    g.add_argument("--seq-len", type=int, help="tokens per row (default 512)")
    g.add_argument("--batch-size", type=int, help="rows per optimizer step over all processes (default 16)")
    g.add_argument("--micro-batch", type=int, help="rows per forward per process; gradients accumulate "
                                                   "(default: the whole per-process share)")
    g.add_argument("--gym-size", type=int, help="conversations generated for gym data (default 10000)")
    g.add_argument("--loss-on", choices=("masked", "all"),
                   help="conversations: loss on the generated tokens (masked, SFT: default) or on all tokens "
                        "(pretraining on the trajectories' text)")
    o = s.add_argument_group("optimization")
    o.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    o.add_argument("--optimizer", choices=("muonclip", "muon", "adamw"), help="default muonclip")
    o.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    o.add_argument("--muon-lr", type=float, help="Muon's peak lr (default: --lr)")
    o.add_argument("--muon-scale", choices=("adamw", "keller"),
                   help="adamw: 0.2*sqrt(max(rows,cols)) (K2, default); keller: max(1,rows/cols)^0.5")
    o.add_argument("--weight-decay", type=float, help="decoupled weight decay (default 0.1)")
    o.add_argument("--warmup", type=int, help="warmup steps (default min(100, steps/20))")
    o.add_argument("--decay-frac", type=float, help="fraction of steps in the final cosine decay (default 0.2)")
    o.add_argument("--min-lr-ratio", type=float, help="lr at the end of the decay / peak (default 0.1)")
    o.add_argument("--qk-clip-tau", type=float, help="QK-Clip threshold on attention logits (default 100)")
    o.add_argument("--router-bias-rate", type=float, help="router correction-bias step (default 1e-3)")
    o.add_argument("--grad-clip", type=float, help="global gradient-norm clip, 0 = off (default 1.0)")
    o.add_argument("--seed", type=int, help="default 0")
    r = s.add_argument_group("run")
    r.add_argument("--out", required=True, metavar="DIR", help="run directory: metrics.jsonl, checkpoints/, latest")
    r.add_argument("--save-every", type=int, help="checkpoint every N steps, and at the end (default 100)")
    r.add_argument("--keep", type=int, help="checkpoints kept (default 2)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=_train)

    s = sub.add_parser("plot", help="plot training runs: loss vs tokens and time, max logit, lr, expert load")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories holding metrics.jsonl")
    s.add_argument("--out", required=True, metavar="FILE.png")
    s.set_defaults(func=_plot)

    s = sub.add_parser("loss", help="loss of checkpoints on held-out conversations, on the tokens the model generates")
    s.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    s.add_argument("--data", required=True, metavar="FILE.jsonl", help="conversations (openk2 gym export)")
    s.add_argument("--max-len", type=int, default=1152, help="tokens of each conversation scored (default 1152)")
    s.add_argument("--json", metavar="FILE", help="also write {data, max_len, results: [{checkpoint, loss, tokens}]}")
    s.set_defaults(func=_loss)
# ---- end train / plot -----------------------------------------------------------------------------


# ---- tokenizer (owner: chat) --------------------------------------------------------------------
def _tokenizer_train(args) -> int:
    from openk2.tokenizer import train_tokenizer
    tok = train_tokenizer(args.corpus, args.vocab_size)
    tok.save(args.out)
    print(f"trained a {tok.vocab_size}-id tokenizer on {len(args.corpus)} file(s); wrote tokenizer.json, "
          f"tokenizer_config.json, generation_config.json to {args.out}")
    return 0


def _add_tokenizer_parser(sub) -> None:
    s = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer with the K2 control tokens")
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("train", help="train on text files; save tokenizer.json + configs (chat template) to --out")
    t.add_argument("corpus", nargs="+", help="UTF-8 text files")
    t.add_argument("--vocab-size", type=int, required=True, help="ids in total, control tokens included")
    t.add_argument("--out", required=True, help="directory to write (e.g. a checkpoint directory)")
    t.set_defaults(func=_tokenizer_train)
# ---- end tokenizer --------------------------------------------------------------------------------


# ---- agent, chat (owner: agent) ------------------------------------------------------------------
def _agent(args) -> int:
    from openk2.agent_view import agent_main
    return agent_main(args)


def _chat(args) -> int:
    from openk2.agent_view import chat_main
    return chat_main(args)


def _add_agent_parsers(sub) -> None:
    from openk2.agent_view import add_common_arguments  # light: rich and the agent load in the handlers
    s = sub.add_parser("agent", help="answer a question with the thinking agent (reasoning + tool calls)")
    s.add_argument("question", help="the task, in words")
    add_common_arguments(s)
    s.add_argument("--heavy", type=int, default=None, metavar="K",
                   help="run K trajectories in parallel and aggregate (vote, else reflection)")
    s.add_argument("--quiet", action="store_true", help="no live view; print only the final answer")
    s.set_defaults(func=_agent)
    s = sub.add_parser("chat", help="interactive multi-turn chat with the agent")
    add_common_arguments(s)
    s.set_defaults(func=_chat)
# ---- end agent, chat ------------------------------------------------------------------------------


# ---- generate (owner: engine) ---------------------------------------------------------------------

def _generate(args) -> int:
    from openk2.generation import cli
    return cli(args)


def _add_generate_parser(sub) -> None:
    s = sub.add_parser("generate", help="generate from a prompt, streaming to the terminal")
    s.add_argument("model", help="checkpoint directory, preset name, or http(s):// OpenAI-compatible endpoint")
    s.add_argument("prompt", help="the prompt ('-' reads stdin); a user turn unless --raw")
    s.add_argument("--raw", action="store_true", help="continue the text as is (no chat rendering)")
    s.add_argument("--ids", action="store_true", help="prompt and output are token ids (no tokenizer needed)")
    s.add_argument("--system", help="system message (chat mode)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--api-key", help="for an http(s) MODEL")
    s.add_argument("--model-name", help="model name to ask an http(s) MODEL for")
    s.set_defaults(func=_generate)
# ---- end generate ---------------------------------------------------------------------------------


# ---- serve (owner: server) ------------------------------------------------------------------------
def _serve(args) -> int:
    from openk2.server import serve
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key,
          served_model_name=args.served_model_name)
    return 0


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible API (chat completions with reasoning, tools, streaming)")
    s.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory (default: the shipped models/k2-nano)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's name)")
    s.set_defaults(func=_serve)
# ---- end serve ------------------------------------------------------------------------------------


# ---- quantize (owner: int4) ----------------------------------------------------------------------

def _quantize(args) -> int:
    from openk2.quant import quantize_checkpoint
    r = quantize_checkpoint(args.in_dir, args.out_dir, group_size=args.group_size, targets=args.targets)
    ratio = r["experts_bytes_int4"] / max(r["experts_bytes_bf16"], 1)
    print(f"wrote {args.out_dir}: {r['expert_layers']} expert layers INT4 "
          f"({r['experts_bytes_int4'] / 1e6:.2f} MB, {ratio:.3f}x their bf16 size)"
          + (f", {r['int4_linears']} other Linears INT4" if r["int4_linears"] else ""))
    return 0


def _add_quantize_parser(sub) -> None:
    s = sub.add_parser("quantize", help="INT4 (compressed-tensors pack-quantized, as K2 Thinking) of a checkpoint")
    s.add_argument("in_dir", metavar="IN_DIR", help="HF-format checkpoint directory")
    s.add_argument("out_dir", metavar="OUT_DIR", help="where to write the INT4 checkpoint")
    s.add_argument("--group-size", type=int, default=32, help="weights per bf16 scale (default 32, as K2)")
    s.add_argument("--targets", choices=["experts", "all"], default="experts",
                   help="experts: routed experts only (K2); all: every Linear except lm_head and the router")
    s.set_defaults(func=_quantize)

# ---- end quantize ---------------------------------------------------------------------------------


# ---- speedrun (owner: lead) -----------------------------------------------------------------------
def _speedrun(args) -> int:
    from openk2.speedrun import main
    return main(args.out, quick=args.quick, stages=args.stages, overrides=args.set)


def _add_speedrun_parser(sub) -> None:
    s = sub.add_parser("speedrun",
                       help="train k2-nano end to end: data, tokenizer, pretraining, SFT, QAT, INT4 export, RL, eval")
    s.add_argument("--out", default="runs/speedrun", help="run directory (stages resume from here)")
    s.add_argument("--quick", action="store_true", help="same path, tiny sizes: minutes, a weak model")
    s.add_argument("--stages", help="comma-separated subset of data,tokenizer,pretrain,select,sft,qat,export,rl,"
                                    "eval,compare,scaling,report")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="change one setting of the plan (openk2/speedrun.py: Plan), e.g. --set extra_tools=0.3; "
                        "repeatable; a resumed run must be given the same")
    s.set_defaults(func=_speedrun)
# ---- end speedrun ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openk2", description="openk2: the Kimi K2 Thinking system in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("info", help="layers, parameters (total/active), KV-cache and weight bytes of a model")
    s.add_argument("model", help="checkpoint directory or preset name")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_info)

    s = sub.add_parser("demo", help="the main job: the thinking agent on the shipped k2-nano (held-out gym questions)")
    s.set_defaults(func=_demo)

    _add_tokenizer_parser(sub)
    _add_gym_parser(sub)
    _add_eval_parser(sub)
    _add_agent_parsers(sub)
    _add_train_plot(sub)
    _add_generate_parser(sub)
    _add_serve_parser(sub)
    _add_quantize_parser(sub)
    _add_speedrun_parser(sub)
    _add_rl_parser(sub)
    return p


# ---- gym (owner: gym) -----------------------------------------------------------------------------
def _gym_sample(args) -> int:
    from openk2 import gym
    for i in range(args.n):
        task = gym.sample(args.family, args.seed, args.index + i, args.split, args.difficulty)
        messages = gym.gold(task)
        if args.json:
            print(json.dumps({"task": task.to_dict(), "gold": messages}, ensure_ascii=False))
            continue
        print(f"=== {task.meta['id']}  difficulty {task.difficulty}  answer {task.answer!r}")
        print(gym.format_conversation(messages))
        if args.check:
            problems = gym.replay(task, messages)
            reward = gym.verify(task, gym.final_content(messages))
            print(f"--- replay: {'ok' if not problems else '; '.join(problems)}; verify: {reward}")
            if problems or reward != 1.0:
                return 1
    return 0


def _gym_export(args) -> int:
    from openk2 import gym
    families = gym.parse_families(args.tasks)
    window = args.context_window or None
    n = gym.export(args.out, families, args.n * len(families), args.seed, args.split, args.difficulty,
                   context_window=window, max_step_tokens=args.max_step_tokens, extra_tools=args.extra_tools)
    seen = f"seen through a {window}-token agent window" if window else "rendered whole"
    print(f"wrote {n} conversations ({', '.join(families)}; {args.split} split, seed {args.seed}; {seen}) "
          f"to {args.out}")
    return 0


def _add_gym_parser(sub) -> None:
    s = sub.add_parser("gym", help="the gym's tasks: show samples with gold trajectories, export SFT data")
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("sample", help="print tasks and their gold trajectories (real tool outputs)")
    t.add_argument("family", help="arith | chain | search | code")
    t.add_argument("--n", type=int, default=3, help="how many tasks (default 3)")
    t.add_argument("--difficulty", type=int, help="default: the family's training mix")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--index", type=int, default=0, help="first task index (tasks are numbered per seed)")
    t.add_argument("--split", choices=("train", "eval"), default="train")
    t.add_argument("--json", action="store_true", help="one JSON object per task: the task and its gold messages")
    t.add_argument("--check", action="store_true", help="replay the tools and verify the gold answer")
    t.set_defaults(func=_gym_sample)
    t = actions.add_parser("export", help="write gold conversations as JSONL {messages, tools} for `openk2 train`")
    t.add_argument("--tasks", default="all", help="families, comma-separated (default all)")
    t.add_argument("--n", type=int, required=True, help="conversations per family")
    t.add_argument("--out", required=True, metavar="FILE.jsonl")
    t.add_argument("--difficulty", help="e.g. arith=1-8,chain=1-50 (default: each family's training mix)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--split", choices=("train", "eval"), default="train")
    t.add_argument("--context-window", type=int, default=4096, metavar="TOKENS",
                   help="the agent window the trainer renders each conversation under: longer ones become "
                        "the context manager's views (default 4096, gym.CONTEXT_WINDOW; 0: render whole)")
    t.add_argument("--max-step-tokens", type=int, default=1024, metavar="TOKENS",
                   help="the agent's per-step budget under that window (default 1024, gym.STEP_TOKENS)")
    t.add_argument("--extra-tools", type=float, default=0.0, metavar="SHARE",
                   help="share of conversations that also offer the agent's default tools (calculator, python), "
                        "so a model trained on them works with `openk2 agent`'s defaults (default 0)")
    t.set_defaults(func=_gym_export)
# ---- end gym --------------------------------------------------------------------------------------


# ---- eval (owner: gym) ----------------------------------------------------------------------------
def _eval(args) -> int:
    import os
    from openk2.eval import evaluate
    from openk2.report import format_table, plot_accuracy

    progress = None
    if sys.stderr.isatty():
        def progress(done, total):
            print(f"\r{done}/{total} tasks", end="\n" if done == total else "", file=sys.stderr, flush=True)
    result = evaluate(args.model, args.tasks, args.n, args.difficulty, args.seed, split=args.split,
                      temperature=args.temperature, top_p=args.top_p, max_steps=args.max_steps,
                      max_step_tokens=args.max_step_tokens, max_total_tokens=args.max_total_tokens,
                      wall_time=args.wall_time, context_window=args.context_window, heavy=args.heavy or 0,
                      workers=args.workers, hint=args.hint,
                      api_key=args.api_key or os.environ.get("OPENAI_API_KEY"), model_name=args.model_name,
                      progress=progress)
    print(format_table(result, markdown=args.markdown))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=1)
            f.write("\n")
    if args.plot:
        plot_accuracy([result], args.plot)
    return 0


def _add_eval_parser(sub) -> None:
    s = sub.add_parser("eval", help="run the agent on gym eval tasks: accuracy, steps, tool calls, tokens per "
                                    "family and difficulty")
    s.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory, http(s):// endpoint URL, policy:oracle or policy:random "
                        "(default: models/k2-nano)")
    s.add_argument("--tasks", default="all", help="families, comma-separated: arith,chain,search,code (default all)")
    s.add_argument("--n", type=int, default=100, help="tasks per family (default 100)")
    s.add_argument("--difficulty", default=None,
                   help="levels per family, e.g. arith=1-8,chain=1,10,100,300 (default: each family's levels)")
    s.add_argument("--seed", type=int, default=0, help="task sampling and run seeds (default 0)")
    s.add_argument("--split", choices=("eval", "train"), default="eval")
    s.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--max-steps", type=int, default=None, help="model calls per task (default 400)")
    s.add_argument("--max-step-tokens", type=int, default=None,
                   help="tokens per model call (default: 1024 for local models, 4096 for endpoints)")
    s.add_argument("--max-total-tokens", type=int, default=None, help="tokens generated per task")
    s.add_argument("--wall-time", type=float, default=None, metavar="SECONDS", help="time limit per task")
    s.add_argument("--context-window", type=int, default=None, metavar="TOKENS",
                   help="the agent's window (default: 4096 or the model's if smaller for local models; "
                        "endpoints: unmanaged)")
    s.add_argument("--heavy", type=int, default=None, metavar="K", help="K trajectories per task, then vote/reflect")
    s.add_argument("--workers", type=int, default=16, help="tasks run at once (default 16)")
    s.add_argument("--hint", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend the answer-format system message (default: only for endpoints)")
    s.add_argument("--api-key", default=None, help="endpoint API key (default: $OPENAI_API_KEY)")
    s.add_argument("--model-name", default=None, help="endpoint model name (default: the first it lists)")
    s.add_argument("--json", default=None, metavar="OUT.json", help="write the result (all tasks) here")
    s.add_argument("--plot", default=None, metavar="OUT.png", help="plot accuracy against difficulty")
    s.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    s.set_defaults(func=_eval)
# ---- end eval -------------------------------------------------------------------------------------


# ---- rl (owner: rl) -------------------------------------------------------------------------------
def _rl(args) -> int:
    import os
    from openk2.rl import options_from_args, rl
    summary = rl(options_from_args(args), critic_api_key=args.critic_api_key or os.environ.get("OPENAI_API_KEY"))
    if not args.quiet and os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return 0


def _add_rl_parser(sub) -> None:
    # Defaults are None: a new run takes openk2.rl.DEFAULTS, a --resume the run's own values.
    s = sub.add_parser("rl", help="RL with verifiable rewards on the gym (Kimi K1.5/K2 objective; torchrun-ready)",
                       description="Reinforcement learning of a checkpoint on the gym's RL split: K agent "
                                   "trajectories per prompt on the engine, verifier (or critic) rewards, the "
                                   "K1.5 objective, PTX, token budgets, temperature decay, MuonClip. Under "
                                   "torchrun: torchrun --nproc-per-node N -m openk2.rl ARGS")
    s.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint to start from (INT4 or float), e.g. models/k2-nano (not needed with --resume)")
    s.add_argument("--out", required=True, metavar="DIR", help="run directory: metrics.jsonl, checkpoints/, rl.png")
    s.add_argument("--tokenizer", metavar="DIR", help="tokenizer.json directory (default: the checkpoint's)")
    t = s.add_argument_group("tasks and rewards")
    t.add_argument("--tasks", help="gym families to train on (default arith,chain; brief needs --critic)")
    t.add_argument("--difficulty", help="levels per family, each prompt's drawn from the list as written "
                   "(repeat one to weight it), e.g. arith=3-5,chain=10-20 or code=1,2,2,3")
    t.add_argument("--budget", help="generated-token budget per trajectory: FAMILY=N[,...] or N for all; "
                                    "runs cut by it are penalised")
    t.add_argument("--truncation-penalty", type=float, help="subtracted from the reward of a run a budget "
                                                            "stopped (default 0.5)")
    t.add_argument("--critic", help="for rubric families: 'self' (the policy judges) or an http(s):// endpoint")
    t.add_argument("--critic-model-name", help="the endpoint critic's model name (default: the first it lists)")
    t.add_argument("--critic-api-key", help="the endpoint critic's key (default: $OPENAI_API_KEY; never saved)")
    r = s.add_argument_group("rollouts")
    r.add_argument("--prompts", type=int, help="prompts per step (default 8)")
    r.add_argument("--samples", type=int, help="trajectories per prompt, K (default 4)")
    r.add_argument("--temperature", type=float, help="rollout temperature at the first step (default 1.0)")
    r.add_argument("--temperature-end", type=float, help="... at the last step (default 0.6)")
    r.add_argument("--temperature-schedule", choices=("constant", "linear", "cosine", "exp"),
                   help="how it decays (default linear)")
    r.add_argument("--top-p", type=float, help="default 1.0")
    r.add_argument("--max-steps", type=int, help="agent model calls per trajectory (default 100)")
    r.add_argument("--context-window", type=int, metavar="TOKENS",
                   help="the agent's window (default: the gym's 4096, or the model's if smaller)")
    o = s.add_argument_group("objective and optimizer")
    o.add_argument("--steps", type=int, help="RL steps (default 50)")
    o.add_argument("--kl-tau", type=float, help="tau of the K1.5 objective's log-ratio term (default 0.1; "
                                                "not QK-Clip's --qk-clip-tau)")
    o.add_argument("--updates", type=int, help="optimizer steps per batch of rollouts (default 1)")
    o.add_argument("--ptx-weight", type=float, help="weight of the PTX loss on gold trajectories (default 0.1; 0 off)")
    o.add_argument("--ptx-batch", type=int, help="gold conversations per step (default 4)")
    o.add_argument("--ptx-tasks", help="families of the PTX gold data (default all)")
    o.add_argument("--ptx-difficulty", help="their levels, as --difficulty (default: the SFT data's mix), "
                                            "e.g. code=2 to hold a level the rollouts pull away from")
    o.add_argument("--optimizer", choices=("muonclip", "muon", "adamw"), help="default muonclip")
    o.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    o.add_argument("--muon-lr", type=float, help="Muon's learning rate (default: --lr)")
    o.add_argument("--weight-decay", type=float, help="default 0")
    o.add_argument("--warmup", type=int, help="linear warmup steps (default 0)")
    o.add_argument("--qk-clip-tau", type=float, help="QK-Clip threshold on attention logits (default 100)")
    o.add_argument("--router-bias-rate", type=float, help="router correction-bias step (default 1e-3)")
    o.add_argument("--grad-clip", type=float, help="gradient-norm clip, 0 = off (default 1.0)")
    o.add_argument("--qat", choices=("auto", "none", "experts", "all"),
                   help="INT4 fake-quant of the trained policy (default auto: experts for an INT4 checkpoint)")
    o.add_argument("--micro-tokens", type=int, help="padded tokens per forward (default 16384)")
    o.add_argument("--seed", type=int, help="default 0")
    u = s.add_argument_group("run")
    u.add_argument("--drift-every", type=int, help="measure the KL to the start policy every N steps "
                                                   "(default 1; 0 off)")
    u.add_argument("--save-every", type=int, help="checkpoint every N steps, and at the end (default 10)")
    u.add_argument("--keep", type=int, help="checkpoints kept (default 2)")
    u.add_argument("--export", metavar="DIR", help="at the end, write the policy as the engine runs it "
                                                   "(INT4 with its tokenizer) to DIR")
    u.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    u.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    u.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=_rl)
# ---- end rl ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # our errors name the file/field; no traceback
        print(f"openk2 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
