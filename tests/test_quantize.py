"""QLoRA: a LoRA trained beside an NF4 base (torchao's NF4Tensor, on the CPU as on a GPU) learns as
well as one beside the dense base, halts on EOT, and loads, generates and merges the way it trained."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao", reason="pip install -e '.[quantize]'")

from conftest import REPO, load_script, val_losses  # noqa: E402
from lit_llama.checkpoint import load_finetuned, load_model  # noqa: E402
from lit_llama.finetune import DataArgs, RunLayout  # noqa: E402
from lit_llama.generate import Sampling, Stopping, generate  # noqa: E402
from lit_llama.inference import ModelSource, Placement, Replies  # noqa: E402
from lit_llama.lora import LoRAConfig, inject_lora  # noqa: E402
from lit_llama.loss import loss_sum  # noqa: E402
from lit_llama.model import LLaMA, LLaMAConfig  # noqa: E402
from lit_llama.prepare import PrepareDirs  # noqa: E402
from lit_llama.quantize import block_linears, quantize, round_trip  # noqa: E402
from lit_llama.training import TrainArgs  # noqa: E402


def test_nf4_stores_the_block_weights_and_computes_with_what_they_stand_for():
    torch.manual_seed(0)
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=1024, n_layer=2))
    inject_lora(model, LoRAConfig(r=4, dropout=0.0, mlp=True))
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    with torch.no_grad():  # B starts at zero: give the update a value to carry gradients through
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    dense = LLaMA(model.config)
    inject_lora(dense, LoRAConfig(r=4, dropout=0.0, mlp=True))
    dense.load_state_dict(model.state_dict())
    for name, param in dense.named_parameters():
        param.requires_grad = "lora_" in name
    round_trip(dense, "nf4", torch.float32)
    quantize(model, "nf4")
    assert all(type(m.weight).__name__ == "NF4Tensor" for _, m in block_linears(model))
    assert not any(type(m.weight).__name__ == "NF4Tensor" for _, m in block_linears(dense))
    assert type(model.lm_head.weight) is torch.nn.Parameter and type(model.transformer.wte.weight) is torch.nn.Parameter
    nf4_bytes = sum(t.numel() * t.element_size() for _, m in block_linears(model)
                    for t in (m.weight.quantized_data, m.weight.quantized_scalers, m.weight.quantization_factor))
    dense_bytes = sum(m.weight.numel() * 4 for _, m in block_linears(dense))
    assert nf4_bytes < 0.14 * dense_bytes  # about 4.1 bits of 32

    idx = torch.randint(0, 1024, (2, 16))
    targets = torch.randint(0, 1024, (2, 16))
    loss_sum(model, idx, targets).backward()
    loss_sum(dense, idx, targets).backward()
    trained = [(q, d) for q, d in zip(model.parameters(), dense.parameters()) if d.requires_grad]
    assert len(trained) == 2 * 2 * 4  # A and B of c_attn and the MLP's three linears, in 2 layers
    for q, d in trained:  # LoRA's gradients beside the NF4 base equal those beside its dense values
        torch.testing.assert_close(q.grad, d.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), dense(idx), rtol=1e-4, atol=1e-5)


def test_quantize_refuses_a_base_that_trains_and_names_a_missing_library(monkeypatch):
    model = LLaMA(LLaMAConfig.from_name("tiny", vocab_size=1024, n_layer=1))
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn.weight trains: only a frozen base"):
        quantize(model, "nf4")
    monkeypatch.setitem(__import__("sys").modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match=r"--quantize nf4 needs torchao: pip install -e '.\[quantize\]'"):
        quantize(model.requires_grad_(False), "nf4")


@pytest.fixture(scope="module")
def short_data(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [json.loads(line) for line in (REPO / "data" / "lima_sample.jsonl").open()]
    short = [r for r in rows if len(r["conversations"]) == 2 and len(r["conversations"][1].split()) < 25][:8]
    root = tmp_path_factory.mktemp("qlora")
    (root / "short.jsonl").write_text("\n".join(json.dumps(r) for r in short))
    load_script("scripts/prepare_lima.py").prepare(data_path=root / "short.jsonl", dirs=PrepareDirs(tiny_checkpoint, root / "data"))
    return root / "data"


def finetune(data: Path, checkpoint: Path, out_dir: Path, quantize=None, **layout) -> dict:
    train = TrainArgs(learning_rate=3e-3, max_iters=200, warmup_iters=10, global_batch_size=4, micro_batch_size=4,
                      eval_interval=200, eval_iters=1)
    load_script("finetune/lora.py").setup(data=DataArgs(data, checkpoint_dir=checkpoint), layout=RunLayout(out_dir, **layout),
                                          lora=LoRAConfig(mlp=True, projection=True), train=train, quantize=quantize)
    return json.loads((out_dir / "hyperparameters.json").read_text())


def test_qlora_learns_as_the_dense_lora_does_halts_and_merges(tiny_checkpoint, short_data, tmp_path, capsys):
    dense_hparams = finetune(short_data, tiny_checkpoint, tmp_path / "dense")
    nf4_hparams = finetune(short_data, tiny_checkpoint, tmp_path / "nf4", quantize="nf4")
    assert (dense_hparams["quantize"], nf4_hparams["quantize"]) == (None, "nf4")
    assert "on an nf4 base" in capsys.readouterr().out
    dense, nf4 = val_losses(tmp_path / "dense")[-1], val_losses(tmp_path / "nf4")[-1]
    assert abs(nf4 - dense) <= 0.05 * dense, (nf4, dense)

    report = load_script("scripts/evaluate_halting.py").main(data_dir=short_data, source=ModelSource(lora_path=tmp_path / "nf4"),
                                                             split="train",
                                                             max_new_tokens=100, output_file=tmp_path / "halting.json")
    assert report["eot_rate"] >= 0.9, report

    # loading the out dir rebuilds what training computed: the base through NF4, then the LoRA merged
    model, tokenizer = load_finetuned(tmp_path / "nf4")
    load_script("scripts/merge_lora.py").main(lora_path=tmp_path / "nf4", out_dir=tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    prompt = tokenizer.encode("How do plants drink water?", bos=True)
    assert generate(merged, prompt, 20).tokens == generate(model, prompt, 20).tokens

    # generating on an NF4 base: the merged weights quantized again, and the reply still ends on EOT
    question = json.loads((REPO / "data" / "lima_sample.jsonl").open().readline())["conversations"][0]
    load_script("generate/lora.py").main(lora_path=tmp_path / "nf4", placement=Placement(quantize="nf4"),
                                         sampling=Sampling(temperature=0), replies=Replies(prompt=question))
    assert "stop reason: eot after" in capsys.readouterr().err

    with pytest.raises(ValueError, match="was trained with --quantize nf4: resume with the same flag"):
        finetune(short_data, tiny_checkpoint, tmp_path / "nf4", resume=True)


def test_qlora_on_several_processes_needs_fsdp(tiny_checkpoint, short_data, tmp_path):
    with pytest.raises(ValueError, match="--quantize nf4 on 2 processes needs --strategy fsdp"):
        finetune(short_data, tiny_checkpoint, tmp_path / "two", quantize="nf4", devices=2, accelerator="cpu",
                 strategy="ddp")
    with pytest.raises(ValueError, match="--quantize nf4 with --strategy fsdp needs 2 or more processes"):
        finetune(short_data, tiny_checkpoint, tmp_path / "one", quantize="nf4", accelerator="cpu", strategy="fsdp")


def test_an_adapter_trains_on_an_nf4_base_and_loads_as_it_trained(tiny_checkpoint, short_data, tmp_path):
    train = TrainArgs(learning_rate=3e-3, max_iters=4, warmup_iters=1, global_batch_size=4, micro_batch_size=4,
                      eval_interval=4, eval_iters=1)
    load_script("finetune/adapter.py").setup(data=DataArgs(short_data, checkpoint_dir=tiny_checkpoint),
                                             layout=RunLayout(tmp_path / "adapter"), train=train, quantize="nf4")
    assert json.loads((tmp_path / "adapter" / "hyperparameters.json").read_text())["quantize"] == "nf4"
    model, tokenizer = load_finetuned(tmp_path / "adapter")
    base = round_trip(load_model(tiny_checkpoint), "nf4", torch.float32)
    name = "transformer.h.3.attn.c_attn.weight"  # an adapted layer: its base weight is the NF4 value
    torch.testing.assert_close(model.state_dict()[name], base.state_dict()[name], rtol=0, atol=0)
    assert generate(model, tokenizer.encode("What is rain?", bos=True), 8).tokens


def test_a_checkpoint_dir_generates_on_an_nf4_base(tiny_checkpoint, capsys):
    """A base or full fine-tune loads its weights as trainable parameters; inference freezes them before
    quantizing (it used to stop with "weight trains: only a frozen base is quantized")."""
    load_script("generate/base.py").main(checkpoint_dir=tiny_checkpoint, replies=Replies(prompt="The sun"),
                                         stopping=Stopping(max_new_tokens=4), sampling=Sampling(temperature=0),
                                         placement=Placement(quantize="nf4"))
    assert "stop reason: max_new_tokens after 4 tokens" in capsys.readouterr().err
