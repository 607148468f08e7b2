"""Where a batch's speculative step goes, in process: forward, drafting/verification, other Python.

Plain decoding of N HumanEval prompts teaches the engine its latency surface; then the planner runs
with that surface pinned (no governor, so every step speculates as the cost model says) and each
pure decode step is printed: rows, step and forward milliseconds, the speculator's own drafting,
planning and verification time, the rest, and what the probed surface predicted.

    python -m benchmarks.step_costs --batch 16
"""

from __future__ import annotations

import argparse
import statistics
import time

from tgi_space.bench import humaneval_prompts
from tgi_space.config import SpacePolicy
from tgi_space.engine import Engine
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.speculation import Speculator


def record_steps(log: list) -> None:
    """Wrap Engine.execute / _forward and Speculator.end_step to log (seqs, rows, uncached, s, fwd s, tokens, busy s)."""
    execute, forward, end_step = Engine.execute, Engine._forward, Speculator.end_step
    last = {"forward": 0.0, "busy": 0.0}

    def timed_forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = forward(self, *args, **kwargs)
        last["forward"] = time.perf_counter() - t0
        return out

    def busy_end_step(self, *args, **kwargs):
        last["busy"] = self._busy
        return end_step(self, *args, **kwargs)

    def timed_execute(self, planned, slots, keep_hidden=False):
        t0, last["busy"] = time.perf_counter(), 0.0
        results = execute(self, planned, slots, keep_hidden)
        plans = [p for _, p in planned]
        log.append((len(plans), sum(p.num_rows for p in plans), sum(p.num_uncached for p in plans),
                    time.perf_counter() - t0, last["forward"], sum(len(e) for _, e in results), last["busy"]))
        return results

    Engine.execute, Engine._forward, Speculator.end_step = timed_execute, timed_forward, busy_end_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-space-py")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    log: list = []
    record_steps(log)
    prompts = humaneval_prompts(args.batch)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    llm = LLM(args.model)
    llm.generate(prompts, params, speculate="none")
    surface = llm.engine.speculator.latency()
    curve = surface.curves[max(b for b in surface.curves if b <= args.batch)]
    spec = llm.engine.speculator
    spec.policy, spec.adaptive = SpacePolicy(latency_curve=dict(zip(curve.rows, curve.seconds))), False
    spec.plain_factor = {b: 1.0 for b in spec.plain_factor}
    spec.marginal_factor = {b: 1.0 for b in spec.marginal_factor}
    for mode in ("none", "space", "space"):  # the first speculative pass builds what a server would have built
        log.clear()
        llm.generate(prompts, params, speculate=mode)
        decode = [x for x in log if x[2] == x[0] == args.batch]
        if mode == "none":
            print(f"plain: {len(decode)} decode steps, median step {1e3 * statistics.median(x[3] for x in decode):.2f} ms, "
                  f"forward {1e3 * statistics.median(x[4] for x in decode):.2f} ms")
    print("rows  step ms  forward  drafting+verify  other  | surface(rows) tokens")
    for seqs, rows, _, step, fwd, tokens, busy in decode:
        print(f"{rows:4d}  {1e3 * step:7.2f}  {1e3 * fwd:7.2f}  {1e3 * busy:15.2f}  {1e3 * (step - fwd - busy):5.2f}  |"
              f" {1e3 * surface(rows, seqs):13.2f} {tokens:6d}")


if __name__ == "__main__":
    main()
