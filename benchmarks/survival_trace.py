"""How often the planner's sent nodes are really reached, against their drafted survival scores.

Greedy batch-1 generation on HumanEval prompts with the planned step (default drafters); every
verified tree's sent nodes are recorded with their score, depth, drafter and whether verification
accepted them. Prints reach by score bucket and by (drafter, depth), after a warm-up quarter, and the
planner's predicted against realised tokens per step (docs/speculation.md, "survival calibration").

    .venv/bin/python benchmarks/survival_trace.py --model models/tiny-space-py --num-prompts 12 [--survival]
"""

from __future__ import annotations

import argparse
import collections
import json

from tgi_space.bench import humaneval_prompts
from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.speculation import Speculator


def traced(llm: LLM) -> list[tuple[float, bool, int, str]]:
    """Record (score, accepted, depth, drafter) of every node this engine's speculator verifies."""
    records: list[tuple[float, bool, int, str]] = []
    speculator = llm.engine.speculator
    verify = Speculator.verify.__get__(speculator)

    def recording(seq, plan, logits, stats):
        out = verify(seq, plan, logits, stats)
        tree, path = plan.tree, set(out[0])
        records.extend((tree.scores[i], i in path, tree.depth(i), tree.sources[i]) for i in range(len(tree)))
        return out

    speculator.verify = recording
    return records


def table(records, key) -> dict[str, dict]:
    """{key: {nodes, mean score, reached}} over the records."""
    groups = collections.defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return {str(k): {"nodes": len(rs), "score": sum(r[0] for r in rs) / len(rs), "reached": sum(r[1] for r in rs) / len(rs)}
            for k, rs in sorted(groups.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/tiny-space-py")
    p.add_argument("--num-prompts", type=int, default=12)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--survival", action="store_true", help="SpacePolicy(survival_calibration=True)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    llm = LLM(args.model, space=SpacePolicy(survival_calibration=args.survival), prefix_caching=False)
    records = traced(llm)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    for prompt in humaneval_prompts(args.num_prompts):
        llm.generate([prompt], params, speculate="space")
    kept = records[len(records) // 4:]  # after the calibrations' first quarter
    speculator = llm.engine.speculator
    info, stats = speculator.info(), speculator.stats
    report = {
        "by_score": table(kept, lambda r: round(min(0.9, int(r[0] * 10) / 10), 1)),
        "by_drafter_depth": table(kept, lambda r: (r[3], min(r[2], 8))),
        "predicted_tokens_per_step": info["predicted_tokens_per_step"],
        "realised_tokens_per_step": stats.realised_tokens / max(1, stats.steps),
        "rows_per_step": info["rows_per_step"],
    }
    for name in ("by_score", "by_drafter_depth"):
        for k, v in report[name].items():
            print(f"{name} {k}: {v['nodes']} nodes, score {v['score']:.3f}, reached {v['reached']:.3f}")
    print(json.dumps({k: report[k] for k in ("predicted_tokens_per_step", "realised_tokens_per_step", "rows_per_step")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
