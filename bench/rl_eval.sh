#!/usr/bin/env bash
# The RL verdict's held-out evals (issue 13), fixed before a run is judged: every level of the trained
# families with n >= 30 where RL has moved it before (code 2, arith 1-2), the full eval for the rest.
# Greedy, the gym's agent settings. Compare two models with
#     python bench/rl_compare.py OUT_BEFORE/ OUT_AFTER/
# Usage: bench/rl_eval.sh MODEL OUT   (about 8 minutes for the shipped model on 2 CPU cores)
set -euo pipefail
model=$1 out=$2
mkdir -p "$out"
common=(--temperature 0 --max-total-tokens 3072 --max-step-tokens 1024)
ev() { local name=$1; shift; [ -s "$out/$name.json" ] || openk2 eval "$model" "$@" "${common[@]}" --json "$out/$name.json" > "$out/$name.log" 2>&1; }
ev full --n 30 --difficulty arith=1-8,chain=1,10,50,search=1-4,code=1-3 --seed 1
ev a2c1 --tasks arith,code --n 50 --difficulty arith=2,code=1 --seed 1
ev a1s1 --tasks arith,search --n 50 --difficulty arith=1,search=1 --seed 3
ev c23 --tasks code --n 30 --difficulty code=2,3 --seed 4
ev a1c2 --tasks arith,code --n 50 --difficulty arith=1,code=2 --seed 11
# added for the eleventh run's verdict (before its second seed was evaluated): arith 2 and every code
# level at a fresh seed, so the levels RL now trains reach n >= 80
ev a2c13 --tasks arith,code --n 60 --difficulty arith=2,code=1-3 --seed 21
