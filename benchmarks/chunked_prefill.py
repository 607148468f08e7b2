"""Chunked prefill in the engine's own scheduler: what a long prompt arriving costs the requests already running.

c requests decode (HumanEval prompts, greedy, plain decoding); then long prompts (the Zen of Python as comments,
repeated to --long-tokens, never HumanEval text) arrive one by one. Per setting of max_num_batched_tokens
(the `--max-batch-prefill-tokens` of `tgi-space serve`): the running requests' longest and median gap between
tokens while the long prompts are computed, the long prompts' time to first token, and whole-run tokens/s; the
outputs of every setting must be equal (they are compared).

    python -m benchmarks.chunked_prefill --model models/tiny-space-py --budgets 4096,256,64
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


def run(llm: LLM, short: list[list[int]], long: list[list[int]], new_tokens: int) -> dict:
    """Decode the short prompts; add a long one every 16 steps; time every step."""
    engine = llm.engine
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    running = [engine.add_request(p, params, "none") for p in short]
    engine.step()  # their prefill
    pending, late, gaps, ttft, arrived = list(long), [], [], [], {}
    start, step = time.perf_counter(), 0
    while engine.has_unfinished():
        if pending and step % 16 == 0:
            seq = engine.add_request(pending.pop(0), SamplingParams(max_new_tokens=4, ignore_eos=True), "none")
            late.append(seq)
            arrived[seq.seq_id] = time.perf_counter()
        t = time.perf_counter()
        results = engine.step()
        seconds = time.perf_counter() - t
        step += 1
        if any(s in running and emitted for s, emitted in results) and any(not s.is_finished for s in late):
            gaps.append(seconds)  # a step of the running requests while a long prompt was being computed
        for seq, emitted in results:
            if seq in late and emitted and seq.seq_id in arrived:
                ttft.append(time.perf_counter() - arrived.pop(seq.seq_id))
    seconds = time.perf_counter() - start
    tokens = sum(len(s.output_ids) for s in running + late)
    return {"max_gap_ms": 1000 * max(gaps), "median_gap_ms": 1000 * statistics.median(gaps),
            "median_ttft_ms": 1000 * statistics.median(ttft), "tokens_per_s": tokens / seconds,
            "outputs": [s.output_ids for s in running + late]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-space-py")
    parser.add_argument("--budgets", default="4096,256,64")
    parser.add_argument("--running", type=int, default=8)
    parser.add_argument("--long-prompts", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=800)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    llms = {b: LLM(args.model, max_num_batched_tokens=b, prefix_caching=False) for b in budgets}
    tok = llms[budgets[0]].tokenizer
    short = [tok.encode(p) for p in humaneval_prompts(args.running)]
    text = tok.encode(shared_preamble())
    long = [(text * (args.long_tokens // len(text) + 1))[i : i + args.long_tokens] for i in range(args.long_prompts)]
    for llm in llms.values():  # warm-up
        run(llm, short[:2], long[:1], 8)
    rows: dict[int, list[dict]] = {b: [] for b in budgets}
    for rep in range(args.repeats):
        for b in budgets if rep % 2 == 0 else budgets[::-1]:
            rows[b].append(run(llms[b], short, long, args.new_tokens))
    report = {"model": args.model, "running": args.running, "long_prompts": args.long_prompts,
              "long_tokens": args.long_tokens, "new_tokens": args.new_tokens, "by_budget": {}}
    reference = rows[budgets[0]][0]["outputs"]
    for b in budgets:
        med = {k: statistics.median(r[k] for r in rows[b]) for k in rows[b][0] if k != "outputs"}
        med["identical"] = all(r["outputs"] == reference for r in rows[b])
        report["by_budget"][str(b)] = med
        print(f"budget {b}: running requests' longest gap {med['max_gap_ms']:.0f} ms (median {med['median_gap_ms']:.1f}), "
              f"long prompts' first token {med['median_ttft_ms']:.0f} ms, {med['tokens_per_s']:.0f} tok/s, "
              f"identical {med['identical']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
