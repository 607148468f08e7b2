"""Gated-LoRA SPACE adapters (docs/adapters.md): ordinary rows are the base's bit for bit, mask rows match
an independent transformers reference, SPACE with the adapter is lossless, training leaves the base alone,
and adapters that do not fit the base are refused naming the field."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import MASK_ID, save_checkpoint
from tgi_space.config import EngineConfig, SpacePolicy
from tgi_space.engine import Engine
from tgi_space.llm import LLM
from tgi_space.model.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TARGET_MODULES, AdapterError, lora_key
from tgi_space.sampling import SamplingParams
from tgi_space.space import SeqPlan, build_layout
from tgi_space.train.collator import additive_mask
from tgi_space.train.gated_lora import (
    MASK_EMBEDDING_PARAM,
    adapter_config,
    add_gated_lora,
    find_mask_token,
    load_adapter_state,
    save_adapter,
)

K = 3


def hf_base(folder, r: int = 4, alpha: int = 8, targets=TARGET_MODULES):
    """The base as a transformers model (fp32, eager attention) wrapped with the training-side gated LoRA."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    add_gated_lora(model, MASK_ID, r, alpha, targets)
    return model


def random_adapter(base, out, seed: int = 0, targets=TARGET_MODULES):
    """A saved adapter with random, non-zero lora_A, lora_B and mask embedding."""
    model = hf_base(base, targets=targets)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if name == MASK_EMBEDDING_PARAM else 0.15))
    save_adapter(model, adapter_config(model, MASK_ID, K, 4, 8, targets, str(base)), out)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random Llama base whose tokenizer has [MASK] but whose config.json knows nothing of SPACE."""
    folder = tmp_path_factory.mktemp("gated-base")
    save_checkpoint(folder, "llama", seed=11, space=False)
    return folder


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return random_adapter(base, tmp_path_factory.mktemp("gated") / "space-adapter", seed=1)


def engine(base, dtype: str, adapter=None, **space) -> Engine:
    policy = SpacePolicy(**space) if space else SpacePolicy()
    return Engine(EngineConfig(model_dir=str(base), dtype=dtype, kv_cache_bytes=2**22, block_size=4,
                               adapter=str(adapter) if adapter else None, space=policy))


PROMPTS = [[5, 17, 33, 8, 60, 41, 12], [9, 9, 80, 4, 71], [30, 31, 32, 33, 34, 35, 36, 37, 38], [50, 6]]


# ------------------------------------------------------------ 1. plain decoding is the base's


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plain_decoding_with_the_adapter_is_the_base_bit_for_bit(base, adapter, dtype):
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, top_n_tokens=3)
    plain = LLM(str(base), dtype=dtype, kv_cache_bytes=2**22).generate(PROMPTS, params, speculate="none")
    gated = LLM(str(base), dtype=dtype, kv_cache_bytes=2**22, adapter=str(adapter))
    assert gated.engine.model.adapter is not None and gated.engine.mask_token_id == MASK_ID
    with_adapter = gated.generate(PROMPTS, params, speculate="none")
    for a, b in zip(plain, with_adapter):
        assert a.token_ids == b.token_ids
        assert [(t.logprob, t.top) for t in a.tokens] == [(t.logprob, t.top) for t in b.tokens]  # exact floats


@pytest.mark.parametrize("speculate", ["none", "space"])
def test_a_mask_token_in_the_prompt_is_an_ordinary_row(base, adapter, speculate):
    """The gate is the layout's mask-group rows, not the token id: a prompt holding the mask id decodes as the base."""
    prompts = [[5, MASK_ID, 9, 11], [MASK_ID, MASK_ID, 6]]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, top_n_tokens=2)
    plain = LLM(str(base), kv_cache_bytes=2**22).generate(prompts, params, speculate="none")
    gated = LLM(str(base), kv_cache_bytes=2**22, adapter=str(adapter)).generate(prompts, params, speculate=speculate)
    for a, b in zip(plain, gated):
        assert a.token_ids == b.token_ids
        if speculate == "none":
            assert [(t.logprob, t.top) for t in a.tokens] == [(t.logprob, t.top) for t in b.tokens]


# ------------------------------------------------------------ 2. the gate: mask rows only, and the reference


def space_plans(prompts: list[list[int]]) -> tuple[list[SeqPlan], list[SeqPlan]]:
    """A prefill per prompt, then a SPACE step: bonus + 2 candidates, a group of K masks after each."""
    prefill = [SeqPlan(chain=p, num_candidates=0, anchors=[], group_size=0, num_cached=0) for p in prompts]
    step = [SeqPlan(chain=[p[-1] + 1, 7, 8], num_candidates=2, anchors=[0, 1, 2], group_size=K, num_cached=len(p))
            for p in prompts]
    return prefill, step


def step_logits(eng: Engine, prompts: list[list[int]]) -> tuple[torch.Tensor, list[SeqPlan]]:
    """Logits [N, V] of every row of the SPACE step that follows the prompts' prefill."""
    bm = eng.block_manager
    for i, p in enumerate(prompts):
        bm.allocate(i, len(p) + 3)
    prefill, step = space_plans(prompts)
    for plans in (prefill, step):
        layout = build_layout(plans, MASK_ID)
        prefix = [bm.slots(i, 0, p.num_cached) for i, p in enumerate(plans)]
        writes = torch.cat([bm.slots(i, p.num_cached, p.num_cached + len(p.chain)) for i, p in enumerate(plans)])
        rows = torch.cat([torch.arange(len(p.chain)) + layout.cu_seqlens[i] for i, p in enumerate(plans)])
        eng._forward(layout, prefix, writes, rows, keep_hidden=True)
    return eng.model.compute_logits(eng.last_step[1]), step


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gate_changes_mask_rows_only(base, adapter, dtype):
    prompts = PROMPTS[:2]
    plain, step = step_logits(engine(base, dtype), prompts)
    gated, _ = step_logits(engine(base, dtype, adapter), prompts)
    is_mask = build_layout(step, MASK_ID).input_ids == MASK_ID
    assert is_mask.sum() == 2 * 3 * K
    assert torch.equal(gated[~is_mask], plain[~is_mask])  # bit for bit
    assert ((gated[is_mask] - plain[is_mask]).abs().amax(-1) > 1e-2).all()  # every mask row moved


def reference_logits(hf, prompt: list[int], plan: SeqPlan) -> torch.Tensor:
    """transformers + the training-side gated LoRA, whole sequence at once: logits of the step's rows."""
    layout = build_layout([plan], MASK_ID)
    t, n = len(prompt), len(layout.input_ids)
    visible = torch.zeros(t + n, t + n, dtype=torch.bool)
    visible[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    visible[t:, :t] = True
    visible[t:, t:] = layout.visibility[0]
    ids = torch.tensor(prompt + layout.input_ids.tolist())[None]
    positions = torch.cat([torch.arange(t), layout.positions])[None]
    with torch.no_grad():
        out = hf(input_ids=ids, position_ids=positions, attention_mask=additive_mask(visible)[None, None])
    return out.logits[0, t:].float()


def test_mask_rows_match_a_transformers_reference(base, adapter):
    prompts = PROMPTS[:2]
    ours, step = step_logits(engine(base, "float32", adapter), prompts)
    hf = hf_base(base)
    load_adapter_state(hf, adapter)
    layout = build_layout(step, MASK_ID)
    for i, (prompt, plan) in enumerate(zip(prompts, step)):
        ref = reference_logits(hf, prompt, plan)
        torch.testing.assert_close(ours[layout.cu_seqlens[i] : layout.cu_seqlens[i + 1]], ref, atol=1e-4, rtol=0)
    # and the reference itself is gated: without the adapter's tensors its mask rows differ
    plain = reference_logits(hf_base(base), prompts[0], step[0])
    assert (plain - reference_logits(hf, prompts[0], step[0])).abs().max() > 1e-2


# ------------------------------------------------------------ 3. SPACE with the adapter is lossless


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_space_with_the_adapter_is_plain_decoding_of_the_base(base, adapter, dtype, batch):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = PROMPTS[:batch]
    plain = LLM(str(base), dtype=dtype, kv_cache_bytes=2**22).generate(prompts, params, speculate="none")
    for policy in (SpacePolicy(planner=False), SpacePolicy(drafters=("masks",), latency_curve={1: 1.0, 256: 1.0})):
        llm = LLM(str(base), dtype=dtype, kv_cache_bytes=2**22, adapter=str(adapter), space=policy)
        outs = llm.generate(prompts, params, speculate="space")
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
        assert sum(sum(o.stats.drafted_by_position) for o in outs) > 0  # mask drafts were verified


def test_config_json_names_the_adapter(base, adapter, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base, model)
    shutil.copytree(adapter, model / "space-adapter")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "space_adapter": "space-adapter"}))
    eng = engine(model, "float32")
    assert eng.model.adapter is not None and (eng.mask_token_id, eng.k_max) == (MASK_ID, K)


# ------------------------------------------------------------ 4. training


def test_training_changes_the_adapter_only_and_the_engine_loads_it(base, tmp_path):
    from tests.test_train_trainer import progressions
    from tgi_space.train.trainer import TrainConfig, run_training

    model = hf_base(base).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = TrainConfig(output=str(tmp_path / "run"), k=K, num_mask_blocks=6, lr=1e-2, max_steps=3, batch_size=4,
                      bf16=False, save_steps=3, logging_steps=1, disable_tqdm=True, adapter="gated-lora", lora_r=4,
                      lora_alpha=8)
    trainer = run_training(model, progressions(24, 20, MASK_ID - 3, seed=0), cfg, MASK_ID, 0)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {MASK_EMBEDDING_PARAM} | {n for n in before if ".lora_" in n}
    for name, p in model.named_parameters():
        if name not in trained:
            assert torch.equal(p, before[name]), name  # the base, bit for bit
    assert not torch.equal(getattr(model, MASK_EMBEDDING_PARAM), before[MASK_EMBEDDING_PARAM])
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    logged = [e for e in trainer.state.log_history if "mask_acc_1" in e]
    assert logged and "ar_loss" not in logged[-1]  # the loss is the masks' only
    folder = save_adapter(model, adapter_config(model, MASK_ID, K, 4, 8, TARGET_MODULES, str(base)), tmp_path / "a")
    assert engine(base, "float32", folder).model.adapter is not None


def test_cli_trains_and_saves_an_adapter_folder(base, tmp_path):
    from typer.testing import CliRunner

    from tgi_space.cli import app

    data = tmp_path / "words.txt"
    data.write_text("\n".join(" ".join(f"w{4 + (a + 3 * i) % 90}" for i in range(30)) for a in range(20)) + "\n")
    weights = (base / "model.safetensors").read_bytes()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "train", "--model", str(base), "--data", str(data), "--output", str(out), "--adapter", "gated-lora",
        "--k", str(K), "--lora-r", "4", "--lora-alpha", "8", "--target-modules", "q_proj,v_proj,down_proj",
        "--num-mask-blocks", "8", "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--save-steps", "2",
    ])
    assert result.exit_code == 0, result.output
    folder = out / "space-adapter"
    assert str(folder) in result.output
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "GATED_LORA" and config["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    assert (config["space_mask_token_id"], config["space_k"], config["r"]) == (MASK_ID, K, 4)
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    assert tensors["mask_embedding"].dtype == torch.float32 and tensors["mask_embedding"].shape == (64,)
    assert tensors[lora_key(1, "down_proj", "A")].shape == (4, 112)
    assert tensors[lora_key(1, "down_proj", "B")].shape == (64, 4)
    assert (folder / "training_report.json").is_file()
    assert (base / "model.safetensors").read_bytes() == weights
    assert engine(base, "bfloat16", folder).model.adapter is not None


# ------------------------------------------------------------ continuing training: --init-adapter


def test_start_from_loads_a_saved_adapter_exactly_and_leaves_the_base(base, adapter):
    from tgi_space.train.gated_lora import adapter_state, start_from

    model, fresh = hf_base(base), hf_base(base)
    start_from(model, adapter, adapter_config(model, MASK_ID, K, 4, 8, TARGET_MODULES, str(base)))
    saved, state = load_file(adapter / ADAPTER_WEIGHTS), adapter_state(model)
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert not torch.equal(state["mask_embedding"], adapter_state(fresh)["mask_embedding"])
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if not p.requires_grad:
            assert torch.equal(p, q), name


@pytest.mark.parametrize("changes, message", [
    ({"r": 8}, "r is 8, this run's is 4"),
    ({"lora_alpha": 16}, "lora_alpha is 16, this run's is 8"),
    ({"target_modules": ["q_proj", "v_proj"]}, "target_modules is ('q_proj', 'v_proj')"),
    ({"space_mask_token_id": 5}, f"space_mask_token_id is 5, this run's is {MASK_ID}"),
    ({"base_hidden_size": 32}, "base_hidden_size is 32, this run's is 64"),
])
def test_start_from_refuses_an_adapter_of_other_settings(base, adapter, tmp_path, changes, message):
    from tgi_space.train.gated_lora import start_from

    model = hf_base(base)
    with pytest.raises(AdapterError, match=re.escape(message)):
        start_from(model, edited(adapter, tmp_path, **changes),
                   adapter_config(model, MASK_ID, K, 4, 8, TARGET_MODULES, str(base)))


def train_cli(base, tmp_path, name: str, *extra: str):
    """`tgi-space train --adapter gated-lora` on a small word file, one optimizer step at a negligible lr."""
    from typer.testing import CliRunner

    from tgi_space.cli import app

    data = tmp_path / "words.txt"
    data.write_text("\n".join(" ".join(f"w{4 + (a + 5 * i) % 90}" for i in range(30)) for a in range(8)) + "\n")
    return CliRunner().invoke(app, [
        "train", "--model", str(base), "--data", str(data), "--output", str(tmp_path / name), "--k", str(K),
        "--lora-r", "4", "--lora-alpha", "8", "--num-mask-blocks", "4", "--max-steps", "1", "--batch-size", "2",
        "--seq-len", "32", "--lr", "1e-9", "--no-bf16", *extra,
    ])


def test_cli_continues_training_from_an_init_adapter(base, adapter, tmp_path):
    continued = train_cli(base, tmp_path, "continued", "--adapter", "gated-lora", "--init-adapter", str(adapter))
    scratch = train_cli(base, tmp_path, "scratch", "--adapter", "gated-lora")
    assert continued.exit_code == 0 and scratch.exit_code == 0, continued.output + scratch.output
    start = load_file(adapter / ADAPTER_WEIGHTS)
    after = load_file(tmp_path / "continued" / "space-adapter" / ADAPTER_WEIGHTS)
    fresh = load_file(tmp_path / "scratch" / "space-adapter" / ADAPTER_WEIGHTS)
    key = lora_key(1, "up_proj", "B")
    assert start[key].abs().max() > 0.05  # the random adapter's B, far from the zeros a new adapter starts with
    for name, tensor in start.items():  # one step at lr 1e-9 moves nothing by more than ~1e-8
        assert torch.allclose(after[name], tensor, atol=1e-6), name
    assert fresh[key].abs().max() < 1e-6


def test_cli_refuses_an_init_adapter_it_cannot_use(base, adapter, tmp_path):
    (tmp_path / "empty").mkdir()
    missing = train_cli(base, tmp_path, "a", "--adapter", "gated-lora", "--init-adapter", str(tmp_path / "empty"))
    assert missing.exit_code == 2 and "no adapter_config.json" in missing.output
    not_gated = train_cli(base, tmp_path, "b", "--init-adapter", str(adapter))
    assert not_gated.exit_code == 2 and "init_adapter needs adapter='gated-lora'" in not_gated.output
    other_r = train_cli(base, tmp_path, "c", "--adapter", "gated-lora", "--init-adapter", str(adapter), "--lora-r", "8")
    assert other_r.exit_code == 2 and "r is 4, this run's is 8" in other_r.output


# ------------------------------------------------------------ 5. refusals


def edited(adapter, tmp_path, **changes):
    """A copy of the adapter with adapter_config.json fields changed (None: removed)."""
    folder = tmp_path / "edited"
    shutil.copytree(adapter, folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    config.update(changes)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"base_vocab_size": 128}, "base_vocab_size 128 does not match the model's vocab_size 96"),
    ({"base_num_hidden_layers": 3}, "base_num_hidden_layers 3 does not match"),
    ({"space_mask_token_id": None}, "missing space_mask_token_id"),
    ({"space_mask_token_id": 96}, "space_mask_token_id 96 is outside the vocabulary"),
    ({"target_modules": ["q_proj", "qkv_proj"]}, "target_modules: unknown ['qkv_proj']"),
    ({"target_modules": ["q_proj"]}, "unexpected base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"),
    ({"peft_type": "LORA"}, "peft_type must be 'GATED_LORA'"),
])
def test_engine_refuses_an_adapter_that_does_not_fit(base, adapter, tmp_path, changes, message):
    with pytest.raises(AdapterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine(base, "float32", edited(adapter, tmp_path, **changes))


def test_engine_refuses_an_adapter_of_another_hidden_size(base, tmp_path):
    other = tmp_path / "other-base"
    save_checkpoint(other, "llama", seed=2, space=False, hidden_size=32)
    with pytest.raises(AdapterError, match="base_hidden_size 32 does not match the model's hidden_size 64"):
        engine(base, "float32", random_adapter(other, tmp_path / "other-adapter"))


def test_engine_refuses_lora_shapes_that_do_not_fit(base, adapter, tmp_path):
    folder = edited(adapter, tmp_path)
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    key = lora_key(0, "k_proj", "B")
    tensors[key] = torch.zeros(64, 4)  # k_proj's output is 2 kv heads x 16 = 32
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterError, match=rf"{key} has shape \[64, 4\], expected \[32, 4\]"):
        engine(base, "float32", folder)


def test_missing_adapter_folders_are_named(base, tmp_path):
    with pytest.raises(AdapterError, match="adapter: no such folder"):
        engine(base, "float32", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        engine(base, "float32", tmp_path / "empty")


def test_training_refuses_a_base_without_a_mask_token():
    from tests.test_train_support import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer(with_mask=False)
    with pytest.raises(ValueError, match="needs a mask token in the base's vocabulary"):
        find_mask_token(tiny_llama(vocab=len(tok)), tok)


@pytest.mark.parametrize("changes, message", [
    ({"target_modules": ("q_proj", "lm_head")}, r"target_modules: unknown \['lm_head'\]"),
    ({"p_ar": 0.5}, "p_ar must be 0 with adapter='gated-lora'"),
    ({"lora": True}, "exclusive"),
    ({"adapter": "lora"}, "adapter must be one of gated-lora"),
])
def test_train_config_refuses_bad_adapter_settings(changes, message):
    from tgi_space.train.trainer import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(output="unused", **{"adapter": "gated-lora", **changes})


# ------------------------------------------------------------ serving: --adapter, SPACE_ADAPTER, TGI_SPACE_ADAPTER


def test_generate_cli_takes_an_adapter(base, adapter):
    from typer.testing import CliRunner

    from tgi_space.cli import app

    args = ["generate", "--model", str(base), "--adapter", str(adapter), "--dtype", "float32", "--fixed-layout",
            "--max-new-tokens", "12", "--json", "w5 w6 w7"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sum(json.loads(result.output)["drafted_by_position"]) > 0  # masks drafted: the adapter is on
    bad = CliRunner().invoke(app, args[:3] + ["--adapter", str(base / "nowhere")] + args[5:])
    assert bad.exit_code == 2 and "adapter: no such folder" in bad.output


def test_serve_takes_an_adapter(base, adapter):
    from tgi_space.http.app import create_app
    from tgi_space.http.settings import ServeSettings

    settings = ServeSettings(model_id=str(base), adapter=str(adapter), dtype="float32", device="cpu",
                             num_threads=1, kv_cache_bytes=2**22, fixed_layout=True)
    state = create_app(settings, str(base), load_in_background=False).state.tgi
    try:
        assert state.service.engine.model.adapter is not None and state.service.speculate == "space"
    finally:
        state.service.worker.stop()


def test_shard_server_reads_tgi_space_adapter(base, adapter):
    from tgi_space.launcher import shard
    from tgi_space.server.options import from_launcher

    env = {"TGI_SPACE_ADAPTER": str(adapter)}
    options = from_launcher(str(base), env=env)
    assert options.speculate_mode == "space" and options.engine_config().adapter == str(adapter)
    assert from_launcher(str(base), env={}).speculate_mode == "none"  # the base alone has no mask token
    assert shard.choose(["serve", str(base)], env) == "space"
    assert shard.choose(["serve", str(base)], {}) == "tgi"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_delta_kernel_adds_what_the_torch_path_adds_on_the_mask_rows_only(dtype):
    from tgi_space.attention.fused import available, kernel
    from tgi_space.model.adapter import GatedDelta

    if available() is not None:
        pytest.skip(f"fused kernels do not build: {available()}")
    g = torch.Generator().manual_seed(12)
    r, sizes, inp = 4, [40, 24], 72  # two shards of a fused projection; 72: a tail past the last 16 lanes
    a = torch.randn(2 * r, inp, generator=g)
    b = torch.zeros(sum(sizes), 2 * r)
    b[:40, :r], b[40:, r:] = torch.randn(40, r, generator=g), torch.randn(24, r, generator=g)
    delta = GatedDelta(a, b, [(0, r, 0, 40), (r, 2 * r, 40, 64)])
    x, y = torch.randn(9, inp, generator=g).to(dtype), torch.randn(9, 64, generator=g).to(dtype)
    rows = torch.tensor([1, 4, 8])
    ref, ours = y.clone(), y.clone()
    delta.add_to(ref, x, rows)  # reference: index_add_ of the float32 delta rounded to y's dtype
    delta.add_to(ours, x, rows, kernel())
    others = torch.ones(9, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(ours[others], y[others])  # ordinary rows keep their bits
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(ours[rows], ref[rows], **tol)
    assert not torch.equal(ours[rows], y[rows])


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_fused_delta_gives_the_same_bits_on_any_number_of_threads(rows):
    """The threads share A's rows and B's outputs (a step has a few mask rows): no output's computation may
    depend on the split. Sizes past several tasks per thread, with tails in every dimension."""
    from tgi_space.attention.fused import available, kernel
    from tgi_space.model.adapter import GatedDelta

    if available() is not None:
        pytest.skip(f"fused kernels do not build: {available()}")
    g = torch.Generator().manual_seed(9)
    r, sizes, inp = 13, [203, 77], 389
    a = torch.randn(2 * r, inp, generator=g)
    b = torch.zeros(sum(sizes), 2 * r)
    b[:203, :r], b[203:, r:] = torch.randn(203, r, generator=g), torch.randn(77, r, generator=g)
    delta = GatedDelta(a, b, [(0, r, 0, 203), (r, 2 * r, 203, 280)])
    x, y = torch.randn(8, inp, generator=g), torch.randn(8, 280, generator=g)
    index = torch.arange(rows) * 8 // rows
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = y.clone()
            delta.add_to(out, x, index, kernel())
            results.append(out)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], other) for other in results[1:])
    reference = y.clone()
    delta.add_to(reference, x, index)
    torch.testing.assert_close(results[0], reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_delta_gives_a_row_the_same_bits_alone_or_among_others(dtype):
    """The kernel handles mask rows a few at a time (one pass over A and B for all of them): a row's
    delta must not depend on which rows share its pass, nor on how many there are."""
    from tgi_space.attention.fused import available, kernel
    from tgi_space.model.adapter import GatedDelta

    if available() is not None:
        pytest.skip(f"fused kernels do not build: {available()}")
    g = torch.Generator().manual_seed(5)
    r, sizes, inp = 8, [43, 21], 77  # outputs past whole vectors, inputs past whole lanes
    a = torch.randn(2 * r, inp, generator=g)
    b = torch.zeros(sum(sizes), 2 * r)
    b[:43, :r], b[43:, r:] = torch.randn(43, r, generator=g), torch.randn(21, r, generator=g)
    delta = GatedDelta(a, b, [(0, r, 0, 43), (r, 2 * r, 43, 64)])
    x, y = torch.randn(11, inp, generator=g).to(dtype), torch.randn(11, 64, generator=g).to(dtype)
    together = y.clone()
    delta.add_to(together, x, torch.arange(11), kernel())
    for row in range(11):
        alone = y.clone()
        delta.add_to(alone, x, torch.tensor([row]), kernel())
        assert torch.equal(alone[row], together[row]), row
    reference = y.clone()
    delta.add_to(reference, x, torch.arange(11))
    assert not torch.equal(together, y)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    torch.testing.assert_close(together, reference, **tol)
