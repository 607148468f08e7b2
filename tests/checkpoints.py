"""Random-init Hugging Face checkpoints of each supported family, saved by transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

VOCAB = 96  # ids 0..3 are specials, 4..94 words, 95 is [MASK]
MASK_ID = VOCAB - 1
EOS_ID = 2


def write_tokenizer(folder: Path, vocab: int = VOCAB) -> None:
    """A word-level tokenizer: token i is the word `w{i}`; specials <pad> <s> </s> <unk> [MASK]."""
    specials = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    words = {f"w{i}": i for i in range(4, vocab - 1)}
    tok = Tokenizer(models.WordLevel({**specials, **words, "[MASK]": vocab - 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(list(specials) + ["[MASK]"])
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "mask_token": "[MASK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def hf_config(family: str, **overrides):
    """A tiny transformers config of the family, with GQA."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=0, rms_norm_eps=1e-6,
    )
    common.update(overrides)
    if family == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        return LlamaConfig(rope_parameters=rope, **common)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(family)


def save_checkpoint(folder: Path, family: str = "llama", seed: int = 0, space: bool = True, **overrides):
    """Save a random model of `family` (float32) with a tokenizer; returns the HF model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # random biases and norms so those paths are tested too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    if space:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(space_mask_token_id=MASK_ID, space_k=3)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return model
