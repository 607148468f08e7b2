"""Making a Hugging Face causal LM SPACE-ready, and checking it honours a 4D mask."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from tgi_space.config import TRAINING_METHODS
from tgi_space.train.collator import layout_example, pad_layouts
from tgi_space.train.data import Example

log = logging.getLogger(__name__)

MASK_TOKEN = "[MASK]"


class MaskNotHonouredError(RuntimeError):
    """The model's attention ignored the custom 4D mask; SAR-SFT would train the wrong thing."""


def _mean_init_rows(weight: torch.Tensor, num_old: int) -> None:
    """Set rows num_old.. of an embedding/unembedding matrix to the mean of the old rows."""
    with torch.no_grad():
        weight[num_old:] = weight[:num_old].float().mean(dim=0).to(weight.dtype)


def add_mask_token(model: Any, tokenizer: Any) -> int:
    """Add `[MASK]` to the tokenizer if absent and grow the embeddings (mean-initialised rows)."""
    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    else:
        tokenizer.mask_token = MASK_TOKEN
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    num_old = model.get_input_embeddings().weight.shape[0]
    if mask_id >= num_old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _mean_init_rows(model.get_input_embeddings().weight, num_old)
        output = model.get_output_embeddings()
        if output is not None and output.weight is not model.get_input_embeddings().weight:
            _mean_init_rows(output.weight, num_old)
        log.info("added %s as id %d; embeddings resized %d -> %d", MASK_TOKEN, mask_id, num_old, len(tokenizer))
    return mask_id


def reset_mask_rows(model: Any, mask_id: int) -> None:
    """Set the [MASK] input and output rows to the mean of all other rows (a never-trained row)."""
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is None:
            continue
        with torch.no_grad():
            others = torch.cat([emb.weight[:mask_id], emb.weight[mask_id + 1 :]]).float()
            emb.weight[mask_id] = others.mean(dim=0).to(emb.weight.dtype)


def unused_token_id(tokenizer: Any, examples: Sequence[Example], num_rows: int) -> int | None:
    """The highest id that is not special (nor an added token) and never occurs in the tokenized training
    data, below the embedding's rows; None when every row is used."""
    used = {t for ex in examples for t in ex.input_ids}
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token_id in range(min(len(tokenizer), num_rows) - 1, -1, -1):
        if token_id not in used and token_id not in special:
            return token_id
    return None


def make_space_ready(model: Any, tokenizer: Any, k: int, method: str = "space", token_id: int | None = None) -> int:
    """Add the mask token (or reuse row `token_id`, mean-initialised) and record the SPACE/SDSAT settings in
    `model.config`; returns the mask id."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if method not in TRAINING_METHODS:
        raise ValueError(f"method must be one of {', '.join(TRAINING_METHODS)}, got {method!r}")
    if token_id is None:
        mask_id = add_mask_token(model, tokenizer)
    else:  # an unused vocabulary row becomes the adaptive token (SDSAT's reuse); the tokenizer is left as is
        mask_id = int(token_id)
        reset_mask_rows(model, mask_id)
        log.info("reusing unused id %d (%r) as the mask/adaptive token", mask_id,
                 tokenizer.convert_ids_to_tokens(mask_id))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config
    config.space_mask_token_id = int(mask_id)
    config.space_k = int(k)
    config.space_method = method  # which recipe trained the mask token (the decoders check it)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return mask_id


def check_honours_4d_mask(model: Any, mask_id: int, k: int = 3, length: int = 16, seed: int = 0) -> None:
    """One-batch check: perturbing y[s..L) must leave the mask rows' logits unchanged.

    Raises MaskNotHonouredError if the attention implementation ignores the mask.
    """
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = [int(t) for t in torch.randint(0, vocab, (length,), generator=gen) if int(t) != mask_id]
    s = len(ids) // 3
    perturbed = ids[:s] + [(t + 1) % vocab if (t + 1) % vocab != mask_id else (t + 2) % vocab for t in ids[s:]]
    layouts = [layout_example(Example(x, [True] * len(x)), [s], k, mask_id) for x in (ids, perturbed)]
    batch = pad_layouts(layouts, pad_id=0, mask_dtype=model.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
            ).logits.float()
    finally:
        model.train(was_training)
    rows = slice(len(ids), len(ids) + k)
    diff = (logits[0, rows] - logits[1, rows]).abs().max().item()
    if diff > 1e-3 * max(1.0, logits[0, rows].abs().max().item()):
        raise MaskNotHonouredError(
            f"{type(model).__name__} (attn_implementation={getattr(model.config, '_attn_implementation', '?')}) "
            f"does not honour a custom 4D attention mask: mask-row logits moved by {diff:.3g} when only "
            "tokens they must not see changed. Use a model family that accepts 4D masks and position_ids "
            "(Llama, Mistral, Qwen2) with attn_implementation='sdpa' or 'eager'."
        )
