"""The Llama family (Llama 2/3, Mistral, Qwen2) over a flat ragged batch and a paged KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgi_space.attention.backend import AttentionBackend
from tgi_space.attention.metadata import AttentionMetadata
from tgi_space.config import ModelConfig
from tgi_space.model.adapter import GatedLora, MaskGate
from tgi_space.model.prepack import packed_linear
from tgi_space.model.rotary import RopeTables, RotaryEmbedding


GEMM_BLOCKED_MIN_K = 512  # smallest reduction length at which oneDNN's bf16 GEMM was seen to block K


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as the reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Fused QKV projection, rotary embedding, then the configured attention backend."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, rope: "RopeTables", ctx: "ForwardContext", layer: int) -> torch.Tensor:
        n = x.shape[0]
        qkv = ctx.linear(self.qkv_proj, x)  # [N, (h + 2 kvh) * d]
        qk = qkv[:, : self.q_size + self.kv_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim)
        qk = ctx.rotate(rope, qk)  # q and k heads rotated in one pass
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        out = ctx.backend.forward(q, k, v, ctx.kv_caches[layer], ctx.meta, self.scale)
        return ctx.linear(self.o_proj, out.reshape(n, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with the gate and up projections fused."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: "ForwardContext") -> torch.Tensor:
        return ctx.linear(self.down_proj, ctx.swiglu(ctx.linear(self.gate_up_proj, x)))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residuals."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None, rope: "RopeTables", ctx: "ForwardContext", layer: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual stream, this layer's MLP output): the caller adds the latter, fused with the next norm."""
        x, h = ctx.add_norm(self.input_layernorm, x, delta)
        x, h = ctx.add_norm(self.post_attention_layernorm, x, self.self_attn(h, rope, ctx, layer))
        return x, self.mlp(h, ctx)


class ForwardContext:
    """What a forward pass reads besides its inputs: cache tensors, backend, rotary tables, metadata."""

    def __init__(
        self,
        kv_caches: list[torch.Tensor],
        backend: AttentionBackend,
        rotary: RotaryEmbedding,
        gemm_row_block: int | None = None,
    ) -> None:
        self.kv_caches = kv_caches  # num_layers x [2, num_slots, num_kv_heads, head_dim], set at engine start
        self.backend = backend
        self.rotary = rotary
        self.gemm_row_block = gemm_row_block  # rows per GEMM call (batch invariance), None = one call
        self.meta: AttentionMetadata | None = None  # set before each forward
        self.gate: MaskGate | None = None  # a gated adapter's mask rows this step; set by the model's forward
        self.packed: dict[nn.Module, torch.Tensor] = {}  # projection -> its oneDNN-packed weight (prepack.py)
        self.kernels = None  # the fused CPU kernels' module (attention/fused.py) when that backend runs

    def add_norm(
        self, module: "RMSNorm", x: torch.Tensor, delta: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, module(x + delta)), or (x, module(x)) without a delta; in one fused CPU call when
        the fused kernels run (x updated in place; the same rounding steps as a torch add, then the norm)."""
        if self.kernels is None or x.dim() != 2 or module.weight.dtype != x.dtype:
            x = x if delta is None else x + delta
            return x, module(x)
        return x, self.kernels.rms_norm(x, module.weight, module.eps, delta)

    def swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of [gate | up] rows, in one fused CPU call when the fused kernels run."""
        if self.kernels is None or gate_up.dim() != 2:
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up
        return self.kernels.swiglu(gate_up)

    def rotate(self, rope: "RopeTables", x: torch.Tensor) -> torch.Tensor:
        """rope.rotate(x), in one fused CPU call (float32 tables, one rounding) when the fused kernels run."""
        if self.kernels is None or rope.owner is None:
            return rope.rotate(x)
        cos, sin = rope.float32
        return self.kernels.rotary(x, cos, sin)

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """layer(x) [N, out]; with a gated adapter, its delta added on the step's mask rows only."""
        y = self.gemm(layer, x, layer.in_features)
        delta = self.gate.deltas.get(layer) if self.gate is not None else None
        if delta is not None:
            delta.add_to(y, x, self.gate.rows, self.kernels)
        return y

    def gemm(self, fn: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
        """fn(x) row-wise; for reduction length k >= 512, in calls of at most `gemm_row_block` rows.

        oneDNN's bf16 GEMM switches to a K-blocked kernel above 32 rows when K >= 512
        (measured on AMX CPUs; K = 384 never does), which rounds some rows differently;
        calls of <= 32 rows give every row the bits it gets alone, whatever else is in the batch.
        A packed weight (prepack.py) keeps one kernel for every row count: one call
        (tests/test_prepack.py checks 1 to 300 rows against rows alone).
        """
        packed = self.packed.get(fn)
        if packed is not None:
            return packed_linear(packed, fn.bias, x)
        block = self.gemm_row_block
        if block is None or x.shape[0] <= block or k < GEMM_BLOCKED_MIN_K:
            return fn(x)
        return torch.cat([fn(rows) for rows in x.split(block)])


class LlamaForCausalLM(nn.Module):
    """Decoder stack plus LM head; `forward(input_ids, positions)` -> hidden states."""

    # checkpoint name -> (our fused parameter, shard index) for the fused projections
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.ctx: ForwardContext | None = None  # bound by the engine once the KV cache exists
        self.adapter: GatedLora | None = None  # gated SPACE adapter (model/adapter.py), attached after loading

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Hidden states [N, hidden] of the flat batch input_ids [N] at positions [N].

        `mask_rows` [M]: the rows of mask groups, which alone get a gated adapter's deltas (a mask
        token written in a prompt is an ordinary row); None means every row holding the mask id.
        """
        x = self.embed_tokens(input_ids)
        self.ctx.gate = self.adapter.open_gate(input_ids, x, mask_rows) if self.adapter is not None else None
        rope = self.ctx.rotary.tables(positions)  # once per step, shared by every layer
        delta = None
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, rope, self.ctx, i)
        self.ctx.gate = None  # this step's rows only: a later linear call (lm_head, checks) sees no gate
        return self.ctx.add_norm(self.norm, x, delta)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, vocab] of selected hidden rows [n, hidden]."""
        if self.ctx is None:
            return self.lm_head(hidden).float()
        return self.ctx.gemm(self.lm_head, hidden, self.config.hidden_size).float()

    def shard_sizes(self, fused: str) -> list[int]:
        """Output sizes of the checkpoint tensors packed into one fused parameter."""
        c = self.config
        if fused == "qkv_proj":
            kv = c.num_key_value_heads * c.head_dim
            return [c.num_attention_heads * c.head_dim, kv, kv]
        return [c.intermediate_size, c.intermediate_size]
