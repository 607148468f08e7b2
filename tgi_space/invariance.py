"""`tgi-space check-invariance`: does this device give every row the same bits whatever the batch?

Greedy speculation reproduces plain decoding bit for bit only if a row's logits do
not depend on what else is in the step. This command checks it on the user's own
device, dtype and model, at three levels: the model's GEMMs (a row inside M rows vs
alone), whole steps (a row inside a batched SPACE step vs a one-row plain step),
and end to end (greedy SPACE vs plain decoding on HumanEval prompts, batch 1 and 8).
"""

from __future__ import annotations

import torch
import typer

from tgi_space.config import SpacePolicy
from tgi_space.llm import LLM
from tgi_space.sampling import SamplingParams
from tgi_space.space import SeqPlan, build_layout

GEMM_ROWS = (1, 2, 7, 16, 31, 32, 33, 36, 64, 100, 300)


def gemm_mismatches(llm: LLM) -> dict[str, int]:
    """Per linear shape of the model: rows whose output differs from the row computed alone."""
    ctx, model = llm.engine.model.ctx, llm.engine.model
    layers = {"qkv": model.layers[0].self_attn.qkv_proj, "o": model.layers[0].self_attn.o_proj,
              "gate_up": model.layers[0].mlp.gate_up_proj, "down": model.layers[0].mlp.down_proj,
              "lm_head": model.lm_head}
    gen = torch.Generator().manual_seed(0)
    out = {}
    with torch.inference_mode():
        for name, layer in layers.items():
            bad = 0
            for m in GEMM_ROWS:
                x = torch.randn(m, layer.in_features, generator=gen).to(layer.weight)
                full = ctx.linear(layer, x)
                bad += sum(not torch.equal(full[r], ctx.linear(layer, x[r : r + 1])[0]) for r in range(m))
            out[name] = bad
    return out


def step_logits(llm: LLM, plans: list[SeqPlan], seq_ids: list[int]) -> list[torch.Tensor]:
    """One step of `plans` (sequences allocated and prefilled already): each sequence's logit rows."""
    engine, bm = llm.engine, llm.engine.block_manager
    layout = build_layout(plans, engine.mask_token_id or 0)
    prefix = [bm.slots(s, 0, p.num_cached) for s, p in zip(seq_ids, plans)]
    writes = torch.cat([bm.slots(s, p.num_cached, p.num_cached + len(p.chain)) for s, p in zip(seq_ids, plans)])
    rows = torch.cat([torch.arange(len(p.chain)) + layout.cu_seqlens[i] for i, p in enumerate(plans)])
    with torch.inference_mode():
        logits = engine._forward(layout, prefix, writes, rows)
    return [logits[layout.logit_offsets[i] : layout.logit_offsets[i + 1]] for i in range(len(plans))]


def step_mismatches(llm: LLM, prompts: list[list[int]]) -> int:
    """Logit rows that differ between one-row plain steps and the same rows inside one batched
    SPACE-shaped step (a 3-token chain plus mask groups per prompt). 2 rows checked per prompt."""
    bm = llm.engine.block_manager
    cut = [len(p) - 3 for p in prompts]
    for i, (p, t) in enumerate(zip(prompts, cut)):
        bm.allocate(i, len(p) + 8)
        step_logits(llm, [SeqPlan(p[:t], 0, [], 0, 0)], [i])  # prefill
    alone = [
        [step_logits(llm, [SeqPlan([p[t + j]], 0, [], 0, t + j)], [i])[0][0] for j in (0, 1)]
        for i, (p, t) in enumerate(zip(prompts, cut))
    ]
    ids = list(range(len(prompts)))
    batched = step_logits(llm, [SeqPlan(p[t : t + 3], 2, [0, 1, 2], 2, t) for p, t in zip(prompts, cut)], ids)
    for i in ids:
        bm.free(i)
    return sum(int(not torch.equal(a[j], b[j])) for a, b in zip(alone, batched) for j in (0, 1))


def greedy_mismatches(llm: LLM, prompts: list[str], max_new_tokens: int, batch: int) -> int:
    """Prompts whose greedy SPACE output (in batches of `batch`) differs from plain decoding."""
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    reference = [o.token_ids for o in llm.generate(prompts, params, speculate="none")]
    got = []
    for start in range(0, len(prompts), batch):
        got += [o.token_ids for o in llm.generate(prompts[start : start + batch], params, speculate="space")]
    return sum(a != b for a, b in zip(got, reference))


def check_invariance(
    model: str = typer.Option("models/tiny-space-py", "--model", "-m"),
    dtype: str = typer.Option("auto", "--dtype"),
    device: str = typer.Option("cpu", "--device"),
    attention_backend: str = typer.Option("auto", "--attention-backend"),
    num_prompts: int = typer.Option(16, "--num-prompts"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    threads: int = typer.Option(0, "--threads", help="torch threads; 0 keeps torch's default."),
) -> None:
    """Check batch invariance on this device; exit code 1 if any row or output differs."""
    from tgi_space.bench import humaneval_prompts

    if threads:
        torch.set_num_threads(threads)
    llm = LLM(model, dtype=dtype, device=device, attention_backend=attention_backend, max_num_seqs=8,
              space=SpacePolicy(k_max=None))
    prompts = humaneval_prompts(num_prompts)
    gemm = gemm_mismatches(llm)
    steps = step_mismatches(llm, [llm.tokenizer.encode(p) for p in prompts])
    greedy = {b: greedy_mismatches(llm, prompts, max_new_tokens, b) for b in (1, 8)}
    cfg = llm.engine.config
    typer.echo(f"{model}: {cfg.dtype} on {device}, attention {cfg.attention_backend}, "
               f"GEMM row block {cfg.gemm_row_block or 'none'}, {torch.get_num_threads()} threads")
    typer.echo("GEMM rows differing from the row alone: " + ", ".join(f"{k} {v}" for k, v in gemm.items()))
    typer.echo(f"step logit rows differing (batched SPACE step vs one-row steps): {steps} of {2 * len(prompts)}")
    typer.echo("greedy SPACE != plain decoding: " + ", ".join(f"batch {b}: {n} of {len(prompts)}" for b, n in greedy.items()))
    ok = not any(gemm.values()) and steps == 0 and not any(greedy.values())
    typer.echo("batch-invariant: yes" if ok else "batch-invariant: NO (greedy speculation may differ from plain decoding)")
    raise typer.Exit(0 if ok else 1)


def register(app: typer.Typer) -> None:
    """Add the `check-invariance` command."""
    app.command("check-invariance")(check_invariance)
