#!/usr/bin/env bash
# Set up (first run only) and run dllmq's main job on the default model, the shipped dllmq-tiny:
# describe it, generate with LLaDA's diffusion sampler, measure perplexity, run the mini benchmark.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
DLLMQ=.venv/bin/dllmq
MODEL=${1:-dllmq-tiny}
$DLLMQ inspect "$MODEL"
# The demo question is a held-out benchmark item (mini_math/1, never in training): dllmq-tiny answers "77".
# It gets 68.5 % of the held-out sums and word problems right (docs/embedded-models.md, "Math"), so other
# questions may come out wrong; another MODEL may answer differently.
echo "generate with $MODEL: Question: What is 45 + 32? Answer:"
$DLLMQ generate "$MODEL" --prompt "Question: What is 45 + 32? Answer:" --gen-length 8 --block-length 4
$DLLMQ ppl "$MODEL" --data wiki --seqlen 256 --mc-num 4 --max-windows 4
$DLLMQ eval "$MODEL" --tasks mini --limit 50
