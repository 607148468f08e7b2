"""`tgi-space train` as a new user meets it (issue 11, item 15)."""

from __future__ import annotations

import logging

import pytest

from tests.test_train_support import tiny_llama, tiny_tokenizer
from tests.test_train_trainer import model_dir, progressions, run_cli  # noqa: F401 - the fixture
from tgi_space.train.prepare import make_space_ready
from tgi_space.train.trainer import TrainConfig, optimizer_steps, run_training


def test_seq_len_beyond_the_models_positions_is_refused(tmp_path, model_dir):  # noqa: F811
    data = tmp_path / "code.py"
    data.write_text("x = 1\n" * 50)
    result = run_cli(["--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                      "--seq-len", "1000", "--k", "3"])
    assert result.exit_code == 2, result.output
    assert "max_position_embeddings" in result.output and "--seq-len 254" in result.output


def test_missing_data_is_reported_before_the_model_loads(tmp_path, model_dir, monkeypatch):  # noqa: F811
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data path was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_loading)
    result = run_cli(["--model", str(model_dir), "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output


@pytest.mark.parametrize(
    "num_examples, batch_size, grad_accum, epochs, world, expected",
    [(10, 4, 1, 2.0, 1, 6), (10, 4, 1, 1.0, 1, 3), (9, 2, 2, 1.0, 1, 3), (10, 4, 1, 0.5, 1, 2), (10, 2, 1, 1.0, 2, 3)],
)
def test_optimizer_steps_count_like_the_trainer(num_examples, batch_size, grad_accum, epochs, world, expected):
    cfg = TrainConfig(output="-", batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=-1)
    assert optimizer_steps(num_examples, cfg, world) == expected


def tiny_run(tmp_path, **cfg):
    tok = tiny_tokenizer(vocab=40)
    model = tiny_llama(vocab=len(tok))
    mask_id = make_space_ready(model, tok, k=2)
    options = dict(output=str(tmp_path / "run"), k=2, num_mask_blocks=1, lr=1e-2, batch_size=4, bf16=False,
                   logging_steps=1, disable_tqdm=True, save_steps=100)
    return model, mask_id, tok, TrainConfig(**{**options, **cfg})


def test_logged_step_count_is_the_steps_run(tmp_path, caplog):
    model, mask_id, tok, cfg = tiny_run(tmp_path, epochs=2.0, max_steps=-1)
    with caplog.at_level(logging.INFO, logger="tgi_space.train.trainer"):
        trainer = run_training(model.train(), progressions(10, 12, len(tok) - 1, seed=0), cfg, mask_id, tok.pad_token_id)
    announced = [r.getMessage() for r in caplog.records if "optimizer steps" in r.getMessage()]
    assert announced == [f"training 10 examples for {trainer.state.global_step} optimizer steps (k=2, p_ar=0.50)"]


def test_resuming_with_more_steps_does_not_train_at_learning_rate_zero(tmp_path):
    model, mask_id, tok, cfg = tiny_run(tmp_path, max_steps=2, save_steps=2)
    examples = progressions(16, 12, len(tok) - 1, seed=0)
    run_training(model.train(), examples, cfg, mask_id, tok.pad_token_id)
    longer = TrainConfig(**{**cfg.__dict__, "max_steps": 4})
    trainer = run_training(model.train(), examples, longer, mask_id, tok.pad_token_id)
    rates = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e and e["step"] > 2]
    assert trainer.state.global_step == 4 and len(rates) == 2
    assert rates[0] == pytest.approx(cfg.lr * 0.5)  # cosine over 4 steps, at step 2: half the peak
    assert rates[1] > 0
