"""Making a model SPACE-ready, a short SAR-SFT run, checkpoints, the 4D-mask check, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.test_train_support import tiny_llama, tiny_tokenizer
from tgi_space.train.collator import SpaceCollator
from tgi_space.train.data import Example
from tgi_space.train.prepare import MaskNotHonouredError, check_honours_4d_mask, make_space_ready
from tgi_space.train.trainer import TrainConfig, last_checkpoint, model_forward, run_training, space_loss


def progressions(n: int, length: int, vocab: int, seed: int) -> list[Example]:
    """Arithmetic progressions mod `vocab` (ids 3..): the future is predictable from the past."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        a, d = rng.randrange(vocab - 3), rng.choice([1, 2, 3])
        ids = [3 + (a + i * d) % (vocab - 3) for i in range(length)]
        examples.append(Example(ids, [True] * length))
    return examples


def mask_loss(model, batch) -> float:
    with torch.no_grad():
        logits = model_forward(model.eval(), batch)
    _, stats = space_loss(logits, batch["targets"], batch["offsets"])
    loss_sum = sum(v[0] for off, v in stats.items() if off > 0)
    return loss_sum / sum(v[1] for off, v in stats.items() if off > 0)


def test_make_space_ready_adds_mean_rows_and_config_keys():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    mask_id = make_space_ready(model, tok, k=4)
    assert mask_id == len(old_in) and tok.mask_token == "[MASK]"
    assert "[MASK]" in tok.all_special_tokens
    assert torch.allclose(model.get_input_embeddings().weight[mask_id], old_in.mean(0), atol=1e-6)
    assert torch.allclose(model.get_output_embeddings().weight[mask_id], old_out.mean(0), atol=1e-6)
    assert torch.equal(model.get_input_embeddings().weight[:mask_id], old_in)
    cfg = model.config
    assert (cfg.space_mask_token_id, cfg.space_k) == (mask_id, 4)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    )


def test_make_space_ready_reuses_an_existing_mask_token():
    tok = tiny_tokenizer(with_mask=True)
    model = tiny_llama(vocab=len(tok))
    mask_id = make_space_ready(model, tok, k=2)
    assert mask_id == tok.convert_tokens_to_ids("[MASK]") < len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_model_that_ignores_4d_masks_is_refused():
    from transformers import LlamaForCausalLM

    class IgnoresMask(LlamaForCausalLM):
        def forward(self, *args, attention_mask=None, **kwargs):
            return super().forward(*args, attention_mask=None, **kwargs)

    good = tiny_llama()
    check_honours_4d_mask(good, mask_id=63)  # passes
    bad = IgnoresMask(good.config).eval()
    with pytest.raises(MaskNotHonouredError, match="does not honour a custom 4D attention mask"):
        check_honours_4d_mask(bad, mask_id=63)


def test_short_run_lowers_mask_loss_and_checkpoint_loads_back(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tiny_tokenizer(vocab=80)
    model = tiny_llama(vocab=len(tok))
    mask_id = make_space_ready(model, tok, k=3)
    vocab = len(tok) - 1
    eval_batch = SpaceCollator(3, 0.0, mask_id, tok.pad_token_id, 2, seed=99)(progressions(16, 24, vocab, seed=1))
    before = mask_loss(model, eval_batch)
    cfg = TrainConfig(
        output=str(tmp_path / "run"), k=3, p_ar=0.5, num_mask_blocks=2, lr=1e-2, max_steps=40, batch_size=8,
        warmup_steps=4, bf16=False, save_steps=20, logging_steps=10, disable_tqdm=True,
    )
    trainer = run_training(model.train(), progressions(320, 24, vocab, seed=0), cfg, mask_id, tok.pad_token_id)
    after = mask_loss(trainer.model, eval_batch)
    assert after < before - 0.5, (before, after)
    logged = [entry for entry in trainer.state.log_history if "mask_acc_1" in entry]
    assert logged and {"ar_loss", "mask_loss_3", "mask_acc_3"} <= set(logged[-1])
    assert last_checkpoint(cfg.output).endswith("checkpoint-40")

    final = tmp_path / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(final)
    config = json.loads((final / "config.json").read_text())
    assert (config["space_mask_token_id"], config["space_k"]) == (mask_id, 3)
    reloaded_tok = AutoTokenizer.from_pretrained(final)
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    assert reloaded_tok.convert_tokens_to_ids("[MASK]") == mask_id and reloaded_tok.mask_token == "[MASK]"
    assert reloaded.config.space_mask_token_id == mask_id
    assert mask_loss(reloaded, eval_batch) == pytest.approx(after, abs=1e-4)


@pytest.mark.parametrize(
    "changes", [{"k": 0}, {"p_ar": 1.5}, {"p_ar": -1.0}, {"batch_size": 0}, {"max_steps": -1, "epochs": 0}]
)
def test_train_config_refuses_bad_settings(changes):
    with pytest.raises(ValueError):
        TrainConfig(output="unused", **changes)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_defaults_to_what_the_cpu_multiplies_natively(monkeypatch, native):
    import tgi_space.model.prepack as prepack

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prepack, "native_bf16_gemm", lambda: native)
    assert TrainConfig(output="unused").bf16 is native
    assert TrainConfig(output="unused", bf16=True).bf16 is True  # an explicit choice stays
    assert TrainConfig(output="unused", bf16=False).bf16 is False


# ------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("base")
    tiny_llama(vocab=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_cli(args: list[str]):
    from typer.testing import CliRunner

    from tgi_space.cli import app

    return CliRunner().invoke(app, ["train", *args])


@pytest.mark.parametrize("lora", [False, True])
def test_cli_trains_and_saves_a_space_model(tmp_path, model_dir, lora):
    data = tmp_path / "code.py"
    data.write_text("def add(a, b):\n    return a + b\n" * 20)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--data", str(data), "--output", str(out), "--k", "3", "--max-steps", "2",
            "--seq-len", "32", "--batch-size", "2", "--no-bf16", "--save-steps", "2", "--lr", "1e-3"]
    result = run_cli(args + (["--lora", "--lora-r", "4"] if lora else []))
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["space_k"] == 3 and config["space_mask_token_id"] == config["vocab_size"] - 1
    assert "[MASK]" in (out / "tokenizer.json").read_text()


@pytest.mark.parametrize(
    "extra, message", [(["--k", "0"], "k must be >= 1"), (["--p-ar", "1.5"], "p_ar must be in")]
)
def test_cli_reports_bad_settings(tmp_path, model_dir, extra, message):
    data = tmp_path / "code.py"
    data.write_text("x = 1\n" * 50)
    result = run_cli(["--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2
    assert message in result.output


def test_cli_reports_missing_data(tmp_path, model_dir):
    missing = str(tmp_path / "none.jsonl")
    result = run_cli(["--model", str(model_dir), "--data", missing, "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
