"""Our checkpoint dirs out to the Hugging Face layout: weights in its names, a LlamaConfig, and the
tokenizer files with a chat template equal to our format, so transformers and the engines built on it
stop on the EOT."""

import re
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from lit_llama.checkpoint import CONFIG_FILE, MODEL_FILE, read_config, read_weights
from lit_llama.convert import HF, HF_CONFIG_FILE, DType, torch_dtype
from lit_llama.errors import BadValue, MissingFile
from lit_llama.files import check_writable, require_dir, write_json, write_with
from lit_llama.model import LLaMAConfig
from lit_llama.tokenizer import Tokenizer

VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")


def hf_state(state: dict[str, torch.Tensor], config: LLaMAConfig,
             dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Our state dict in Hugging Face names: token rows cut to vocab_size, c_attn split into q, k, v."""
    top = {ours: hf for hf, ours in HF.top.items()}
    block = {ours: hf for hf, ours in HF.block.items() if hf not in HF.qkv}
    q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
    out = {}
    for name, tensor in state.items():
        tensor = tensor if dtype is None else tensor.to(dtype)
        if name in top:
            out[top[name]] = tensor[: config.vocab_size] if name in VOCAB_ROWS else tensor
            continue
        match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
        if match is None or (match[2] not in block and match[2] != "attn.c_attn.weight"):
            raise BadValue(f"unexpected tensor {name!r} in the checkpoint (a LoRA out dir must be merged first)")
        i, suffix = match.groups()
        prefix = f"{HF.block_prefix}{i}."
        if suffix == "attn.c_attn.weight":
            # row slices of one tensor: safetensors writes them without a copy
            out.update({prefix + n: t for n, t in zip(HF.qkv, tensor.split((q_size, kv_size, kv_size)))})
        else:
            out[prefix + block[suffix]] = tensor
    return out


def hf_config(config: LLaMAConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict:
    """A LlamaConfig for our model (Llama with grouped-query attention also covers Mistral's weights)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": config.vocab_size,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.stop_ids[0],  # the EOT when there is one: converters (llama.cpp's) read it here
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def chat_template(eot: str, roles: dict[str, str]) -> str:
    """lit_llama/prompts.py's format as a Jinja chat template: <bos> [system <EOT>] user <EOT> assistant
    <EOT> ..., each turn after its role token when the tokenizer has them (`roles`: role -> token). An
    optional system message first, then user and assistant alternating, user first; anything else
    raises. add_generation_prompt needs a conversation that ends with a user turn, and adds the
    assistant's role token (without role tokens, nothing: the model's turn simply comes next)."""
    marker = ("{{ " + repr(roles) + "[message['role']] }}") if roles else ""
    opening = roles.get("assistant", "")
    return (
        "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}"
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{%- set expected = 'system' if loop.index0 < offset else ['user', 'assistant'][(loop.index0 - offset) % 2] -%}"
        "{%- if message['role'] != expected -%}"
        "{{ raise_exception('message ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ ', expected ' ~ expected"
        " ~ ': an optional system message first, then user and assistant alternating, user first') }}"
        "{%- endif -%}"
        + marker + "{{ message['content'] }}" + eot +
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{%- if messages | length == offset or messages[-1]['role'] != 'user' -%}"
        "{{ raise_exception('add_generation_prompt needs a conversation that ends with a user message') }}"
        "{%- endif -%}" + opening +
        "{%- endif -%}"
    )


def hf_pad_id(tokenizer: Tokenizer) -> int:
    """The export's pad token once the EOT is its eos: unk, which a model never writes (else the old eos)."""
    unk = tokenizer.processor.unk_id()
    return unk if unk >= 0 else tokenizer.eos_id


def hf_tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for transformers' LlamaTokenizer, which reads
    our tokenizer.model with the same ids. Our special tokens (the EOT) become special added tokens.
    With an EOT, it is the eos token, as in chat fine-tunes: tools that stop on a single eos (llama.cpp,
    through its converter) stop on it; unk pads batches."""
    piece = tokenizer.processor.id_to_piece
    roles = {"unk_token": tokenizer.processor.unk_id(), "bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id}
    named = {role: piece(i) for role, i in roles.items() if i >= 0}
    special = {**{piece(i): i for i in roles.values() if i >= 0}, **tokenizer.special_tokens}
    added = {str(i): {"content": content, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                      "single_word": False} for content, i in sorted(special.items(), key=lambda item: item[1])}
    if tokenizer.eot_id is not None:
        named["eos_token"] = piece(tokenizer.eot_id)
        named["pad_token"] = piece(hf_pad_id(tokenizer))
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **named,
        "add_bos_token": True,
        "add_eos_token": False,
        # "▁" starts every text segment, also the one after a special token: our format encodes each
        # turn on its own, so "user<|eot|>assistant" gets the ids of our training data
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": block_size,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(tokenizer.special_tokens),
    }
    if tokenizer.eot_id is not None:
        roles = {role: piece(i) for role, i in tokenizer.roles.items()}
        tokenizer_config["chat_template"] = chat_template(piece(tokenizer.eot_id), roles)
    special_tokens_map = {**named, "additional_special_tokens": list(tokenizer.special_tokens)}
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special_tokens_map}


def export_hf_checkpoint(checkpoint_dir: Path, output_dir: Path, dtype: Optional[DType] = None) -> None:
    """Write our checkpoint dir as a Hugging Face model dir that transformers loads and generates
    with: model.safetensors, config.json (eos: the EOT), generation_config.json (stopping on EOT, then
    EOS) and the tokenizer files (eos: the EOT; a chat template that checks roles). `dtype` casts the
    weights; None keeps ours."""
    checkpoint_dir = require_dir(checkpoint_dir, "--checkpoint_dir", "give a checkpoint dir of this repo "
                                 "(lit_model.pth, model_config.json, tokenizer.model)")
    output_dir = Path(output_dir)
    config = read_config(checkpoint_dir / CONFIG_FILE, "is this a checkpoint dir of this repo?")
    tokenizer = Tokenizer.from_dir(checkpoint_dir)
    try:
        state = read_weights(checkpoint_dir)
    except MissingFile:  # the reader's message, and what a LoRA out dir needs first
        raise MissingFile(f"{checkpoint_dir / MODEL_FILE} not found: the dir has no weights (a LoRA out dir must be "
                          "merged into a plain checkpoint dir first)") from None
    check_writable(output_dir, 0, "--output_dir")  # before the slow part
    tensors = hf_state(state, config, torch_dtype(dtype))
    output_dir.mkdir(parents=True, exist_ok=True)
    write_with(output_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(hf_config(config, tokenizer, tensors["lm_head.weight"].dtype), output_dir / HF_CONFIG_FILE)
    generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids}
    if tokenizer.eot_id is not None:
        generation["pad_token_id"] = hf_pad_id(tokenizer)
    write_json(generation, output_dir / "generation_config.json")
    tokenizer.save(output_dir)  # tokenizer.model, and special_tokens.json so converting back keeps the EOT
    for name, content in hf_tokenizer_files(tokenizer, config.block_size).items():
        write_json(content, output_dir / name)
    print(f"wrote {output_dir}: {config.vocab_size} token ids, stops on {tokenizer.stop_ids}")
