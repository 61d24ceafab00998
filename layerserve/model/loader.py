"""Weights and configs from GGUF files and Hugging Face directories -> (ModelConfig, state dict).

The state dict always uses Hugging Face parameter names (`model.layers.0.self_attn.q_proj.weight`)
and HF conventions (rotate-half RoPE), whatever the source, so the model code has one shape to read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from layerserve.config import ModelConfig
from layerserve.model.gguf_tensors import decode_tensor, tensor_nbytes
from layerserve.text.gguf_metadata import read_gguf

_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_DENSE_GGML_TYPES = {0, 1, 30}  # F32, F16, BF16
# GGUF architectures whose converter permuted Q/K rows for interleaved RoPE.
_PERMUTED_QK = {"llama", "mistral"}


class ModelLoadError(Exception):
    """The model file or directory cannot be loaded (missing, unsupported, malformed)."""


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    weights: dict[str, torch.Tensor]  # HF names
    rope_freq_factors: torch.Tensor | None = None  # GGUF `rope_freqs.weight` (llama3 scaling, precomputed)
    quantized: bool = False  # the file stores its projection weights quantized (GGUF Q4_0, Q8_0, K-quants...)


def load_model_files(path: str | os.PathLike, dtype: torch.dtype = torch.float32, progress: bool = True) -> LoadedModel:
    """Load a GGUF file or a HF directory (config.json + *.safetensors)."""
    p = Path(path)
    if p.is_dir():
        return _load_hf_dir(p, dtype, progress)
    if p.is_file() and p.suffix == ".gguf":
        return _load_gguf(p, dtype, progress)
    raise ModelLoadError(f"{path}: not a .gguf file or a directory with config.json")


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE -> HF rotate-half)."""
    rows = w.shape[0]
    # (n_head, head_dim/2, 2, ...) -> (n_head, 2, head_dim/2, ...)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(metadata: dict, tensor_names: set[str]) -> ModelConfig:
    """ModelConfig from GGUF metadata `{arch}.*` keys."""
    arch = metadata["general.architecture"]

    def get(key: str, default=None):
        return metadata.get(f"{arch}.{key}", default)

    n_embd = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    vocab = get("vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    return ModelConfig(
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=n_embd,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=n_head,
        num_kv_heads=int(get("attention.head_count_kv", n_head)),
        head_dim=int(get("attention.key_length", n_embd // n_head)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
    )


def _load_gguf(path: Path, dtype: torch.dtype, progress: bool) -> LoadedModel:
    metadata, infos = read_gguf(path)
    config = gguf_config(metadata, {t.name for t in infos})
    arch = config.architecture
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    weights: dict[str, torch.Tensor] = {}
    freq_factors = None
    quantized = False
    for t in tqdm(infos, desc=f"loading {path.name}", unit="tensor", disable=not progress):
        data = raw[t.offset:t.offset + tensor_nbytes(t.ggml_type, t.shape)]
        tensor = decode_tensor(data, t.ggml_type, t.shape)
        if t.name == "rope_freqs.weight":
            freq_factors = tensor
            continue
        name = _hf_name(t.name)
        if name is None:
            raise ModelLoadError(f"{path.name}: unexpected tensor {t.name}")
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = _unpermute_qk(tensor, config.num_heads)
        elif arch in _PERMUTED_QK and name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = _unpermute_qk(tensor, config.num_kv_heads)
        weights[name] = tensor.to(dtype)
        if name.endswith("proj.weight") and t.ggml_type not in _DENSE_GGML_TYPES:
            quantized = True
    return LoadedModel(config=config, weights=weights, rope_freq_factors=freq_factors, quantized=quantized)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_TO_HF[parts[2]]}"
    return None


_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def hf_config(raw: dict) -> ModelConfig:
    """ModelConfig from a HF config.json dict."""
    archs = raw.get("architectures") or []
    arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), raw.get("model_type"))
    if arch not in set(_HF_ARCHS.values()):
        raise ModelLoadError(f"unsupported architecture {archs or raw.get('model_type')!r}")
    n_head = raw["num_attention_heads"]
    # transformers >= 5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    return ModelConfig(
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=n_head,
        num_kv_heads=raw.get("num_key_value_heads") or n_head,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // n_head,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=raw.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
        qk_norm=arch == "qwen3",
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window") else None,
    )


def _load_hf_dir(path: Path, dtype: torch.dtype, progress: bool) -> LoadedModel:
    from safetensors import safe_open

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json")
    config = hf_config(json.loads(cfg_file.read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc=f"loading {path.name}", unit="file", disable=not progress):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                weights[key] = st.get_tensor(key).to(dtype)
    return LoadedModel(config=config, weights=weights)
