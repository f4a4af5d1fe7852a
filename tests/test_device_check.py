"""The GPU paths on a simulated accelerator (lit_llama/device_check.py): device mistakes fail on the CPU
as they would on a GPU, the reads a GPU run makes back to the host are counted and pinned, and the
device decisions (where weights are saved from, which RNG a rank keeps, when bf16 is chosen, how NF4
reaches the GPU, which attention kernel a mask allows) are checked without one."""

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from lit_llama import device_check
from lit_llama import generate as generate_module
from lit_llama.checkpoint import load_model, load_state_dict
from lit_llama.dataset import load_prepared
from lit_llama.device_check import ACCELERATOR, DeviceCheck, DeviceMismatch, graph_syncs
from lit_llama.generate import generate_batch
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.finetune import DataArgs, RunLayout, make_fabric
from lit_llama.training import TrainArgs, validate

ON_ACCELERATOR = ACCELERATOR  # what `x.device` answers for a tensor the simulated accelerator holds
HOST = torch.device("cpu")


def test_a_mix_fails_where_cuda_refuses_it():
    with DeviceCheck():
        on = torch.ones(3, device=ACCELERATOR)
        assert on.device == ON_ACCELERATOR and torch.zeros(3).device == HOST
        assert (on * torch.tensor(2.0)).device == ON_ACCELERATOR  # a 0-dim host tensor in a pointwise op: allowed
        assert on[torch.tensor([0, 2])].device == ON_ACCELERATOR  # host indices: CUDA copies them over
        with pytest.raises(DeviceMismatch, match="aten.stack"):  # what validate() did
            torch.stack([on.sum(), torch.tensor(3.0)])
        with pytest.raises(DeviceMismatch, match="aten.add"):
            on + torch.ones(3)
        with pytest.raises(DeviceMismatch, match="generator made on the other side"):
            torch.multinomial(on, 1, generator=torch.Generator().manual_seed(0))
        torch.multinomial(on, 1, generator=torch.Generator(on.device).manual_seed(0))
        with pytest.raises(DeviceMismatch, match="numpy"):
            on.numpy()
        host = on.cpu()
        assert host.device == HOST and on.device == ON_ACCELERATOR
        assert (host + torch.ones(3)).device == HOST
        layer = torch.nn.Linear(3, 2).to(ACCELERATOR)
        layer(on).sum().backward()  # autograd's tensors are where their inputs are
        assert layer.weight.grad.device == ON_ACCELERATOR


def test_reads_to_the_host_are_counted():
    with DeviceCheck() as check:
        on = torch.arange(4.0, device=ACCELERATOR)
        on.sum().item(), int(on[0]), on.tolist(), on[on > 1], on.nonzero(), on.cpu()
        torch.ones(3).tolist(), torch.ones(3)[torch.ones(3) > 0]  # host tensors: no sync
        torch.tensor([1, 2], device=ACCELERATOR), torch.ones(2).to(ACCELERATOR)
    assert check.syncs == {"item": 2, "tolist": 1, "boolean-mask indexing": 1, "nonzero": 1, "copy to host": 1}
    assert check.uploads == {"tensor": 1, "to": 1}


def tiny_gqa_model() -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(LLaMAConfig.from_name("tiny", block_size=64, vocab_size=100, n_layer=2)).eval()


def test_decoding_reads_one_tensor_back_per_step_and_copies_nothing_over():
    """Three rows, one greedy and two sampled with generators of their own: one read of the sampled ids
    per step for the whole batch, no copy from the host after the prompts."""
    counts = {}
    for steps in (8, 16):
        with DeviceCheck() as check, torch.inference_mode():
            model = tiny_gqa_model().to(ACCELERATOR)
            generators = [None, *(torch.Generator(ACCELERATOR).manual_seed(i) for i in range(2))]
            results = generate_batch(model, [[1, 5, 9], [1, 7], [1, 2, 3, 4]], steps, generators=generators,
                                     temperature=0.8, top_k=20)  # stop ids none: every row runs `steps` steps
            counts[steps] = check.total()
        assert all(len(r.tokens) == steps for r in results)
    (syncs_8, uploads_8), (syncs_16, uploads_16) = counts[8], counts[16]
    assert (syncs_16 - syncs_8) / 8 == 1  # per step, for 3 rows: a third of a sync per generated token
    assert uploads_16 == uploads_8


def test_a_compiled_step_reads_back_once_a_step(monkeypatch):
    """The compiled step as a GPU runs it (`CompiledStep` with a GPU's options), with a backend that records
    its graph and captures nothing: the graph, at aten level as inductor gets it, has no op that reads
    back, and the decoding around it reads back once a step, the sampled ids, as the eager step does."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    from lit_llama.decoder import CompiledStep

    graphs = []

    def record(graph: torch.fx.GraphModule, inputs: list) -> Callable:
        graphs.append(graph)
        return make_boxed_func(graph.forward)

    counts = {}
    for steps in (8, 16):
        with DeviceCheck() as check, torch.inference_mode():
            model = tiny_gqa_model().to(ACCELERATOR)
            gpu_options = {"triton.cudagraphs": True}  # what `step_options` gives a model on a GPU
            step = check.outside(CompiledStep(model, aot_autograd(fw_compiler=record), gpu_options))
            monkeypatch.setattr(generate_module, "compile_step", lambda model: step)
            results = generate_batch(model, [[1, 5, 9], [1, 7], [1, 2, 3, 4]], steps, temperature=0.8, top_k=20,
                                     compile=True)
            counts[steps] = check.total()
        assert all(len(r.tokens) == steps for r in results)
    assert len(graphs) == 2  # one graph per model: every step ran it
    for graph in graphs:
        ops = {node.target for node in graph.graph.nodes}
        assert torch.ops.aten.mm.default in ops and graph_syncs(graph) == []
    (syncs_8, uploads_8), (syncs_16, uploads_16) = counts[8], counts[16]
    assert (syncs_16 - syncs_8) / 8 == 1  # per step, for 3 rows
    assert uploads_16 == uploads_8


def test_a_graph_that_reads_back_is_told():
    graph = torch.fx.symbolic_trace(lambda x: x)
    assert graph_syncs(graph) == []
    node = next(iter(graph.graph.nodes))
    with graph.graph.inserting_after(node):
        graph.graph.call_function(torch.ops.aten._local_scalar_dense.default, (node,))
    assert graph_syncs(graph) == ["item"]


def test_prompts_read_together_read_nothing_back():
    """Three prompts of different lengths read in one forward pass, two of them past what their slots
    hold: the padding's places and the real tokens' slots are indices made on the host, so the prefill
    reads nothing back (a boolean mask over device tensors would read its count back)."""
    from lit_llama.decoder import Decoder

    with DeviceCheck() as check, torch.inference_mode():
        model = tiny_gqa_model().to(ACCELERATOR)
        with Decoder(model, 3, 32) as decoder:
            decoder.prefill_many([0, 1], [[1, 5, 9], [1, 7]], [0, 0])
            before = check.total()[0]
            logits = decoder.prefill_many([2, 0, 1], [[1, 2, 3, 4, 5], [1, 5, 9, 6], [1, 7, 8]], [0, 0, 0])
            assert check.total()[0] == before and logits.device == ON_ACCELERATOR
            assert decoder.prefilled == 5 + 1 + 1


def test_attention_with_a_mask_keeps_grouped_heads_off_the_kernels_that_cannot_take_them(monkeypatch):
    """On a GPU a mask rules flash attention out and leaves the memory-efficient kernel, which some torch
    builds refuse for grouped-query heads (falling back to math, fp32 (B, heads, T, S) scores). The KV
    cache's calls fold each group's query heads into rows: SDPA sees as many query heads as k/v heads."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kwargs):
        calls.append((q.shape[1], k.shape[1], attn_mask is not None, is_causal, enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kwargs)

    model = tiny_gqa_model()
    idx = torch.tensor([[1, 5, 9, 4, 2, 7]])
    reference = model(idx)  # no cache: causal
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(idx)
    assert calls and all(call == (4, 2, False, True, True) for call in calls)  # flash takes grouped heads
    calls.clear()
    model.set_kv_cache(batch_size=1, max_seq_length=16)
    prefill = model(idx[:, :4], torch.arange(4).unsqueeze(0), kv_length=4)
    step = model(idx[:, 4:5], torch.tensor([[4]]), kv_length=5)
    assert calls and all(call == (2, 2, True, False, False) for call in calls)
    torch.testing.assert_close(prefill, reference[:, :4])
    torch.testing.assert_close(step, reference[:, 4:5])


def test_a_call_with_positions_but_no_cache_says_so():
    with pytest.raises(ValueError, match="call set_kv_cache first"):
        tiny_gqa_model()(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]))


def test_validation_runs_on_the_accelerator_and_reads_back_once(lima_data, tiny_checkpoint, eot_checkpoint, tmp_path):
    """Before it was fixed, validate() stacked a host count with three device losses and failed at the
    first eval_interval of every GPU run; it also read 4 values back per micro-batch (mask indexing)."""
    tokenizer, _, val_data = load_prepared(lima_data, tiny_checkpoint)
    with DeviceCheck() as check:
        fabric = make_fabric(RunLayout(tmp_path, accelerator="cpu", precision="32-true"))
        assert fabric.device == ACCELERATOR
        model = fabric.setup_module(load_model(eot_checkpoint).requires_grad_(False))
        loss, eot_loss = validate(fabric, model, val_data, TrainArgs(micro_batch_size=2, eval_iters=0), 0,
                                  tokenizer.eot_id)
    assert check.syncs == {"tolist": 1}  # the sums, once, at the end
    assert math.isfinite(loss) and math.isfinite(eot_loss)


def finetune(lima_data: Path, checkpoint: Path, out_dir: Path, monkeypatch, **train) -> tuple[int, int]:
    """(syncs, uploads) of a LoRA fine-tune on the simulated accelerator, without the sample reply
    (its length depends on the weights; decoding has its own count above)."""
    monkeypatch.setattr("lit_llama.training.sample_reply", lambda *args: "")
    with DeviceCheck() as check:
        load_script("finetune/lora.py").setup(
            data=DataArgs(lima_data, checkpoint_dir=checkpoint), layout=RunLayout(out_dir, accelerator="cpu", precision="bf16-true"),
            train=TrainArgs(**{"micro_batch_size": 2, "global_batch_size": 2, "warmup_iters": 1, "eval_iters": 2,
                               "eval_interval": 100, "save_interval": 0, **train}))
    return check.total()


def test_a_training_step_reads_back_its_loss_and_gradient_norm_only(lima_data, tiny_checkpoint, tmp_path, monkeypatch):
    """Counted as differences between runs: 2 more steps, and 2 more micro-batches. A micro-batch reads
    nothing back; a step reads its loss (logged) and its gradient norm (clipping and the non-finite check)."""
    base = finetune(lima_data, tiny_checkpoint, tmp_path / "a", monkeypatch, max_iters=2)
    more_steps = finetune(lima_data, tiny_checkpoint, tmp_path / "b", monkeypatch, max_iters=4)
    more_micro_batches = finetune(lima_data, tiny_checkpoint, tmp_path / "c", monkeypatch, max_iters=2,
                                  global_batch_size=4)
    assert (more_steps[0] - base[0]) / 2 == 2
    assert more_micro_batches[0] == base[0]
    assert (more_micro_batches[1] - base[1]) / 2 == 2  # a micro-batch's inputs and labels go over, nothing else
    weights = load_state_dict(tmp_path / "a" / "lit_model_lora.pth")
    assert all(t.device == HOST for t in weights.values())


def test_weights_saved_on_a_gpu_machine_load_on_a_cpu_one(tmp_path):
    """A file whose tensors are tagged cuda:0 (as torch.save writes GPU tensors) loads on the CPU."""
    def on_cuda(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    torch.serialization.register_package(1, on_cuda, lambda obj, location: None)
    try:
        torch.save({"w": torch.arange(3.0)}, tmp_path / "gpu.pth")
    finally:
        torch.serialization._package_registry[:] = [p for p in torch.serialization._package_registry
                                                    if p[1] is not on_cuda]
    with pytest.raises(RuntimeError, match="CUDA"):  # what load_state_dict met before it mapped to the CPU
        torch.load(tmp_path / "gpu.pth", weights_only=True)
    assert load_state_dict(tmp_path / "gpu.pth")["w"].tolist() == [0.0, 1.0, 2.0]


def test_each_rank_keeps_its_own_gpu_random_state(monkeypatch):
    """rng_state holds the rank's device's state only, and a state holding several GPUs' (as saved by
    get_rng_state_all) resumes on a machine with fewer of them."""
    from lit_llama.parallel import rng_state, set_rng_state

    states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(4)}
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: states[device.index])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device.index, state)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was read"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state was set"))
    state = rng_state(torch.device("cuda", 2))
    assert torch.equal(state["cuda"], states[2])
    set_rng_state(state, torch.device("cuda", 0))  # resumed as another rank: its device, the saved state
    set_rng_state({"cpu": torch.get_rng_state(), "cuda": [states[0], states[1]]}, torch.device("cuda", 1))
    set_rng_state({"cpu": torch.get_rng_state(), "cuda": [states[0]]}, torch.device("cuda", 3))  # not saved: left
    assert [(i, s.item()) for i, s in restored] == [(0, 2), (1, 1)]
    assert "cuda" not in rng_state(HOST)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_only_where_the_gpu_computes_it(monkeypatch, native):
    """torch's check counts emulation by default: a V100 or T4 'supports' bf16 and runs it slowly."""
    from lit_llama.inference import inference_device_dtype
    from lit_llama.precision import default_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert default_precision() == ("bf16-true" if native else "32-true")
    assert inference_device_dtype() == (torch.device("cuda"), torch.bfloat16 if native else torch.float16)


def test_nf4_reaches_the_accelerator_a_layer_at_a_time(tiny_checkpoint, monkeypatch):
    """inference.place quantizes each block weight on its way to the device: no dense block weight is on
    it at any quantization (before, the whole dense model was moved first, as large as the GPU allows)."""
    from torchao.quantization import NF4Tensor

    from lit_llama.inference import place
    from lit_llama.quantize import block_linears

    model = load_model(tiny_checkpoint).requires_grad_(False)
    dense_there = []
    with DeviceCheck() as check:
        from_tensor = NF4Tensor.from_tensor

        def counting(weight, *args):
            dense_there.append(sum(check.on_accelerator(m.weight) and not isinstance(m.weight, NF4Tensor)
                                   for _, m in block_linears(model)))
            return from_tensor(weight, *args)

        monkeypatch.setattr(NF4Tensor, "from_tensor", counting)
        place(model, "bf16-true", "nf4")
        assert all(check.on_accelerator(p) for p in model.parameters())
    assert len(dense_there) == 5 * model.config.n_layer and max(dense_there) == 0
    assert all(isinstance(m.weight, NF4Tensor) for _, m in block_linears(model))
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_the_environment_switch_turns_the_check_on_for_a_command(monkeypatch):
    from lit_llama.cli import run

    seen = []
    monkeypatch.setenv(device_check.ENV, "1")
    run(lambda: seen.append(device_check.simulated_accelerator()), [])
    monkeypatch.delenv(device_check.ENV)
    run(lambda: seen.append(device_check.simulated_accelerator()), [])
    assert seen == [ACCELERATOR, None]


def test_scoring_tokens_reads_their_scores_back_twice_a_step():
    """A request with logprobs on the accelerator: its prompt scored from the prefill's hidden states,
    and each sampled token from its logits, with two reads back per scored step (values, then the
    alternatives' ids) beside the step's one read of the sampled ids."""
    from lit_llama.decoder import Decoder
    from lit_llama.generate import ContinuousBatch, Request

    counts = {}
    for steps in (4, 8):
        with DeviceCheck() as check, torch.inference_mode():
            model = tiny_gqa_model().to(ACCELERATOR)
            request = Request([1, 5, 9, 4], steps, logprobs=2, prompt_logprobs=2)
            with Decoder(model, 1, 32) as decoder:
                batch = ContinuousBatch(decoder)
                batch.submit(request)
                while batch.busy:
                    batch.step()
            counts[steps] = check.total()[0]  # reads back to the host
        assert len(request.prompt_scores) == 4 and len(request.generation.logprobs) == steps
    assert (counts[8] - counts[4]) / 4 == 3
