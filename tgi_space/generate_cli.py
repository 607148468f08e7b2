"""`tgi-space generate`: offline generation from the command line."""

from __future__ import annotations

import json

import typer

from tgi_space.config import SpacePolicy, parse_tree_sizes
from tgi_space.sampling import SamplingParams


def generate(
    prompts: list[str] = typer.Argument(..., help="Prompts; '\\n' and '\\t' escapes are expanded."),
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint folder (config.json, safetensors, tokenizer.json)."),
    adapter: str = typer.Option(None, "--adapter", help="Gated SPACE adapter folder (default: config.json space_adapter)."),
    datastore: str = typer.Option(None, "--datastore", help="Self-drafted datastore .npy (default: config.json "
                                  "space_datastore; 'none': off)."),
    speculate: str = typer.Option("space", help="space | sdsat | none"),
    k: int = typer.Option(None, "--k", help="Candidates per step (default: the checkpoint's space_k)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    do_sample: bool = typer.Option(False, "--do-sample"),
    temperature: float = typer.Option(1.0),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(None),
    dtype: str = typer.Option("auto", help="auto | bfloat16 | float32 | float16 (auto: config.resolve_dtype)"),
    fixed_layout: bool = typer.Option(False, "--fixed-layout", help="The paper's fixed layout (k candidates, all groups)."),
    drafters: str = typer.Option("masks,suffix", "--drafters", help="Drafters of the planned step: masks, suffix."),
    sdsat_tree_sizes: str = typer.Option("4,8,8,5,3", "--sdsat-tree-sizes", help="SDSAT sampling: draft tree draws per depth."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per prompt."),
) -> None:
    """Generate for each prompt and print the text with SPACE statistics."""
    from tgi_space.llm import LLM

    try:
        params = SamplingParams(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed,
        )
        policy = SpacePolicy(k_max=k, planner=not fixed_layout, drafters=tuple(d for d in drafters.split(",") if d),
                             sdsat_tree_sizes=parse_tree_sizes(sdsat_tree_sizes))
        llm = LLM(model, dtype=dtype, space=policy, adapter=adapter, datastore=datastore)
        texts = [p.encode().decode("unicode_escape") for p in prompts]
        outputs = llm.generate(texts, params, speculate=speculate)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2)
    for out in outputs:
        s = out.stats
        record = {
            "prompt": out.prompt, "text": out.text, "finish_reason": out.finish_reason,
            "generated_tokens": len(out.token_ids), "forward_steps": s.num_steps,
            "tokens_per_step": round(s.mean_tokens_per_step, 3),
            "accepted_by_position": s.accepted_by_position, "drafted_by_position": s.drafted_by_position,
        }
        if as_json:
            typer.echo(json.dumps(record))
            continue
        typer.echo(out.prompt + out.text)
        typer.echo(
            f"--- {len(out.token_ids)} tokens in {s.num_steps} steps ({s.mean_tokens_per_step:.2f} tokens/step), "
            f"finish: {out.finish_reason}, accepted by position: {s.accepted_by_position} "
            f"of {s.drafted_by_position}"
        )


def register(app: typer.Typer) -> None:
    """Add the `generate` command."""
    app.command("generate")(generate)
