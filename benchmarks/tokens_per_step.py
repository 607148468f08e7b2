"""Tokens per step of the paper's fixed SPACE layout (masks only), greedy, batch 1, on HumanEval prompts.

A count, not a timing: it does not depend on what else runs on the machine. Used to compare drafters
(issue 12's target is >= 2.5 at k = 4):

    .venv/bin/python benchmarks/tokens_per_step.py models/tiny-space-py [other model dirs] --k 4
"""

from __future__ import annotations

import argparse
import json

from tgi_space.bench import humaneval_prompts
from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams


def tokens_per_step(model: str, k: int, prompts: list[str], max_new_tokens: int) -> dict:
    """Emitted tokens / forward steps over all prompts, plus acceptance by candidate position."""
    # All prompts run in one batch: the row budget is lifted so every sequence gets k candidates, as
    # at batch 1 (the fixed layout's choices for one sequence do not depend on the others).
    llm = LLM(model, space=SpacePolicy(k_max=k, planner=False, max_step_query_tokens=1 << 20))
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    outs = llm.generate(prompts, [params] * len(prompts), speculate="space")
    tokens = sum(len(o.token_ids) for o in outs)
    steps = sum(o.stats.num_steps for o in outs)
    drafted = [sum(x) for x in zip(*(o.stats.drafted_by_position for o in outs))]
    accepted = [sum(x) for x in zip(*(o.stats.accepted_by_position for o in outs))]
    return {
        "model": model, "k": k, "prompts": len(prompts), "tokens": tokens, "steps": steps,
        "tokens_per_step": round(tokens / steps, 3),
        "acceptance_by_position": [round(a / d, 3) if d else 0.0 for a, d in zip(accepted, drafted)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--num-prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    prompts = humaneval_prompts(args.num_prompts)
    for model in args.models:
        print(json.dumps(tokens_per_step(model, args.k, prompts, args.max_new_tokens)), flush=True)


if __name__ == "__main__":
    main()
