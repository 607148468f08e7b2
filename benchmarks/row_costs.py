"""What extra query rows cost a batch's forward, in process: t(rows per sequence, batch) / t(1, batch).

The engine's own latency probe (`Engine._measure_rows`: a planned step's layout over `_probe_context`
cached tokens per sequence) is repeated and its medians printed, per batch size and rows per sequence;
here every sequence sends the same rows (the engine's probe concentrates extra rows on a few).
This is the ceiling speculation works under: a step that sends r rows per sequence must emit more
than t(r, b) / t(1, b) tokens per sequence to beat plain decoding, before any cost outside the forward.

    python -m benchmarks.row_costs --batches 16,32 --rows 1,2,3,5,8
"""

from __future__ import annotations

import argparse
import json
import statistics

from tgi_space import engine as engine_module
from tgi_space.llm import LLM


def even_rows(num_seqs: int, rows: int) -> list[int]:
    """The same rows for every sequence (a probe layout in place of `probe_row_counts`)."""
    return [rows // num_seqs] * num_seqs


def surface(llm: LLM, batches: list[int], rows: list[int], repeats: int) -> dict[int, dict[int, float]]:
    """{batch: {rows per sequence: median milliseconds of one forward}}; the (batch, rows) points are
    interleaved within each repetition, so a slow moment of the machine does not fall on one point."""
    engine_module.probe_row_counts = even_rows
    samples: dict[tuple[int, int], list[float]] = {(b, r): [] for b in batches for r in rows}
    for _ in range(repeats):
        for b, r in samples:
            samples[b, r].append(llm.engine._measure_rows(b, b * r) * 1e3)
    return {b: {r: statistics.median(samples[b, r]) for r in rows} for b in batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-space-py")
    parser.add_argument("--batches", default="16,32", help="comma-separated batch sizes")
    parser.add_argument("--rows", default="1,2,3,5,8", help="comma-separated query rows per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file for the table (optional)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    llm = LLM(args.model)
    table = surface(llm, batches, rows, args.repeats)
    context = llm.engine._probe_context
    print(f"dtype {llm.engine.dtype}, {context} cached tokens per sequence, median of {args.repeats}")
    for b, by_rows in table.items():
        cells = "  ".join(f"{r} rows {ms:.2f} ms ({ms / by_rows[rows[0]]:.2f}x)" for r, ms in by_rows.items())
        print(f"batch {b:3d}: {cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "dtype": str(llm.engine.dtype), "cached_tokens": context,
                       "repeats": args.repeats, "ms": table}, f, indent=2)


if __name__ == "__main__":
    main()
