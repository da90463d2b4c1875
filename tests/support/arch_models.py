"""Tiny random models of many mlx-lm architectures, float or quantized, for tests.

Each model is built by mlx-lm's own classes from a small config, so its tensors carry the names `mlx_lm.load`
expects (the MLX layout: the model's `sanitize` leaves them alone). The tensors outside the layers (embeddings,
final norm, head) go into the first safetensors file, the layers `layers_per_file` at a time into the next,
and `model.safetensors.index.json` names each tensor's file. Tokenizer and chat template are model_factory's.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.utils import _get_classes, quantize_model
from tokenizers import Tokenizer

from shardline.model_files import tensor_layer
from tests.support.model_factory import (
    EOS_TOKEN,
    INDEX_FILE,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    remove_stale_shards,
    token_id,
    train_tokenizer,
    write_json,
    write_tokenizer,
)

VOCAB_SIZE = 512

# What every architecture shares: 4 query and 2 KV heads, so tensor parallelism over 2 ranks divides them.
BASE_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB_SIZE,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}

# MLX's CPU gather_mm, which multiplies by unquantized experts, supports only float32.
_MOE = {"torch_dtype": "float32", "num_experts_per_tok": 2, "moe_intermediate_size": 32}
_QWEN_MOE = {**_MOE, "num_experts": 4, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}

# model_type -> what its config adds to or changes in BASE_CONFIG.
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"]},
    "mistral": {"architectures": ["MistralForCausalLM"]},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"]},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], **_QWEN_MOE},
    # Local layers see 8 tokens, fewer than a short prompt; every third layer (2, 5, ...) is global.
    "gemma3_text": {
        "architectures": ["Gemma3ForCausalLM"],
        "sliding_window": 8,
        "sliding_window_pattern": 3,
        "query_pre_attn_scalar": 16,
        "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma2": {
        "architectures": ["Gemma2ForCausalLM"],
        "query_pre_attn_scalar": 16,
        "sliding_window": 8,
        "tie_word_embeddings": True,  # mlx-lm's gemma2 always ties
    },
    "phi3": {"architectures": ["Phi3ForCausalLM"]},
    "olmo2": {"architectures": ["Olmo2ForCausalLM"]},
    "granite": {
        "architectures": ["GraniteForCausalLM"],
        "logits_scaling": 1.0,
        "attention_multiplier": 0.25,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "attention_bias": False,
        "mlp_bias": False,
    },
    "starcoder2": {"architectures": ["Starcoder2ForCausalLM"], "norm_epsilon": 1e-5},
    # Sliding-window (8 tokens) and full attention layers alternate: layer_types is filled in by arch_config.
    "gpt_oss": {
        "architectures": ["GptOssForCausalLM"],
        **_MOE,
        "num_local_experts": 4,
        "sliding_window": 8,
    },
    # Multi-head latent attention; layer 0 dense, the others routed experts plus a shared one.
    "deepseek_v3": {
        "architectures": ["DeepseekV3ForCausalLM"],
        **_MOE,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "first_k_dense_replace": 1,
    },
    # Hybrid: linear attention (gated delta net, an ArraysCache) in three of every four layers, full attention
    # (a KVCache) in the fourth (3, 7, ...); experts in every layer.
    "qwen3_next": {
        "architectures": ["Qwen3NextForCausalLM"],
        **_QWEN_MOE,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "shared_expert_intermediate_size": 32,
        "partial_rotary_factor": 0.5,
        "full_attention_interval": 4,
    },
}

# Standard deviations of the random weights, found by trial (seeds 0-5, untied and tied, a plain and a chat
# prompt): embeddings larger than what a layer adds keep greedy decoding from settling on one token, and
# layers strong enough that zeroing any one of them changes the answer. A tied head (logits = embeddings .
# hidden state) would echo the last token, so there the embeddings are small and the layers lead.
EMBED_STD = 1.0
TIED_EMBED_STD = 0.05
LAYER_STD = 0.3
BIAS_STD = 0.02
HEAD_STD = 0.05


def make_arch_model(
    dest: Path,
    arch: str,
    *,
    num_layers: int = 6,
    seed: int = 0,
    quantize: int | None = None,
    mixed: bool = False,
    tie: bool | None = None,
    group_size: int = 32,
    layers_per_file: int = 2,
    dtype: str | None = None,
) -> Path:
    """Write a random `arch` model that `mlx_lm.load(str(dest))` loads; return `dest`.

    `quantize` (4 or 8 bits) quantizes it as `mlx_lm.convert -q --q-bits quantize` does (affine, `group_size`);
    `mixed` gives even layers and the head 8 bits instead, recorded per path as convert's mixed recipes do.
    `tie` ties the head to the embeddings (None: as ARCHS says); an architecture that cannot raises ValueError.
    `dtype` ("float32", ...) overrides the architecture's (float16, float32 for experts on MLX's CPU).
    Deterministic in `seed`; reseeds MLX's global random state. Existing model*.safetensors in `dest` go first.
    """
    if mixed and quantize is None:
        raise ValueError("mixed needs quantize")
    tokenizer = cached_tokenizer()
    config = arch_config(arch, num_layers, tie, tokenizer)
    if dtype is not None:
        config["torch_dtype"] = dtype
    model = random_model(config, seed, special_ids=[token_id(tokenizer, t) for t in SPECIAL_TOKENS])
    if quantize is not None:
        predicate = mixed_predicate(group_size, quantize) if mixed else None
        with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints its bits per weight
            model, config = quantize_model(model, config, group_size, quantize, quant_predicate=predicate)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_shards(dest)
    write_tokenizer(dest, tokenizer)
    write_json(dest / "config.json", config)
    write_weights(dest, dict(tree_flatten(model.parameters())), layers_per_file)
    return dest


@cache
def cached_tokenizer() -> Tokenizer:
    return train_tokenizer(VOCAB_SIZE)


def arch_config(arch: str, num_layers: int, tie: bool | None, tokenizer: Tokenizer) -> dict[str, Any]:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}")
    config = {"model_type": arch, **BASE_CONFIG, **ARCHS[arch], "num_hidden_layers": num_layers}
    if tie is not None:
        config["tie_word_embeddings"] = tie
    if arch == "gpt_oss":
        config["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(num_layers)]
    # Without these transformers' config classes fill in their own ids, outside the vocabulary.
    eos, pad = token_id(tokenizer, EOS_TOKEN), token_id(tokenizer, PAD_TOKEN)
    return config | {"eos_token_id": eos, "pad_token_id": pad, "bos_token_id": None}


def random_model(config: dict[str, Any], seed: int, *, special_ids: list[int]) -> nn.Module:
    """The model `config` describes, with random weights: see `redraw`."""
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    weights = model_weights(model, tie=config["tie_word_embeddings"])
    tied = "lm_head.weight" not in dict(tree_flatten(model.parameters()))
    if tied != config["tie_word_embeddings"]:
        raise ValueError(f"mlx-lm's {config['model_type']} cannot {'un' if tied else ''}tie its embeddings")
    weights = {name: redraw(name, value, tied) for name, value in weights.items()}
    # Zero logits for the special tokens, as model_factory does: greedy decoding never stops at EOS.
    weights["model.embed_tokens.weight" if tied else "lm_head.weight"][mx.array(special_ids)] = 0.0
    model.load_weights(list(weights.items()), strict=True)
    dtype = getattr(mx, config["torch_dtype"])
    keep = getattr(model, "cast_predicate", lambda _: True)  # what mlx_lm.convert leaves in its own dtype
    model.update(tree_map_with_path(lambda k, v: v.astype(dtype) if keep(k) else v, model.parameters()))
    mx.eval(model.parameters())
    return model


def model_weights(model: nn.Module, *, tie: bool) -> dict[str, mx.array]:
    """The model's tensors as mlx_lm.load would see them in a checkpoint."""
    weights = dict(tree_flatten(model.parameters()))
    if tie:
        # gemma3_text ties by the head's absence from the checkpoint: its sanitize then drops the head module.
        weights.pop("lm_head.weight", None)
    return model.sanitize(weights) if hasattr(model, "sanitize") else weights


def redraw(name: str, value: mx.array, tied: bool) -> mx.array:
    """Matrices and biases from a normal; norms and other vectors (A_log, dt_bias, sinks) as the class made them."""
    if "norm" in name or (value.ndim < 2 and not name.endswith(".bias")):
        return value
    if name.endswith(".bias"):
        std = BIAS_STD
    elif name.startswith("model.embed_tokens."):
        std = TIED_EMBED_STD if tied else EMBED_STD
    else:
        std = HEAD_STD if name.startswith("lm_head.") else LAYER_STD
    return std * mx.random.normal(value.shape)


def mixed_predicate(group_size: int, bits: int) -> Callable[[str, nn.Module], dict[str, Any]]:
    """Per-path quantization, as mlx_lm.convert's mixed recipes write it: 8 bits for even layers and the head."""

    def predicate(path: str, module: nn.Module) -> dict[str, Any]:
        layer = tensor_layer(f"{path}.")
        high = path == "lm_head" or (layer is not None and layer % 2 == 0)
        return {"group_size": group_size, "bits": 8 if high else bits, "mode": "affine"}

    return predicate


def write_weights(dest: Path, weights: dict[str, mx.array], layers_per_file: int) -> None:
    files: dict[int, dict[str, mx.array]] = {}
    for name, value in weights.items():
        layer = tensor_layer(name)
        files.setdefault(-1 if layer is None else layer // layers_per_file, {})[name] = value
    weight_map: dict[str, str] = {}
    for index, key in enumerate(sorted(files)):
        filename = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        mx.save_safetensors(str(dest / filename), files[key], metadata={"format": "mlx"})
        weight_map |= dict.fromkeys(sorted(files[key]), filename)
    total_size = sum(value.nbytes for value in weights.values())
    write_json(dest / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def index_weight_map(dest: Path) -> dict[str, str]:
    return json.loads((dest / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
