#!/usr/bin/env bash
# The k2-nano speedrun on a lent GPU machine, in two halves (docs/results.md, "the sixth run"):
#
#   scripts/gpu_speedrun.sh prepare [--quick] [--set NAME=VALUE ...]   # here, on the CPU machine
#   scripts/gpu_speedrun.sh train                            # there, through the device tool:
#       run(command="scripts/gpu_speedrun.sh train", carry=[".gpu"], timeout_s=600)
#
# Why two halves: the data stage needs the python sandbox (bubblewrap), which the device machine
# lacks, and rendering the data into agent views costs minutes of CPU that device time should not
# pay. `prepare` runs the data and tokenizer stages into .gpu/run, renders the training file once
# into openk2's render cache, and packs both small enough to carry (the JSONL gzip'd, the cache
# with uint16 ids, ~7 MB together; .gpu/ is in .gitignore). `train` unpacks them and runs the
# remaining training stages with the same `openk2 speedrun` (CUDA and bf16 autocast are picked by
# `openk2 train` itself), then the eval, and copies the model and the run's records to $OUT.
# A stage cut by the 10-minute command limit resumes on the next `train` call only while the
# machine stays warm (a fresh machine starts from the carried folder again).
# The device machine has no bubblewrap either, so the RL stage (code tasks run the python tool)
# cannot run there (`openk2 rl` refuses it with that reason): `prepare` sets rl_steps=0, and the GPU
# half yields the SFT+QAT model; run the full plan's RL stage on it back here (`openk2 rl MODEL
# ...` with the settings of FULL's rl_* fields in openk2/speedrun.py).
# The FULL plan pretrains two draws side by side (the select stage keeps one): on a device they share
# the one GPU, each its own process (not tried on a device yet; `prepare --set draws=1` for one).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}; shift || true
run=.gpu/run

case "$mode" in
prepare)
    rm -rf .gpu && mkdir -p .gpu/cache
    set_args=(--set rl_steps=0 "$@")
    OPENK2_CACHE=$PWD/.gpu/cache .venv/bin/openk2 speedrun --out "$run" --stages data,tokenizer "${set_args[@]}"
    printf '%s\n' "${set_args[@]}" > .gpu/set_args
    OPENK2_CACHE=$PWD/.gpu/cache .venv/bin/python - "$run" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from openk2.data import rendered_file
from openk2.tokenizer import load_tokenizer
run = Path(sys.argv[1])
rendered_file(run / "data" / "train.jsonl", load_tokenizer(run / "tokenizer"))
for f in (Path(".gpu/cache") / "render").glob("*.npz"):       # ids < 65536: a 512-id vocabulary
    z = np.load(f)
    assert int(z["ids"].max()) < 1 << 16
    np.savez_compressed(f, ids=z["ids"].astype(np.uint16), mask=z["mask"], offsets=z["offsets"])
EOF
    rm -f "$run"/data/{arith,chain,search,code}.jsonl "$run"/data/corpus.txt
    gzip -9 "$run/data/train.jsonl"
    du -sh .gpu
    ;;
train)
    [ -f "$run/data/train.jsonl.gz" ] && gunzip "$run/data/train.jsonl.gz"
    mapfile -t set_args < <(grep . .gpu/set_args || true)
    export PYTHONPATH=$PWD OPENK2_CACHE=$PWD/.gpu/cache
    nvidia-smi -L || true
    python3 -m openk2.cli speedrun --out "$run" --stages pretrain,select,sft,qat,export,rl,eval "${set_args[@]}"
    out=${OUT:-.gpu/out}; mkdir -p "$out"
    cp "$run"/k2-nano/model.safetensors "$run"/eval.json "$run"/timings.json "$run"/speedrun.log "$out"/ 2>/dev/null || true
    ;;
*)
    echo "usage: scripts/gpu_speedrun.sh prepare [--quick] [--set NAME=VALUE ...] | train" >&2
    exit 2
    ;;
esac
