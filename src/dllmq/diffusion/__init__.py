"""How a masked diffusion model is used: Monte Carlo likelihood, generation, perplexity.

Every function takes a model following the dllmq model contract (`model(ids, attention_mask,
position_ids) -> logits`, `.family`, `.config`) and works on LLaDA, Dream and causal models.
"""
from dllmq.diffusion.causal_sampler import causal_generate
from dllmq.diffusion.dream_sampler import ALGORITHMS as DREAM_ALGORITHMS
from dllmq.diffusion.dream_sampler import dream_generate
from dllmq.diffusion.generate import default_sampler, generate, generate_text
from dllmq.diffusion.likelihood import (
    bernoulli_mc_loglikelihood,
    causal_loglikelihood,
    dream_ar_loglikelihood,
    greedy_matches,
    loglikelihood,
    loglikelihood_many,
    mc_loglikelihood,
    mc_loglikelihood_many,
)
from dllmq.diffusion.llada_sampler import REMASKING, linear_schedule, llada_generate
from dllmq.diffusion.logits import mask_predictor_logits
from dllmq.diffusion.perplexity import (
    PerplexityResult,
    causal_perplexity,
    diffusion_perplexity,
    perplexity,
)
from dllmq.diffusion.text import (
    decode_generation,
    encode_prompts,
    format_prompt,
    stop_token_ids,
)

__all__ = [
    "DREAM_ALGORITHMS",
    "REMASKING",
    "PerplexityResult",
    "causal_generate",
    "bernoulli_mc_loglikelihood",
    "causal_loglikelihood",
    "dream_ar_loglikelihood",
    "causal_perplexity",
    "decode_generation",
    "default_sampler",
    "diffusion_perplexity",
    "dream_generate",
    "encode_prompts",
    "format_prompt",
    "generate",
    "generate_text",
    "greedy_matches",
    "linear_schedule",
    "llada_generate",
    "loglikelihood",
    "loglikelihood_many",
    "mask_predictor_logits",
    "mc_loglikelihood",
    "mc_loglikelihood_many",
    "perplexity",
    "stop_token_ids",
]
