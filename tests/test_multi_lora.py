"""Several LoRAs of one base in one continuous batch (lit_llama/multi_lora.py, generate/serve.py --lora):
each row of a batch gets the logits and the greedy replies of its own LoRA served alone, or of the base;
LoRAs that do not share one vocabulary are refused in one line."""

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_script
from lit_llama.checkpoint import load_finetuned, load_model
from lit_llama.cli import run
from lit_llama.decoder import Decoder, compile_step
from lit_llama.device_check import DeviceCheck
from lit_llama.errors import UsageError
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.generate import ContinuousBatch, Request, generate, resolve_stop_ids
from lit_llama.inference import place
from lit_llama.lora import LoRAConfig
from lit_llama.multi_lora import attach_loras, load_loras
from lit_llama.prepare import PrepareDirs, VocabChange
from lit_llama.prompts import encode_prompt
from lit_llama.training import TrainArgs

CHATS = [["How do plants drink water?"], ["Name a colour."], ["Hello!", "Hi, how can I help?", "Tell me a story."]]


def trained_lora(checkpoint: Path, data: Path, out_dir: Path, lora: LoRAConfig, seed: int) -> Path:
    """A finetune/lora.py out dir whose trained weights are then drawn at random, so each shows in the logits."""
    load_script("finetune/lora.py").setup(
        data=DataArgs(data, checkpoint_dir=checkpoint), layout=RunLayout(out_dir), lora=lora,
        train=TrainArgs(max_iters=1, warmup_iters=1, global_batch_size=2, micro_batch_size=2, eval_interval=1,
                        eval_iters=1))
    weights = out_dir / "lit_model_lora.pth"
    trained = torch.load(weights, weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in trained.items():
        if tensor.is_floating_point():
            trained[name] = torch.randn(tensor.shape, generator=generator) * 0.1
    torch.save(trained, weights)
    return out_dir


@pytest.fixture(scope="module")
def loras(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Three LoRAs of the tiny base: two with "▁twenty" as the end-of-turn token, of other ranks and targets
    (one adapts the head too), and one whose end-of-turn token was appended to the vocabulary."""
    root = tmp_path_factory.mktemp("multi_lora")
    prepare = load_script("scripts/prepare_lima.py").prepare
    sample = REPO / "data" / "lima_sample.jsonl"
    prepare(data_path=sample, dirs=PrepareDirs(tiny_checkpoint, root / "repurposed"),
            vocab=VocabChange(repurpose_eot="▁twenty"))
    prepare(data_path=sample, dirs=PrepareDirs(tiny_checkpoint, root / "appended"))
    return {
        "qv": trained_lora(tiny_checkpoint, root / "repurposed", root / "qv", LoRAConfig(r=4, alpha=8), seed=1),
        "wide": trained_lora(tiny_checkpoint, root / "repurposed", root / "wide",
                             LoRAConfig(r=2, alpha=16, key=True, projection=True, mlp=True, head=True), seed=2),
        "appended": trained_lora(tiny_checkpoint, root / "appended", root / "appended_lora", LoRAConfig(r=4), seed=3),
    }


def served(checkpoint: Path, named: dict[str, Path]) -> tuple:
    """The base with the LoRAs of `named` attached, as generate/serve.py places them (fp32 on the CPU)."""
    model, tokenizer, trained = load_loras(list(named.values()), checkpoint)
    bank = attach_loras(model.eval(), ["base", *named], trained, tokenizer.base_vocab_size)
    return model, tokenizer, bank


def test_each_row_of_one_forward_pass_gets_its_own_loras_logits(tiny_checkpoint, loras):
    named = {"qv": loras["qv"], "wide": loras["wide"]}
    model, tokenizer, bank = served(tiny_checkpoint, named)
    ids = encode_prompt(tokenizer, CHATS[2])
    assert tokenizer.eot_id in ids  # the special rows are read as well as scored
    bank.rows = torch.tensor([2, 0, 1])  # wide, the base, qv
    with torch.no_grad():
        got = model(torch.tensor([ids] * 3))
        alone = [load_finetuned(loras["wide"])[0], load_model(tiny_checkpoint), load_finetuned(loras["qv"])[0]]
        expected = [m.eval()(torch.tensor([ids]))[0, :, : tokenizer.vocab_size] for m in alone]
    for row in range(3):
        torch.testing.assert_close(got[row], expected[row], atol=1e-4, rtol=0)  # unmerged against merged updates


def test_the_base_never_scores_an_id_appended_for_a_lora(tiny_checkpoint, loras):
    model, tokenizer, bank = served(tiny_checkpoint, {"appended": loras["appended"]})
    assert tokenizer.eot_id >= tokenizer.base_vocab_size
    ids = encode_prompt(tokenizer, CHATS[0])
    bank.rows = torch.tensor([0, 1])
    with torch.no_grad():
        got = model(torch.tensor([ids] * 2))
        lora = load_finetuned(loras["appended"])[0].eval()(torch.tensor([ids]))[0, :, : tokenizer.vocab_size]
        base = load_model(tiny_checkpoint).eval()(torch.tensor([ids[:-1]]))[0]  # the EOT last: the base reads it as 0s
    assert torch.isneginf(got[0, :, tokenizer.eot_id]).all()
    torch.testing.assert_close(got[0, :-1, : tokenizer.base_vocab_size], base, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], lora, atol=1e-4, rtol=0)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_mixed_continuous_batch_replies_as_each_lora_alone(tiny_checkpoint, loras, compiled):
    """Greedy, fp32: two slots take six requests of the base and two LoRAs, one after another, the same
    prompt for different LoRAs included (a slot's cache of one LoRA is not the other's). Compiled, the
    step's graph reads each row's LoRA as it is at that step."""
    named = {"qv": loras["qv"], "wide": loras["wide"]}
    model, tokenizer, bank = served(tiny_checkpoint, named)
    stop_ids = resolve_stop_ids(tokenizer)
    asked = [("qv", CHATS[0]), ("wide", CHATS[0]), ("base", CHATS[1]), ("wide", CHATS[2]), ("qv", CHATS[2]),
             ("base", CHATS[0])]
    requests = [Request(encode_prompt(tokenizer, chat), 12, stop_ids=stop_ids, lora=bank.names.index(name))
                for name, chat in asked]
    step = compile_step(model) if compiled else None
    with torch.inference_mode(), Decoder(model, 2, 128, step, bank=bank) as decoder:
        batch = ContinuousBatch(decoder)
        for request in requests:
            batch.submit(request)
        while batch.busy:
            batch.step()
    alone = {"base": load_model(tiny_checkpoint).eval(), **{name: load_finetuned(d)[0].eval() for name, d in named.items()}}
    for (name, chat), request in zip(asked, requests):
        expected = generate(alone[name], encode_prompt(tokenizer, chat), 12, stop_ids=stop_ids)
        assert request.generation == expected, name
    assert len({tuple(r.generation.tokens) for r in requests[:2]}) == 2  # the LoRAs do differ on one prompt


def test_loras_of_other_vocabularies_are_refused(tiny_checkpoint, loras, tmp_path):
    with pytest.raises(UsageError, match="other special tokens than .*serve it alone"):
        load_loras([loras["qv"], loras["appended"]], tiny_checkpoint)
    other = tmp_path / "other_eot"
    shutil.copytree(loras["qv"], other)
    special = json.loads((other / "special_tokens.json").read_text())
    special["eot_id"] = special["tokens"][0]["id"] = 21  # another piece as the end-of-turn token
    (other / "special_tokens.json").write_text(json.dumps(special))
    with pytest.raises(UsageError, match="<|eot|>=21 against <|eot|>="):
        load_loras([loras["qv"], other], tiny_checkpoint)


def messages(chat: list[str]) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(chat)]


def test_the_server_answers_for_the_base_and_each_lora_as_each_alone(tiny_checkpoint, loras):
    """generate/serve.py --lora qv=... --lora wide=...: nine concurrent chats, three per model, in batches
    of three rows, through the openai client; each reply is the one its model gives alone."""
    openai = pytest.importorskip("openai")
    from test_serve import KEY, start_server

    process, url = start_server(tiny_checkpoint, "--lora", f"qv={loras['qv']}", "--lora", f"wide={loras['wide']}",
                                "--api_key", KEY, batch_size=3)
    try:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert [model.id for model in client.models.list()] == ["tiny", "qv", "wide"]
        asked = [(name, chat) for chat in CHATS for name in ("qv", "wide", "tiny")]
        with ThreadPoolExecutor(len(asked)) as pool:
            replies = list(pool.map(lambda a: client.chat.completions.create(
                model=a[0], messages=messages(a[1]), max_tokens=12, temperature=0), asked))
        with pytest.raises(openai.NotFoundError, match="'tiny', 'qv', 'wide'"):
            client.completions.create(model="other", prompt="Hello", max_tokens=2)
    finally:
        process.terminate()
        process.wait(timeout=60)
    _, tokenizer, _ = served(tiny_checkpoint, {"qv": loras["qv"]})
    alone = {"tiny": load_model(tiny_checkpoint).eval(), "qv": load_finetuned(loras["qv"])[0].eval(),
             "wide": load_finetuned(loras["wide"])[0].eval()}
    for (name, chat), reply in zip(asked, replies):
        expected = generate(alone[name], encode_prompt(tokenizer, chat), 12, stop_ids=resolve_stop_ids(tokenizer))
        assert (reply.model, reply.choices[0].message.content) == (name, tokenizer.decode(expected.tokens))


@pytest.mark.parametrize("flags, message", [
    (["--lora", "qv"], "--lora 'qv': give NAME=DIR"),
    (["--lora", "a={qv}", "--lora", "a={wide}"], "--lora a is given twice"),
    (["--lora", "a={qv}", "--lora", "b={appended}"], "other special tokens than"),
    (["--lora", "a={qv}", "--lora_path", "{wide}"], "--lora serves LoRAs beside a base"),
    (["--lora", "tiny={qv}"], "--lora tiny: the base is served as 'tiny'"),
])
def test_bad_lora_flags_end_in_one_line(tiny_checkpoint, loras, capsys, flags, message):
    pytest.importorskip("uvicorn")
    serve = load_script("generate/serve.py")
    with pytest.raises(SystemExit) as exit_:
        run(serve.main, ["--checkpoint_dir", str(tiny_checkpoint), *(flag.format(**loras) for flag in flags)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_on_an_accelerator_a_mixed_batch_reads_back_once_a_step(tiny_checkpoint, loras):
    """Placed on the simulated accelerator as generate/serve.py places it, the LoRAs' stacked matrices and
    rows sit beside the base, and a step of rows of different LoRAs reads back only the sampled ids."""
    named = {"qv": loras["qv"], "wide": loras["wide"]}
    reads = {}
    for steps in (4, 8):
        with DeviceCheck() as check, torch.inference_mode():
            model, tokenizer, trained = load_loras(list(named.values()), tiny_checkpoint)
            model = place(model)
            bank = attach_loras(model, ["base", *named], trained, tokenizer.base_vocab_size)
            requests = [Request(encode_prompt(tokenizer, chat), steps, lora=lora) for lora, chat in enumerate(CHATS)]
            with Decoder(model, 3, 64, bank=bank) as decoder:
                batch = ContinuousBatch(decoder)
                for request in requests:
                    batch.submit(request)
                while batch.busy:
                    batch.step()
            reads[steps] = check.total()[0]
        assert all(len(r.generation.tokens) == steps for r in requests)
    assert (reads[8] - reads[4]) / 4 == 1
