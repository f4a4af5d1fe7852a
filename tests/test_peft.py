"""scripts/export_peft.py: a LoRA fine-tune with a repurposed end-of-turn token, written as a PEFT
adapter, gives through PEFT on our Hugging Face export of the base the logits we compute; a fine-tune
whose end-of-turn token was appended is refused in one line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import REPO, load_script  # noqa: E402
from lit_llama.checkpoint import load_finetuned  # noqa: E402
from lit_llama.errors import BadValue  # noqa: E402
from lit_llama.finetune import DataArgs, RunLayout  # noqa: E402
from lit_llama.lora import LoRAConfig  # noqa: E402
from lit_llama.prepare import PrepareDirs, VocabChange  # noqa: E402
from lit_llama.prompts import encode_prompt  # noqa: E402
from lit_llama.tokenizer import SPECIAL_TOKENS_FILE  # noqa: E402
from lit_llama.training import TrainArgs  # noqa: E402

export_peft = load_script("scripts/export_peft.py").main


@pytest.fixture(scope="module")
def repurposed_lora(tiny_checkpoint, tmp_path_factory) -> Path:
    """A LoRA on every block linear (q, k, v, o, and the MLP) with "▁twenty" as the end-of-turn token,
    its trained weights then drawn at random so that every one of them shows in the logits."""
    root = tmp_path_factory.mktemp("peft")
    load_script("scripts/prepare_lima.py").prepare(data_path=REPO / "data" / "lima_sample.jsonl",
                                                   dirs=PrepareDirs(tiny_checkpoint, root / "data"),
                                                   vocab=VocabChange(repurpose_eot="▁twenty"))
    load_script("finetune/lora.py").setup(
        data=DataArgs(root / "data", checkpoint_dir=tiny_checkpoint), layout=RunLayout(root / "lora"),
        lora=LoRAConfig(r=4, alpha=8, key=True, projection=True, mlp=True),
        train=TrainArgs(max_iters=2, warmup_iters=1, global_batch_size=2, micro_batch_size=2, eval_interval=2,
                        eval_iters=1))
    weights = root / "lora" / "lit_model_lora.pth"
    trained = torch.load(weights, weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in trained.items():
        if tensor.is_floating_point():
            trained[name] = torch.randn(tensor.shape, generator=generator) * 0.05
    torch.save(trained, weights)
    return root / "lora"


def test_peft_on_the_exported_base_gives_our_logits(repurposed_lora, tiny_checkpoint, tmp_path):
    load_script("scripts/convert_lit_checkpoint.py").main(checkpoint_dir=tiny_checkpoint, output_dir=tmp_path / "base")
    export_peft(lora_path=repurposed_lora, output_dir=tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"])
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ours, tokenizer = load_finetuned(repurposed_lora)
    ids = encode_prompt(tokenizer, ["How do plants drink water?", "Through their roots.", "And trees?"])  # EOTs inside
    assert tokenizer.eot_id in ids
    with torch.no_grad():
        expected = ours.eval()(torch.tensor([ids]))[0, :, : tokenizer.vocab_size]
        got = theirs(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "adapter").eos_token_id == tokenizer.eot_id


def test_an_appended_end_of_turn_token_is_refused(repurposed_lora, tmp_path):
    appended = tmp_path / "appended"
    shutil.copytree(repurposed_lora, appended)
    special = json.loads((appended / SPECIAL_TOKENS_FILE).read_text())
    for token in special["tokens"]:
        token["mode"] = "appended"
        token.pop("piece", None)
    (appended / SPECIAL_TOKENS_FILE).write_text(json.dumps(special))
    with pytest.raises(BadValue, match="appended <|eot|> to the vocabulary, which no adapter carries: merge it"):
        export_peft(lora_path=appended, output_dir=tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def peft_logits(base_dir: Path, adapter_dir: Path, ids: list[int]) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base, adapter_dir).eval()(torch.tensor([ids])).logits[0]


def our_logits(lora_path: Path, ids: list[int]) -> torch.Tensor:
    model, tokenizer = load_finetuned(lora_path)
    with torch.no_grad():
        return model.eval()(torch.tensor([ids]))[0, :, : tokenizer.vocab_size]


def test_an_adapter_peft_made_imports_to_its_logits(tiny_checkpoint, tmp_path):
    """A LoRA made by PEFT itself on the base's export (q, v and the MLP, on lm_head too), its weights
    random, becomes an out dir whose model gives PEFT's logits."""
    load_script("scripts/convert_lit_checkpoint.py").main(checkpoint_dir=tiny_checkpoint, output_dir=tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    load_script("scripts/import_peft.py").main(adapter_dir=tmp_path / "adapter", checkpoint_dir=tiny_checkpoint,
                                               out_dir=tmp_path / "lora")
    ids = [1, *range(20, 60)]
    torch.testing.assert_close(our_logits(tmp_path / "lora", ids), peft_logits(tmp_path / "base", tmp_path / "adapter", ids),
                               atol=1e-4, rtol=0)


def test_our_export_imports_back_to_the_same_model(repurposed_lora, tiny_checkpoint, tmp_path):
    export_peft(lora_path=repurposed_lora, output_dir=tmp_path / "adapter")
    load_script("scripts/import_peft.py").main(adapter_dir=tmp_path / "adapter", checkpoint_dir=tiny_checkpoint,
                                               out_dir=tmp_path / "lora")
    _, tokenizer = load_finetuned(repurposed_lora)
    ids = encode_prompt(tokenizer, ["How do plants drink water?", "Through their roots.", "And trees?"])
    torch.testing.assert_close(our_logits(tmp_path / "lora", ids), our_logits(repurposed_lora, ids), atol=1e-5, rtol=0)


def test_an_adapter_our_lora_cannot_hold_is_refused(repurposed_lora, tiny_checkpoint, tmp_path):
    export_peft(lora_path=repurposed_lora, output_dir=tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(BadValue, match="use_dora=True is not a plain LoRA"):
        load_script("scripts/import_peft.py").main(adapter_dir=tmp_path / "adapter", checkpoint_dir=tiny_checkpoint,
                                                   out_dir=tmp_path / "lora")
