import torch

from lit_llama.lora import LoRAConfig, LoRALinear, inject_lora, is_lora_name, merge_lora
from lit_llama.model import LLaMA, LLaMAConfig


def make_model() -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(LLaMAConfig.from_name("tiny", block_size=32, vocab_size=100, n_layer=2))


def test_lora_starts_as_the_identity():
    model = make_model()
    idx = torch.randint(0, 100, (2, 8))
    before = model(idx)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    torch.testing.assert_close(model(idx), before)  # B starts at zero
    trainable = {n for n, _ in model.named_parameters() if is_lora_name(n)}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{m}" for i in range(2) for m in "AB"}
    # q and v chunks only: A stacks 2 blocks of r rows; B covers q (128) + v (64) outputs
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.lora_A.shape == (8, 128) and c_attn.lora_B.shape == (192, 4)


def test_update_lands_only_on_enabled_chunks_and_merge_is_exact():
    layer = LoRALinear(16, 12, r=2, alpha=4, dropout=0.0, chunks=[6, 3, 3], enabled=[True, False, True])
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    delta = layer(x) - x @ layer.weight.T
    assert delta[:, 6:9].abs().max() == 0 and delta[:, :6].abs().max() > 0 and delta[:, 9:].abs().max() > 0
    torch.testing.assert_close(x @ (layer.weight + layer.delta_weight()).T, layer(x))


def test_merge_lora_restores_plain_layers_with_same_outputs():
    model = make_model().eval()
    inject_lora(model, LoRAConfig(r=4, dropout=0.0, key=True, projection=True, mlp=True, head=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    idx = torch.randint(0, 100, (1, 8))
    expected = model(idx)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == set(make_model().state_dict())


def test_a_bf16_merge_rounds_once():
    """The update is added to the bf16 weight in fp32 and the sum rounded once; rounding the update to
    bf16 first and then the sum would land one bf16 step off for some weights."""
    torch.manual_seed(0)
    layer = LoRALinear(256, 256, r=8, alpha=16, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    layer.weight.data = layer.weight.data.to(torch.bfloat16)
    weight, delta = layer.weight.detach().clone(), layer.delta_weight()
    parent = torch.nn.Module()
    parent.layer = layer
    merge_lora(parent)
    once = (weight.float() + delta).to(torch.bfloat16)
    assert torch.equal(parent.layer.weight, once)
    assert not torch.equal(weight + delta.to(torch.bfloat16), once)  # the double rounding differs here
