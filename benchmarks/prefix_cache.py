"""Prefix caching in the engine's own scheduler (what `tgi-space serve` runs): throughput with and without it.

Every request is a fixed preamble (the Zen of Python as comments, as a served system prompt would be; never
HumanEval text) followed by one HumanEval prompt, greedy, EOS ignored. c clients in a closed loop: each sends its
next request once its previous one has ended; each run starts with an empty prefix cache (the same prompts come
again in every repetition). With --turns t, each request is a chat of t turns, each next prompt the last one,
its answer and a fixed follow-up line. Two engines, prefix caching on and off, alternate per repetition;
reported: tokens/s of each repetition, the paired ratio (on / off, same repetition) and its median, prompt
tokens read from the cache, and whether both served the same tokens.

    python -m benchmarks.prefix_cache --model models/tiny-space-py --concurrency 1,8,32 --requests 64 --repeats 3
    python -m benchmarks.prefix_cache --model models/tiny-space-py --concurrency 1,8 --requests 32 --turns 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.shard_bench import shared_preamble
from tgi_space.bench import humaneval_prompts
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams


def serve(llm: LLM, prompts: list[list[int]], clients: int, max_new_tokens: int) -> tuple[float, list[list[int]]]:
    """Seconds to serve every prompt with `clients` in flight at most; the outputs in prompt order."""
    engine, params = llm.engine, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    pending, live, seqs = list(range(len(prompts))), [], {}
    start = time.perf_counter()
    while pending or live:
        while pending and len(live) < clients:
            i = pending.pop(0)
            seqs[i] = engine.add_request(prompts[i], params, "none")
            live.append(seqs[i])
        engine.step()
        live = [s for s in live if not s.is_finished]
    return time.perf_counter() - start, [seqs[i].output_ids for i in range(len(prompts))]


def conversation(llm: LLM, prompts: list[list[int]], clients: int, max_new_tokens: int, turns: int,
                 follow_up: list[int]) -> tuple[float, list[list[int]], int]:
    """`turns` rounds over every prompt: each next prompt is the last one, its answer and `follow_up` (a chat's
    next turn). Seconds, every answer, and the prompt tokens of every turn."""
    seconds, answers, prompt_tokens = 0.0, [], 0
    for _ in range(turns):
        took, outs = serve(llm, prompts, clients, max_new_tokens)
        seconds, answers, prompt_tokens = seconds + took, answers + outs, prompt_tokens + sum(map(len, prompts))
        prompts = [p + out + follow_up for p, out in zip(prompts, outs)]
    return seconds, answers, prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-space-py")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=1, help="a chat's turns: each next prompt repeats the last and its answer")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    engines = {mode: LLM(args.model, prefix_caching=mode == "on") for mode in ("on", "off")}
    tok = engines["on"].tokenizer
    preamble = shared_preamble()
    prompts = [tok.encode(preamble + p) for p in humaneval_prompts(args.requests)]
    follow_up = tok.encode("\n# Now the same, with type hints:\n")
    report = {"model": args.model, "requests": args.requests, "max_new_tokens": args.max_new_tokens, "turns": args.turns,
              "preamble_tokens": len(tok.encode(preamble)), "by_concurrency": {}}
    for llm in engines.values():  # warm-up, untimed
        serve(llm, prompts[:4], 4, 4)
    for c in [int(x) for x in args.concurrency.split(",")]:
        rates, ratios, outputs, hits = {"on": [], "off": []}, [], {}, 0
        for rep in range(args.repeats):
            order = ("on", "off") if rep % 2 == 0 else ("off", "on")
            for mode in order:
                bm = engines[mode].engine.block_manager
                bm.clear_prefix_cache()
                served = bm.cached_tokens_served
                seconds, outputs[mode], prompt_tokens = conversation(engines[mode], prompts, c, args.max_new_tokens,
                                                                     args.turns, follow_up)
                rates[mode].append(args.turns * args.requests * args.max_new_tokens / seconds)
                hits = bm.cached_tokens_served - served if mode == "on" else hits
            ratios.append(rates["on"][-1] / rates["off"][-1])
        row = {"tokens_per_s": rates, "ratio_paired": ratios, "ratio_median": statistics.median(ratios),
               "cached_prompt_tokens_last_run": hits, "prompt_tokens": prompt_tokens,
               "identical": outputs["on"] == outputs["off"]}
        report["by_concurrency"][str(c)] = row
        print(f"c={c}: on {statistics.median(rates['on']):.0f} tok/s, off {statistics.median(rates['off']):.0f}, "
              f"paired {' '.join(f'{r:.2f}' for r in ratios)} -> {row['ratio_median']:.2f}x, "
              f"cached {hits}/{row['prompt_tokens']} prompt tokens, identical {row['identical']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
