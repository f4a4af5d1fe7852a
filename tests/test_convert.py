"""Checkpoint conversion, checked against Hugging Face transformers on tiny random models: our logits
equal theirs, and exporting back gives their tensors bit for bit."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM)

from conftest import FIXTURES, REPO, load_script
from lit_llama.checkpoint import load_model, save_checkpoint_dir
from lit_llama.convert import interleaved_to_half
from lit_llama.export import hf_tokenizer_files
from lit_llama.model import apply_rope, build_rope_cache
from lit_llama.prompts import encode_prompt
from lit_llama.tokenizer import extend_tokenizer
from lit_llama.vocab import add_special_tokens

convert_hf = load_script("scripts/convert_hf_checkpoint.py").main
convert_meta = load_script("scripts/convert_checkpoint.py").main
convert_lit = load_script("scripts/convert_lit_checkpoint.py").main

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1024)
CASES = {
    # MHA, a non-default rope_theta and eps, sharded safetensors
    "llama": (LlamaForCausalLM, LlamaConfig(**SHAPE, rope_theta=5e5, rms_norm_eps=1e-5), "safetensors"),
    # GQA with a sliding window shorter than the context, sharded .bin
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, num_key_value_heads=2, sliding_window=128,
                                                  max_position_embeddings=256, rope_theta=2e5), "bin"),
    # MQA with tied embeddings: the file has no lm_head
    "llama-tied": (LlamaForCausalLM, LlamaConfig(**SHAPE, num_key_value_heads=1, tie_word_embeddings=True),
                   "safetensors"),
}


def random_hf_model(case: str) -> torch.nn.Module:
    model_class, config, _ = CASES[case]
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # not all ones, so that swapped norms would show
                param.uniform_(0.5, 1.5)
    return model


def save_hf(model: torch.nn.Module, directory: Path, weights: str) -> None:
    """A Hugging Face model dir with several weight shards (as downloaded, tokenizer.model included)."""
    if weights == "safetensors":
        model.save_pretrained(directory, max_shard_size="100KB")
    else:
        # transformers 5 writes only safetensors: write the older .bin layout by hand, in two shards
        model.config.save_pretrained(directory)
        state = model.state_dict()
        names = list(state)
        weight_map = {}
        for i, shard in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
            file = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({n: state[n] for n in shard}, directory / file)
            weight_map.update(dict.fromkeys(shard, file))
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(FIXTURES / "tokenizer.model", directory / "tokenizer.model")


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    """(case, HF model, our dir converted from the model's HF dir)"""
    case = request.param
    root = tmp_path_factory.mktemp(case)
    model = random_hf_model(case)
    save_hf(model, root / "hf", CASES[case][2])
    convert_hf(checkpoint_dir=root / "hf", output_dir=root / "lit")
    return case, model, root / "lit"


def hf_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(checkpoint_dir: Path, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(checkpoint_dir).eval()(idx)


def test_hf_checkpoint_gives_the_same_logits(converted):
    case, hf_model, lit_dir = converted
    idx = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(1))
    ours = our_logits(lit_dir, idx)
    assert ours.shape == (2, 40, 1024)
    assert (ours - hf_logits(hf_model, idx)).abs().max() <= 1e-4
    config = json.loads((lit_dir / "model_config.json").read_text())
    assert config["padded_vocab_size"] == 1024
    assert config["n_query_groups"] == {"llama": 4, "mistral": 2, "llama-tied": 1}[case]
    assert config["block_size"] == (128 if case == "mistral" else 2048)  # Mistral's window is the whole context


def test_hf_to_ours_to_hf_is_bit_identical(converted, tmp_path):
    _, hf_model, lit_dir = converted
    convert_lit(checkpoint_dir=lit_dir, output_dir=tmp_path)
    exported = load_file(tmp_path / "model.safetensors")
    original = hf_model.state_dict()
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    # and transformers reads the exported config as the original (rope_theta, eps, heads ...)
    idx = torch.randint(0, 1024, (1, 30), generator=torch.Generator().manual_seed(2))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.dtype == torch.float32
    torch.testing.assert_close(hf_logits(reloaded, idx), hf_logits(hf_model, idx), rtol=0, atol=1e-5)


def half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's layout of HF q/k rows (what HF's own conversion undoes)."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """Meta's reference rotary embedding: consecutive pairs of a head are complex numbers. x: (T, nh, hs)"""
    T, _, hs = x.shape
    angles = torch.outer(torch.arange(T).float(), 1.0 / base ** (torch.arange(0, hs, 2).float() / hs))
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # (T, 1, hs/2)
    return torch.view_as_real(torch.view_as_complex(x.reshape(T, -1, hs // 2, 2)) * rotation).flatten(2)


def test_meta_rotary_layout_is_the_interleaved_one():
    torch.manual_seed(0)
    n_heads, hs, C, T = 4, 16, 64, 10
    wq, wk, x = torch.randn(n_heads * hs, C), torch.randn(n_heads * hs, C), torch.randn(T, C)
    meta_q, meta_k = half_to_interleaved(wq, n_heads), half_to_interleaved(wk, n_heads)
    assert torch.equal(interleaved_to_half(meta_q, n_heads), wq)
    # Meta's rotary on Meta's rows scores as our rotary on the converted rows
    q = meta_rope((x @ meta_q.T).view(T, n_heads, hs), 1e4)
    k = meta_rope((x @ meta_k.T).view(T, n_heads, hs), 1e4)
    cos, sin = build_rope_cache(T, hs, 1e4, torch.device("cpu"))
    q_ours = apply_rope((x @ wq.T).view(T, n_heads, hs).transpose(0, 1), cos, sin)
    k_ours = apply_rope((x @ wk.T).view(T, n_heads, hs).transpose(0, 1), cos, sin)
    scores = torch.einsum("thd,shd->hts", q, k)
    torch.testing.assert_close(scores, q_ours @ k_ours.transpose(1, 2), atol=1e-4, rtol=1e-4)


def save_meta(hf_model: torch.nn.Module, directory: Path, n_shards: int = 2) -> None:
    """The model in Meta's original layout: Meta's names, interleaved q/k rows, model-parallel shards."""
    config = hf_model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    meta = {"tok_embeddings.weight": hf_model.model.embed_tokens.weight, "norm.weight": hf_model.model.norm.weight,
            "output.weight": hf_model.lm_head.weight}
    for i, layer in enumerate(hf_model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        meta.update({
            f"layers.{i}.attention.wq.weight": half_to_interleaved(attn.q_proj.weight, n_heads),
            f"layers.{i}.attention.wk.weight": half_to_interleaved(attn.k_proj.weight, n_kv),
            f"layers.{i}.attention.wv.weight": attn.v_proj.weight,
            f"layers.{i}.attention.wo.weight": attn.o_proj.weight,
            f"layers.{i}.feed_forward.w1.weight": mlp.gate_proj.weight,
            f"layers.{i}.feed_forward.w2.weight": mlp.down_proj.weight,
            f"layers.{i}.feed_forward.w3.weight": mlp.up_proj.weight,
            f"layers.{i}.attention_norm.weight": layer.input_layernorm.weight,
            f"layers.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
        })
    directory.mkdir(parents=True)
    for rank in range(n_shards):
        shard = {}
        for name, tensor in meta.items():
            dim = 1 if name.endswith(("wo.weight", "w2.weight", "tok_embeddings.weight")) else 0
            shard[name] = tensor if tensor.dim() == 1 else tensor.detach().chunk(n_shards, dim)[rank].clone()
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    # Meta's FeedForward: int(2 * 4 * 64 / 3) = 170, * 0.75 = 127, rounded up to 64: 128
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": n_heads, "n_kv_heads": n_kv,
              "multiple_of": 64, "ffn_dim_multiplier": 0.75, "norm_eps": config.rms_norm_eps,
              "rope_theta": config.rope_parameters["rope_theta"], "vocab_size": -1}
    (directory / "params.json").write_text(json.dumps(params))


def test_meta_checkpoint_gives_the_same_logits(tmp_path):
    hf_model = random_hf_model("mistral")
    save_meta(hf_model, tmp_path / "meta" / "tiny")
    # beside the model's folder, as Meta ships it
    shutil.copy(FIXTURES / "tokenizer.model", tmp_path / "meta" / "tokenizer.model")
    convert_meta(checkpoint_dir=tmp_path / "meta" / "tiny", output_dir=tmp_path / "lit")
    idx = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(3))
    assert (our_logits(tmp_path / "lit", idx) - hf_logits(hf_model, idx)).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def eot_export(tmp_path_factory, tokenizer):
    """An EOT-extended checkpoint of ours exported to HF; its EOT head row makes EOT the reply to PROMPT."""
    root = tmp_path_factory.mktemp("eot")
    save_hf(random_hf_model("llama"), root / "hf", "safetensors")
    convert_hf(checkpoint_dir=root / "hf", output_dir=root / "base")
    model = load_model(root / "base")
    add_special_tokens(model, tokenizer)
    prompt = torch.tensor([encode_prompt(tokenizer, [PROMPT])])
    hidden = []
    hook = model.transformer.ln_f.register_forward_hook(lambda module, inputs, output: hidden.append(output[0, -1]))
    with torch.no_grad():
        model(prompt)
        hook.remove()
        model.lm_head.weight[tokenizer.eot_id] = 50 * hidden[0] / hidden[0].norm() ** 2  # EOT logit 50 there
    save_checkpoint_dir(model, tokenizer, root / "lit")
    convert_lit(checkpoint_dir=root / "lit", output_dir=root / "exported")
    return model, root / "exported"


PROMPT = "How do plants drink water?"
TWENTY = 823  # "▁twenty" in the tiny tokenizer
TEXTS = ["Hello world", "How do plants drink water?\nThey use their roots.", "numbers 12345 and café 你好 🙂",
         "almost special: <|eot| and </s", "two  spaces\tand a tab "]


def test_exported_tokenizer_gives_our_ids(eot_export, tokenizer):
    hf_tokenizer = AutoTokenizer.from_pretrained(eot_export[1])
    for text in TEXTS[:4]:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text), text
    assert hf_tokenizer.encode(TEXTS[4]) == tokenizer.encode(TEXTS[4], bos=True)
    assert hf_tokenizer.convert_tokens_to_ids("<|eot|>") == tokenizer.eot_id == 1024
    assert tokenizer.eot_id in hf_tokenizer.all_special_ids
    # unlike ours, HF's tokenizer turns the special token's text into its id (see howto/download_weights.md)
    assert hf_tokenizer.encode("<|eot|>", add_special_tokens=False) == [tokenizer.eot_id]
    assert tokenizer.eot_id not in tokenizer.encode("<|eot|>")
    # the chat template is our prompt format
    turns = [PROMPT, "With their roots.", "And then?"]
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    chat = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert list(chat) == encode_prompt(tokenizer, turns)
    ready = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True)
    assert list(ready) == encode_prompt(tokenizer, turns)  # no role markers: the reply simply comes next
    system = [{"role": "system", "content": "Be brief."}, *messages]
    assert list(hf_tokenizer.apply_chat_template(system, tokenize=True, return_dict=False)) == \
        encode_prompt(tokenizer, turns, system="Be brief.")


@pytest.mark.parametrize("roles, why", [
    (["assistant", "user"], "message 0 has role assistant, expected user"),
    (["user", "user"], "message 1 has role user, expected assistant"),
    (["user", "system"], "message 1 has role system, expected assistant"),
    (["system", "assistant"], "message 1 has role assistant, expected user"),
    (["user", "assistant"], "add_generation_prompt needs a conversation that ends with a user message"),
])
def test_the_chat_template_refuses_roles_out_of_order(eot_export, roles, why):
    hf_tokenizer = AutoTokenizer.from_pretrained(eot_export[1])
    messages = [{"role": role, "content": "hi"} for role in roles]
    with pytest.raises(Exception, match=why):
        hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_every_file_a_tool_reads_the_eos_from_names_the_eot(eot_export, tokenizer):
    """Tools that stop on one eos id (llama.cpp's converter reads config.json's) stop on the EOT."""
    exported = eot_export[1]
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == tokenizer.eot_id
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        files = json.loads((exported / name).read_text())
        assert files["eos_token"] == "<|eot|>" and files["pad_token"] == "<unk>", name
    assert json.loads((exported / "generation_config.json").read_text())["pad_token_id"] == 0
    hf_tokenizer = AutoTokenizer.from_pretrained(exported)
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id and hf_tokenizer.pad_token_id == 0


def test_the_chat_template_places_role_tokens(base_tokenizer, tmp_path):
    """With role tokens (--role_tokens true when preparing), the export's template gives our prompt ids."""
    tokenizer = extend_tokenizer(base_tokenizer, role_tokens=True)
    tokenizer.save(tmp_path)
    for name, content in hf_tokenizer_files(tokenizer, block_size=256).items():
        (tmp_path / name).write_text(json.dumps(content))
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    turns = [PROMPT, "With their roots.", "And then?"]
    messages = [{"role": "system", "content": "Be brief."},
                *({"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns))]
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True)
    assert list(ids) == encode_prompt(tokenizer, turns, system="Be brief.")
    assert list(ids)[-1] == tokenizer.roles["assistant"]


def test_a_repurposed_eot_exports_as_safely_as_an_appended_one(base_tokenizer, tmp_path):
    """The repurposed piece is renamed to the EOT's name in the written tokenizer.model: transformers,
    which matches special tokens by text, never finds it in ordinary text, the word included."""
    tokenizer = extend_tokenizer(base_tokenizer, repurpose_eot="▁twenty")
    assert tokenizer.eot_id == TWENTY and tokenizer.special[0].piece == "▁twenty"
    tokenizer.save(tmp_path)
    for name, content in hf_tokenizer_files(tokenizer, block_size=256).items():
        (tmp_path / name).write_text(json.dumps(content))
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer.convert_tokens_to_ids("<|eot|>") == TWENTY == hf_tokenizer.eos_token_id
    for text in [*TEXTS[:4], "twenty", "twenty-one is twenty plus one", "Twenty\ntwenty!", "def twenty(x):\n    return 20  # twenty"]:
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text) and TWENTY not in ids, text


def test_exported_model_matches_ours_and_stops_on_eot(eot_export, tokenizer):
    model, exported = eot_export
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == [1024, 2]
    hf_model = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert hf_model.generation_config.eos_token_id == [1024, 2]
    prompt = torch.tensor([encode_prompt(tokenizer, [PROMPT])])
    with torch.no_grad():
        ours = model(prompt)
    assert ours.shape[-1] == 1025 and ours[0, -1].argmax() == tokenizer.eot_id
    assert (hf_logits(hf_model, prompt) - ours).abs().max() <= 1e-4
    generated = hf_model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert generated[0, prompt.shape[1] :].tolist() == [tokenizer.eot_id]


def test_exported_checkpoint_converts_back_to_ours(eot_export, tmp_path):
    exported = eot_export[1]
    ours_dir = exported.parent / "lit"
    convert_hf(checkpoint_dir=exported, output_dir=tmp_path)
    assert (tmp_path / "special_tokens.json").read_text() == (ours_dir / "special_tokens.json").read_text()
    back, ours = torch.load(tmp_path / "lit_model.pth"), torch.load(ours_dir / "lit_model.pth")
    assert back.keys() == ours.keys() and all(torch.equal(back[n], ours[n]) for n in ours)


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
    ("attention_bias", True),
    ("hidden_act", "gelu"),
    ("head_dim", 32),
    ("model_type", "gemma"),
])
def test_unsupported_config_is_refused(field, value, tmp_path):
    config = CASES["llama"][1].to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(FIXTURES / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match=rf"config.json: {field}=.* is not supported"):
        convert_hf(checkpoint_dir=tmp_path, output_dir=tmp_path / "out")


def test_missing_files_end_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert_hf(checkpoint_dir=tmp_path, output_dir=tmp_path / "out")
    (tmp_path / "config.json").write_text(CASES["llama"][1].to_json_string())
    with pytest.raises(FileNotFoundError, match="tokenizer.model not found"):
        convert_hf(checkpoint_dir=tmp_path, output_dir=tmp_path / "out")
    shutil.copy(FIXTURES / "tokenizer.model", tmp_path / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="no weights in"):
        convert_hf(checkpoint_dir=tmp_path, output_dir=tmp_path / "out")
    # the command line: "error: ..." and exit code 2, no traceback
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_checkpoint.py"),
                             "--checkpoint_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'params.json'} not found: point --checkpoint_dir at one model of Meta's download "
        "(the folder with params.json and consolidated.00.pth)"]
