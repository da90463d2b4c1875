"""Random-weight llama (or qwen2) models in MLX layout, for tests and benchmarks.

The weights are split into safetensors files by layer, so a process that
serves only some layers needs only some files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<|endoftext|>"
BOS_CHAT_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_CHAT_TOKEN, EOS_TOKEN)
WEIGHT_SCALE = 0.02
DTYPE = np.float16
INDEX_FILE = "model.safetensors.index.json"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A cluster of machines can run a large language model when each one holds a few layers.",
    "Every worker loads its shard of the weights, then waits for activations from the previous stage.",
    "The scheduler keeps the state of the cluster in durable workflows, so nothing is lost on restart.",
    "When a node fails, the controller moves its layers to another node and resumes the requests.",
    "Tokens stream back to the client one at a time, as soon as the last stage has produced them.",
    "She opened the window and listened to the rain falling on the roof of the old house.",
    "They walked along the beach in the morning, talking about the books they had read that year.",
    "Good software is tested often, measured carefully, and changed in small and simple steps.",
    "The market in the town square sells bread, cheese, apples, honey, and fresh flowers every Saturday.",
    "He wrote a letter to his friend, describing the mountains, the lakes, and the long winter nights.",
    "Numbers such as 1, 2, 3, 10, 42, 100, and 2024 appear in many ordinary sentences.",
    "Questions like who, what, where, when, why, and how help us understand the world around us.",
    "The teacher explained that practice, patience, and curiosity matter more than talent alone.",
    "Download the model, check every file against its hash, and only then start serving requests.",
    "In the evening the city lights came on, and the streets filled with people going home.",
    "Hello! How are you today? I am fine, thank you. Would you like some tea or coffee?",
    "Please summarize the following text in one short paragraph, keeping the important details.",
)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    model_type: str = "llama"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def make_tiny_model(
    dest: Path,
    *,
    num_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    num_files: int = 3,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    model_type: str = "llama",
) -> Path:
    """Write a random model loadable by `mlx_lm.load(str(dest))`; return `dest`.

    `model_type` is "llama" or "qwen2" (qwen2 adds q/k/v biases and supports
    pipeline parallelism in mlx_lm). Weights are deterministic in `seed` (and
    independent of `num_files`). Existing `model*.safetensors` files in `dest`
    are deleted first.
    """
    shape = ModelShape(
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        model_type=model_type,
    )
    validate_shape(shape, num_files)
    dest.mkdir(parents=True, exist_ok=True)
    remove_stale_shards(dest)
    tokenizer = train_tokenizer(vocab_size)
    write_tokenizer(dest, tokenizer)
    special_ids = [token_id(tokenizer, token) for token in SPECIAL_TOKENS]
    write_config(dest, shape, eos_token_id=token_id(tokenizer, EOS_TOKEN))
    write_weights(dest, shape, num_files=num_files, seed=seed, special_ids=special_ids)
    return dest


def make_bench_model(dest: Path, target_mb: int = 600, *, seed: int = 0) -> Path:
    """Write a random llama model of about `target_mb` megabytes (10**6 bytes)."""
    hidden_size = bench_hidden_size(target_mb)
    intermediate_size = bench_intermediate_size(hidden_size)
    num_heads = max(hidden_size // 128, 4)
    num_layers = bench_num_layers(target_mb, hidden_size, intermediate_size, num_heads)
    return make_tiny_model(
        dest,
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_heads=num_heads,
        num_kv_heads=num_heads // 4,
        num_files=min(num_layers, 8),
        seed=seed,
    )


def bench_hidden_size(target_mb: int) -> int:
    # The widest hidden size that still leaves room for at least four layers.
    for hidden_size in (2048, 1024, 512, 256):
        if 4 * approx_layer_bytes(hidden_size, bench_intermediate_size(hidden_size)) <= target_mb * 10**6:
            return hidden_size
    return 128


def bench_intermediate_size(hidden_size: int) -> int:
    return hidden_size * 11 // 4


def approx_layer_bytes(hidden_size: int, intermediate_size: int) -> int:
    attention = 2 * hidden_size * hidden_size + 2 * hidden_size * hidden_size // 4
    return (attention + 3 * hidden_size * intermediate_size) * np.dtype(DTYPE).itemsize


def bench_num_layers(target_mb: int, hidden_size: int, intermediate_size: int, num_heads: int) -> int:
    shape = ModelShape(1, hidden_size, intermediate_size, num_heads, num_heads // 4, 512, False)
    layer_bytes = sum(tensor_bytes(dims) for _, dims in layer_tensors(shape, 0))
    outer_bytes = sum(tensor_bytes(dims) for _, dims in outer_tensors(shape))
    return max(2, round((target_mb * 10**6 - outer_bytes) / layer_bytes))


def remove_stale_shards(dest: Path) -> None:
    # mlx_lm loads every model*.safetensors, so shards of an earlier model would leak in.
    for stale in dest.glob("model*.safetensors"):
        stale.unlink()


def validate_shape(shape: ModelShape, num_files: int) -> None:
    if shape.model_type not in ARCHITECTURES:
        raise ValueError(f"model_type must be one of {sorted(ARCHITECTURES)}")
    if shape.hidden_size % shape.num_heads != 0:
        raise ValueError("hidden_size must be a multiple of num_heads")
    if shape.num_heads % shape.num_kv_heads != 0:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if shape.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level tokenizer")
    if not 1 <= num_files <= shape.num_layers:
        raise ValueError("num_files must be between 1 and num_layers")


def train_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    pad_vocab(tokenizer, vocab_size)
    return tokenizer


def pad_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    # The small corpus runs out of merges for large vocabularies; filler tokens
    # keep every embedding row decodable.
    missing = vocab_size - tokenizer.get_vocab_size()
    fillers = [AddedToken(f"<|filler_{i}|>", special=False) for i in range(missing)]
    tokenizer.add_tokens(fillers)


def token_id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"token {token!r} missing from the vocabulary")
    return found


def write_tokenizer(dest: Path, tokenizer: Tokenizer) -> None:
    tokenizer.save(str(dest / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(dest / "tokenizer_config.json", tokenizer_config)
    write_json(dest / "special_tokens_map.json", {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN})


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def write_config(dest: Path, shape: ModelShape, *, eos_token_id: int) -> None:
    config = {
        "model_type": shape.model_type,
        "architectures": [ARCHITECTURES[shape.model_type]],
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "tie_word_embeddings": shape.tie_word_embeddings,
        "eos_token_id": eos_token_id,
        "torch_dtype": np.dtype(DTYPE).name,
    }
    write_json(dest / "config.json", config)


def write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def layer_tensors(shape: ModelShape, layer: int) -> list[tuple[str, tuple[int, ...]]]:
    prefix = f"model.layers.{layer}"
    hidden, inter, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    tensors = [
        (f"{prefix}.input_layernorm.weight", (hidden,)),
        (f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)),
        (f"{prefix}.self_attn.k_proj.weight", (kv, hidden)),
        (f"{prefix}.self_attn.v_proj.weight", (kv, hidden)),
        (f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
        (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
        (f"{prefix}.mlp.gate_proj.weight", (inter, hidden)),
        (f"{prefix}.mlp.up_proj.weight", (inter, hidden)),
        (f"{prefix}.mlp.down_proj.weight", (hidden, inter)),
    ]
    if shape.model_type == "qwen2":
        # Appended, so the llama tensors keep their seeds.
        tensors += [
            (f"{prefix}.self_attn.q_proj.bias", (hidden,)),
            (f"{prefix}.self_attn.k_proj.bias", (kv,)),
            (f"{prefix}.self_attn.v_proj.bias", (kv,)),
        ]
    return tensors


def outer_tensors(shape: ModelShape) -> list[tuple[str, tuple[int, ...]]]:
    tensors = [
        ("model.embed_tokens.weight", (shape.vocab_size, shape.hidden_size)),
        ("model.norm.weight", (shape.hidden_size,)),
    ]
    if not shape.tie_word_embeddings:
        tensors.append(("lm_head.weight", (shape.vocab_size, shape.hidden_size)))
    return tensors


def tensor_bytes(dims: tuple[int, ...]) -> int:
    return int(np.prod(dims)) * np.dtype(DTYPE).itemsize


def layer_groups(num_layers: int, num_files: int) -> list[list[int]]:
    """Split layer numbers into `num_files` contiguous, nearly equal runs."""
    base, extra = divmod(num_layers, num_files)
    groups: list[list[int]] = []
    start = 0
    for index in range(num_files):
        size = base + (1 if index < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def file_plan(shape: ModelShape, num_files: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors of each file: embeddings go first, final norm and lm_head last."""
    embed, norm, *head = outer_tensors(shape)
    plan = [
        [tensor for layer in group for tensor in layer_tensors(shape, layer)]
        for group in layer_groups(shape.num_layers, num_files)
    ]
    plan[0].insert(0, embed)
    plan[-1].extend([norm, *head])
    return plan


def shard_name(index: int, num_files: int) -> str:
    return f"model-{index + 1:05d}-of-{num_files:05d}.safetensors"


def tensor_seeds(shape: ModelShape, seed: int) -> dict[str, list[int]]:
    # Each tensor gets its own stream, so its values do not depend on num_files.
    names = [name for name, _ in outer_tensors(shape)]
    names += [name for layer in range(shape.num_layers) for name, _ in layer_tensors(shape, layer)]
    return {name: [seed, index] for index, name in enumerate(names)}


def output_projection(shape: ModelShape) -> str:
    return "model.embed_tokens.weight" if shape.tie_word_embeddings else "lm_head.weight"


def make_tensor(name: str, dims: tuple[int, ...], seed: list[int], zero_rows: list[int]) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(dims, dtype=DTYPE)
    # Uniform noise with std WEIGHT_SCALE: about twice as fast as a normal draw.
    bound = WEIGHT_SCALE * np.sqrt(3.0)
    values = np.random.default_rng(seed).random(dims, dtype=np.float32)
    values *= 2 * bound
    values -= bound
    values[zero_rows] = 0.0
    return values.astype(DTYPE)


def write_weights(dest: Path, shape: ModelShape, *, num_files: int, seed: int, special_ids: list[int]) -> None:
    seeds = tensor_seeds(shape, seed)
    # Zero logits for special tokens: greedy decoding never picks EOS, so
    # generation always runs to max_tokens and always yields text.
    zero_rows = {output_projection(shape): special_ids}
    weight_map: dict[str, str] = {}
    total_size = 0
    for index, tensors in enumerate(file_plan(shape, num_files)):
        filename = shard_name(index, num_files)
        arrays = {name: make_tensor(name, dims, seeds[name], zero_rows.get(name, [])) for name, dims in tensors}
        save_file(arrays, str(dest / filename), metadata={"format": "mlx"})
        total_size += sum(array.nbytes for array in arrays.values())
        weight_map.update(dict.fromkeys(arrays, filename))
    write_json(dest / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def files_for_layers(model_dir: Path, layers: range) -> list[str]:
    """The safetensors files holding the given layers, as named in the index."""
    weight_map: dict[str, str] = json.loads((model_dir / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
    prefixes = tuple(f"model.layers.{layer}." for layer in layers)
    return sorted({filename for key, filename in weight_map.items() if key.startswith(prefixes)})


# A model that calls a tool, deterministically. Every layer's output projections are zero, so the last
# hidden state is the last token's embedding; lm_head's row for token b is the (normalised) embedding of
# the token a that must come before it, so greedy decoding follows a fixed chain from the prompt's last
# token. Each piece of the output is one added token.
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOL_ANSWER = "It is sunny in Paris today."
PLAIN_ANSWER = "Hello from the chain model."
AFTER_TOOL = "<|after_tool|>"  # the template ends the prompt with it when the last message is a tool's result
PLAIN_TURN = "<|no_tools|>"  # and with this when no tools were offered
TOOL_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n# Tools\\n' }}{% for tool in tools %}{{ tool | tojson }}\\n{% endfor %}"
    '{{ \'Call one inside <tool_call></tool_call> as {"name": ..., "arguments": ...}<|im_end|>\\n\' }}{%- endif %}'
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\\n' }}{% for call in message['tool_calls'] %}"
    "{%- set tool_call = call.function if call.function is defined else call %}"
    '{{ \'<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' + (tool_call.arguments | tojson) }}'
    "{{ '}\\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if messages[-1]['role'] == 'tool' %}{{ '" + AFTER_TOOL + "' }}"
    "{%- elif not tools %}{{ '" + PLAIN_TURN + "' }}{%- endif %}{%- endif %}"
)


def tool_call_text(name: str, arguments: dict[str, object]) -> str:
    """A call as the tool model's family writes it (mlx-lm's json_tools parser reads it back)."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def make_tool_model(
    dest: Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    call: str = TOOL_CALL,
    answer: str = TOOL_ANSWER,
    context: int = 4096,
) -> Path:
    """A llama whose chat template mlx-lm recognises as a tool-calling one (json_tools) and whose greedy answer is:
    with tools offered, `call` then end; after a tool's result, `answer` then end; with no tools, PLAIN_ANSWER.
    `context`: its max_position_embeddings (an agent's prompt is tens of thousands of this tokenizer's tokens)."""
    make_tiny_model(dest, num_layers=2, num_files=1, vocab_size=vocab_size, hidden_size=hidden_size)
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in (call, answer, PLAIN_ANSWER)])
    tokenizer.add_special_tokens([AFTER_TOOL, PLAIN_TURN])
    tokenizer.save(str(dest / "tokenizer.json"))
    config_path = dest / "tokenizer_config.json"
    write_json(config_path, {**json.loads(config_path.read_text()), "chat_template": TOOL_TEMPLATE})
    ids = {t: token_id(tokenizer, t) for t in (call, answer, PLAIN_ANSWER, AFTER_TOOL, PLAIN_TURN, EOS_TOKEN)}
    turn_end = tokenizer.encode("<|im_start|>assistant\n").ids[-1]
    chain = {
        turn_end: ids[call],
        ids[call]: ids[EOS_TOKEN],
        ids[AFTER_TOOL]: ids[answer],
        ids[answer]: ids[EOS_TOKEN],
        ids[PLAIN_TURN]: ids[PLAIN_ANSWER],
        ids[PLAIN_ANSWER]: ids[EOS_TOKEN],
    }
    write_chain_weights(dest, tokenizer.get_vocab_size(), chain)
    config = json.loads((dest / "config.json").read_text())
    write_json(dest / "config.json", {**config, "max_position_embeddings": context})
    return dest


def write_chain_weights(dest: Path, vocab: int, chain: dict[int, int]) -> None:
    from safetensors.numpy import load_file

    (path,) = dest.glob("model-*.safetensors")
    weights = load_file(str(path))
    hidden = weights["model.embed_tokens.weight"].shape[1]
    embed = np.random.default_rng(7).standard_normal((vocab, hidden)).astype(np.float32)
    head = np.zeros((vocab, hidden), dtype=np.float32)
    for before, after in chain.items():
        head[after] += embed[before] / np.sqrt(np.mean(embed[before] ** 2))  # what the final RMS norm makes of it
    weights["model.embed_tokens.weight"] = embed.astype(DTYPE)
    weights["lm_head.weight"] = head.astype(DTYPE)
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = np.zeros_like(weights[name])
    save_file(weights, str(path), metadata={"format": "mlx"})
    config = json.loads((dest / "config.json").read_text())
    write_json(dest / "config.json", {**config, "vocab_size": vocab})
    index = json.loads((dest / INDEX_FILE).read_text())
    index["metadata"]["total_size"] = sum(w.nbytes for w in weights.values())
    write_json(dest / INDEX_FILE, index)


MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}[INST]{{ message['content'] }}[/INST]"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "[TOOL_CALLS]{{ call.function.name }}[ARGS]{{ call.function.arguments | tojson }}{% endfor %}</s>"
    "{%- elif message['role'] == 'tool' %}[TOOL_RESULTS]{{ message['content'] }}[/TOOL_RESULTS]"
    "{%- else %}{{ message['content'] or '' }}</s>{%- endif %}{%- endfor %}"
)


def make_mistral_tool_model(dest: Path) -> Path:
    """A tiny llama with a Mistral-style tool template (mlx-lm reads it as the `mistral` family: `[TOOL_CALLS]name
    [ARGS]{...}`, no end marker) and both markers single special tokens, as in Mistral's own tokenizers. Its
    weights say nothing: what it writes is whatever a grammar lets through."""
    return make_family_tool_model(dest, MISTRAL_TEMPLATE, ["[TOOL_CALLS]", "[ARGS]"])


QWEN3_CODER_TEMPLATE = (
    "{%- if tools %}<tools>{{ tools | tojson }}</tools>Call as <tool_call>\n<function=name>\n"
    "<parameter=key>\nvalue\n</parameter>\n</function>\n</tool_call>{%- endif %}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def make_family_tool_model(dest: Path, template: str, markers: list[str]) -> Path:
    """A tiny llama whose chat template mlx-lm reads as one tool-call family, its markers single special tokens
    as in that family's own tokenizers. Its weights say nothing (every logit equal): what it writes is whatever
    a grammar lets through."""
    make_tiny_model(dest, num_layers=2, num_files=1, vocab_size=512, hidden_size=64)
    tokenizer = Tokenizer.from_file(str(dest / "tokenizer.json"))
    tokenizer.add_special_tokens(markers)
    tokenizer.save(str(dest / "tokenizer.json"))
    config_path = dest / "tokenizer_config.json"
    write_json(config_path, {**json.loads(config_path.read_text()), "chat_template": template})
    write_chain_weights(dest, tokenizer.get_vocab_size(), {})
    return dest
