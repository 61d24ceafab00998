"""The Llama family (Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5, Qwen3), driven by ModelConfig.

Differences between the families are config flags: GQA (num_kv_heads), tied embeddings,
q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3), llama3 RoPE scaling. Q/K/V and gate/up
projections are fused into one matmul each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from layerserve.config import ModelConfig
from layerserve.model.kernel_choice import KernelPlan
from layerserve.model.linear import Linear
from layerserve.model.attention import AttentionMetadata, paged_attention, write_kv
from layerserve.model.registry import MODELS


def rope_inv_freq(config: ModelConfig, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with llama3 scaling when the config asks for it."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if freq_factors is not None:  # GGUF ships llama3 scaling precomputed as divisors
        return inv / freq_factors.to(torch.float64)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_len / low, old_len / high
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(is_mid, mid, scaled)
    if kind == "linear":
        return inv / scaling["factor"]
    if kind not in (None, "default"):
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (T, nh, hd); cos/sin: (T, 1, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def linear_shapes(c: ModelConfig, max_rows: int, max_head_rows: int) -> list[tuple[int, int, int]]:
    """(N, K, most rows) of every distinct linear layer shape: what a KernelPlan measures."""
    qkv = c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim
    return sorted({(qkv, c.hidden_size, max_rows), (c.hidden_size, c.num_heads * c.head_dim, max_rows),
                   (2 * c.intermediate_size, c.hidden_size, max_rows), (c.hidden_size, c.intermediate_size, max_rows),
                   (c.vocab_size, c.hidden_size, max_head_rows)})


@MODELS.register("llama", "mistral", "qwen2", "qwen3", "smollm")
class LlamaModel:
    """Inference-only weights and forward pass over flattened tokens of many sequences."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], freq_factors: torch.Tensor | None = None,
                 max_positions: int | None = None, plan: KernelPlan | None = None) -> None:
        """`plan`: the matmul kernel per layer shape and batch size (None: dense in the weights' dtype)."""
        self.config = config
        c = config
        self.embed = weights["model.embed_tokens.weight"]
        act = self.embed.dtype

        def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            ladder = plan.choices.get(f"{weight.shape[0]}x{weight.shape[1]}") if plan is not None else None
            return Linear(weight, bias, ladder, act)

        self.lm_head = linear(self.embed if c.tie_word_embeddings else weights["lm_head.weight"])
        self.norm = weights["model.norm.weight"]
        self.layers: list[dict[str, torch.Tensor | None]] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            w = lambda name: weights.get(p + name)  # noqa: E731
            bias = None
            if c.attention_bias:
                bias = torch.cat([w("self_attn.q_proj.bias"), w("self_attn.k_proj.bias"), w("self_attn.v_proj.bias")])
            qkv = torch.cat([w("self_attn.q_proj.weight"), w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight")])
            gate_up = torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")])
            self.layers.append({
                "ln1": w("input_layernorm.weight"),
                "ln2": w("post_attention_layernorm.weight"),
                "qkv": linear(qkv, bias),
                "o": linear(w("self_attn.o_proj.weight")),
                "q_norm": w("self_attn.q_norm.weight"),
                "k_norm": w("self_attn.k_norm.weight"),
                "gate_up": linear(gate_up),
                "down": linear(w("mlp.down_proj.weight")),
            })
        n_pos = max_positions or c.max_position_embeddings
        freqs = torch.outer(torch.arange(n_pos, dtype=torch.float64), rope_inv_freq(c, freq_factors))
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
        dtype = self.embed.dtype
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: (T,); kv: (L, 2, S, nkv, hd) -> final hidden states (T, D)."""
        c = self.config
        T = input_ids.shape[0]
        eps = c.rms_norm_eps
        x = F.embedding(input_ids, self.embed)  # (T, D)
        cos = self.cos[positions].unsqueeze(1)  # (T, 1, hd)
        sin = self.sin[positions].unsqueeze(1)
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (c.hidden_size,), layer["ln1"], eps)
            qkv = layer["qkv"](h)  # (T, q + 2 kv)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(T, c.num_heads, c.head_dim)
            k = k.view(T, c.num_kv_heads, c.head_dim)
            v = v.view(T, c.num_kv_heads, c.head_dim)
            if c.qk_norm:
                q = F.rms_norm(q, (c.head_dim,), layer["q_norm"], eps)
                k = F.rms_norm(k, (c.head_dim,), layer["k_norm"], eps)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            write_kv(kv[i, 0], kv[i, 1], k, v, meta.slot_mapping)
            attn = paged_attention(q, kv[i, 0], kv[i, 1], meta)  # (T, nh*hd)
            x = x + layer["o"](attn)
            h = F.rms_norm(x, (c.hidden_size,), layer["ln2"], eps)
            gate, up = layer["gate_up"](h).chunk(2, dim=-1)
            x = x + layer["down"](F.silu(gate) * up)
        return F.rms_norm(x, (c.hidden_size,), self.norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, D) -> (S, V) in float32."""
        return self.lm_head(hidden).float()
