"""Self-distillation data: the model's own greedy continuations of corpus prompts (`tgi-space distill`).

SPACE verifies drafts against the model's own greedy choices, so masks trained on what the model
itself generates learn exactly the targets they are judged by. Prompts are windows cut at random
from the data files; continuations come from this project's engine, batched. Each JSONL line is
`{"prompt_ids": [...], "response_ids": [...]}`: token ids, because decoding and re-encoding text
does not always give back the same ids. `tgi-space train --data` reads these files directly.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import List

import typer

log = logging.getLogger(__name__)


def sample_prompts(docs: list[list[int]], count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens, each from a document drawn with probability ~ its length."""
    usable = [d for d in docs if len(d) > length]
    if not usable:
        raise ValueError(f"no document is longer than --prompt-tokens {length}")
    rng = random.Random(seed)
    weights = [len(d) - length for d in usable]
    prompts = []
    for doc in rng.choices(usable, weights=weights, k=count):
        start = rng.randrange(len(doc) - length)
        prompts.append(doc[start : start + length])
    return prompts


def read_documents(paths: list[str], model: str) -> list[list[int]]:
    """Token ids (with BOS/EOS, as in training) of every UTF-8 text file under `paths`."""
    from transformers import AutoTokenizer

    from tgi_space.train.data import SkipCounter, _expand, read_text

    tokenizer = AutoTokenizer.from_pretrained(model)
    skips = SkipCounter()
    docs = [doc for f in _expand(paths) if (doc := read_text(f, tokenizer, skips)) is not None]
    log.info("read %d documents; %s", len(docs), skips.report())
    return docs


def generate_batches(llm, prompts: list[list[int]], new_tokens: int, batch_size: int, out: Path) -> int:
    """Greedy continuations written to `out` as JSONL, `batch_size` requests at a time; returns #tokens."""
    from tgi_space.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens)
    total, t0 = 0, time.time()
    with out.open("w") as f:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            for prompt, result in zip(chunk, llm.generate(chunk, params, speculate="none")):
                f.write(json.dumps({"prompt_ids": prompt, "response_ids": result.token_ids}) + "\n")
                total += len(result.token_ids)
            log.info("%d/%d prompts, %.0f tokens/s", i + len(chunk), len(prompts), total / (time.time() - t0))
    return total


def distill(
    model: str = typer.Option(..., "--model", help="model directory whose greedy outputs are the data"),
    data: List[str] = typer.Option(..., "--data", help="text/code files or directories to cut prompts from"),
    output: Path = typer.Option(..., "--output", help="JSONL file to write"),
    num_prompts: int = typer.Option(2000, "--num-prompts", min=1),
    prompt_tokens: int = typer.Option(96, "--prompt-tokens", min=1),
    new_tokens: int = typer.Option(128, "--new-tokens", min=1),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="engine dtype: bfloat16 or float32"),
) -> None:
    """Write the model's greedy continuations of corpus windows, for SPACE training on its own text."""
    from tgi_space.llm import LLM

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    llm = LLM(model, dtype=dtype)
    docs = read_documents(data, model)
    prompts = sample_prompts(docs, num_prompts, prompt_tokens, seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    tokens = generate_batches(llm, prompts, new_tokens, batch_size, output)
    typer.echo(f"{len(prompts)} continuations ({tokens} tokens) written to {output}")


def register(app: typer.Typer) -> None:
    """Add the `distill` command to the tgi-space CLI."""
    app.command("distill")(distill)
