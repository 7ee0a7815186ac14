#!/usr/bin/env bash
# Set up (first run only) and run dllmq's main job on the built-in default model: describe it,
# generate with LLaDA's diffusion sampler, and measure perplexity.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
DLLMQ=.venv/bin/dllmq
MODEL=${1:-random-llada}
$DLLMQ inspect "$MODEL"
$DLLMQ generate "$MODEL" --prompt "Question: What is 17 + 25? Answer:" --gen-length 64 --steps 64 --block-length 32
$DLLMQ ppl "$MODEL" --data README.md --seqlen 256 --mc-num 4 --max-windows 4
