#!/usr/bin/env bash
# Set up (first run only) and run dllmq's main job on the default model, the shipped dllmq-tiny:
# describe it, generate with LLaDA's diffusion sampler, measure perplexity, run the mini benchmark.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
DLLMQ=.venv/bin/dllmq
MODEL=${1:-dllmq-tiny}
$DLLMQ inspect "$MODEL"
# The demo question is one the default dllmq-tiny answers ("35"); it is weak at arithmetic (mini_math 2.8 %),
# so most sums, e.g. 17 + 25, come out wrong. Another MODEL may answer differently.
echo "generate with $MODEL: Question: What is 30 + 5? Answer:"
$DLLMQ generate "$MODEL" --prompt "Question: What is 30 + 5? Answer:" --gen-length 8 --block-length 4
$DLLMQ ppl "$MODEL" --data wiki --seqlen 256 --mc-num 4 --max-windows 4
$DLLMQ eval "$MODEL" --tasks mini --limit 50
