"""Plain decoding throughput of this tree against an older commit of the engine, in one run.

    python -m benchmarks.engine_vs_old --old 8786040 --batch 64 --repeats 3

The old commit is checked out into a temporary git worktree under build/; each
repetition runs both engines one after the other in fresh processes (same prompts,
same settings: HumanEval prompts, greedy, `speculate="none"`, EOS ignored), and the
medians are compared. Each tree is run in the dtype it is asked for (--dtype).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from tgi_space.llm import LLM
from tgi_space.config import SpacePolicy
from tgi_space.sampling import SamplingParams
from tgi_space.bench import humaneval_prompts
torch.set_num_threads(int(sys.argv[5]))
llm = LLM(sys.argv[2], dtype=sys.argv[3], max_num_seqs=int(sys.argv[4]), space=SpacePolicy(k_max=0))
prompts = humaneval_prompts(int(sys.argv[4]))
params = SamplingParams(max_new_tokens=int(sys.argv[6]), ignore_eos=True)
llm.generate(prompts[:2], SamplingParams(max_new_tokens=8, ignore_eos=True), speculate="none")
t0 = time.perf_counter()
outs = llm.generate(prompts, params, speculate="none")
seconds = time.perf_counter() - t0
print(json.dumps({"tokens_per_s": sum(len(o.token_ids) for o in outs) / seconds, "outputs": [o.token_ids for o in outs]}))
"""


def worktree(ref: str) -> Path:
    """A worktree of `ref` under build/ (created once)."""
    path = ROOT / "build" / f"old-engine-{ref}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True)
    return path


def run(tree: Path, args) -> dict:
    cmd = [sys.executable, "-c", CHILD, str(tree), str(ROOT / args.model), args.dtype, str(args.batch),
           str(args.threads), str(args.max_new_tokens)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="git ref of the old engine")
    parser.add_argument("--model", default="models/tiny-space-py")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    trees = {"new": ROOT, "old": worktree(args.old)}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    outputs = {}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            result = run(tree, args)
            rates[name].append(result["tokens_per_s"])
            outputs[name] = result["outputs"]
    medians = {name: statistics.median(r) for name, r in rates.items()}
    same = sum(a == b for a, b in zip(outputs["new"], outputs["old"]))
    print(json.dumps({"batch": args.batch, "dtype": args.dtype, "old": args.old, "tokens_per_s": medians,
                      "all": rates, "ratio_new_over_old": medians["new"] / medians["old"],
                      "identical_outputs": f"{same}/{args.batch}"}, indent=2))


if __name__ == "__main__":
    main()
