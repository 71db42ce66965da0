"""Small llama models in mlx-lm's format: a byte-level BPE tokenizer, config, weights; builtin:tiny's recipe."""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from tokenizers import Tokenizer

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
]
EOS = "<|endoftext|>"
_TINY_VOCAB_SIZE = 384
# Long enough for the streams tests hold open; random weights and RoPE make any length work.
_TINY_CONTEXT = 32768
_TINY_SEED = 0
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# builtin:pydoc-chat's: an answer ends with the end-of-text token, the model's stop token.
CHAT_TEMPLATE_EOS_ANSWERS = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}<|endoftext|>{% else %}<|end|>{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tiny(folder: Path) -> None:
    """Write a random-weight llama that mlx-lm loads, byte-identical every time."""
    tokenizer = train_bpe_tokenizer([_zen_of_python()], _TINY_VOCAB_SIZE)
    config = llama_config(
        tokenizer,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        context=_TINY_CONTEXT,
        dtype="float32",
    )
    _save_weights(random_llama_weights(config, _TINY_SEED), folder / "model.safetensors")
    write_model_files(folder, tokenizer, config)


def _zen_of_python() -> str:
    # Parse this.py instead of importing it: the import prints to stdout, and
    # redirecting sys.stdout is not thread-safe inside a server.
    spec = importlib.util.find_spec("this")
    if spec is None or spec.origin is None:
        raise RuntimeError("cannot build builtin:tiny: the stdlib module 'this' is missing")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "s":
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    raise RuntimeError("cannot build builtin:tiny: no text found in 'this'")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with our special tokens, trained on ``texts`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # mlx-lm picks its streaming BPE detokenizer from this ByteLevel decoder.
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def llama_config(
    tokenizer: Tokenizer,
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    context: int,
    dtype: str,
) -> dict[str, Any]:
    """A Hugging Face style llama ``config.json`` (tied embeddings) for ``tokenizer``."""
    eos_id = tokenizer.token_to_id(EOS)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "intermediate_size": intermediate_size,
        "hidden_act": "silu",
        "vocab_size": tokenizer.get_vocab_size(),
        "max_position_embeddings": context,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": dtype,
    }


def write_model_files(
    folder: Path, tokenizer: Tokenizer, config: dict[str, Any], chat_template: str | None = None
) -> None:
    """Write everything but the weights: ``config.json`` and the tokenizer with its chat template."""
    _write_json(folder / "config.json", config)
    (folder / "tokenizer.json").write_text(tokenizer.to_str(pretty=True) + "\n", encoding="utf-8")
    template = chat_template or _CHAT_TEMPLATE
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(config["max_position_embeddings"], template))
    _write_json(
        folder / "special_tokens_map.json",
        {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS},
    )


def random_llama_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Llama weights under mlx-lm's names (tied embeddings), drawn in a fixed order from ``seed``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden = config["hidden_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    inner = config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inner, hidden),
            p + "mlp.up_proj.weight": (inner, hidden),
            p + "mlp.down_proj.weight": (hidden, inner),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    # Draw in a fixed order so every run yields the same numbers.
    return {
        name: np.ones(shape, np.float32)
        if name.endswith("norm.weight")
        else (rng.standard_normal(shape) * 0.02).astype(np.float32)
        for name, shape in shapes.items()
    }


def _save_weights(weights: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file(weights, str(path), metadata={"format": "mlx"})


def _tokenizer_config(context: int, chat_template: str) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": EOS,
        # transformers 5 reads this v4 name too (as extra_special_tokens).
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "model_max_length": context,
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
