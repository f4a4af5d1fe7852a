"""Chat: the KV cache kept across turns gives what a fresh run on the whole history gives."""

import copy

import pytest
import torch

from conftest import load_script
from lit_llama.checkpoint import save_checkpoint_dir
from lit_llama.inference import ModelSource
from lit_llama.decoder import common_prefix
from lit_llama.generate import Sampling, Stopping, generate
from lit_llama.model import LLaMA, LLaMAConfig
from lit_llama.prompts import encode_prompt
from lit_llama.streaming import Chat


@pytest.fixture(scope="module")
def model(tokenizer) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(LLaMAConfig.from_name("tiny", vocab_size=tokenizer.vocab_size, n_layer=2)).eval()


@pytest.fixture(scope="module")
def fresh(model) -> LLaMA:
    """The same weights, for fresh runs while a chat holds the model's KV cache."""
    return copy.deepcopy(model)


def new_chat(model, tokenizer, **kwargs) -> Chat:
    return Chat(model, tokenizer, max_new_tokens=12, stop_ids=(tokenizer.eot_id,), **kwargs)


def test_second_turn_with_the_cache_equals_a_fresh_run_on_the_history(model, fresh, tokenizer):
    chat = new_chat(model, tokenizer)
    first = "".join(chat.send("How do plants drink water?"))
    assert first == tokenizer.decode(chat.last.tokens) and chat.turns == ["How do plants drink water?", first]
    cached = list(chat.decoder.held[0])
    "".join(chat.send("And trees?"))
    history = encode_prompt(tokenizer, ["How do plants drink water?", first, "And trees?"])
    # only what the cache did not hold was read: at least the first turn was kept (the reply may be read
    # again from where its text encodes to other ids than the model sampled)
    assert chat.decoder.prefilled == len(history) - common_prefix(cached, history)
    assert chat.decoder.prefilled <= len(history) - len(encode_prompt(tokenizer, ["How do plants drink water?"]))
    assert chat.last == generate(fresh, history, 12, stop_ids=(tokenizer.eot_id,))
    chat.close()


def test_reset_starts_a_new_conversation(model, tokenizer):
    chat = new_chat(model, tokenizer)
    first = "".join(chat.send("Hello there"))
    "".join(chat.send("Tell me more"))
    chat.reset()
    assert "".join(chat.send("Hello there")) == first and chat.turns == ["Hello there", first]
    chat.close()


def test_history_is_trimmed_by_whole_exchanges_to_fit_the_context(model, fresh, tokenizer):
    chat = new_chat(model, tokenizer, max_seq_length=64)
    messages = ["How do plants drink water?", "And trees in a dry summer?", "What about a cactus?", "Why?"]
    for message in messages:
        history = chat.turns + [message]
        "".join(chat.send(message))
        assert len(encode_prompt(tokenizer, chat.turns[:-1])) + 12 <= 64
        kept = chat.turns[:-1]  # the prompt of this turn: what was kept of the history, and the message
        assert kept[-1] == message and kept == history[len(history) - len(kept):] and len(kept) % 2 == 1
        assert chat.dropped == len(history) - len(kept)
        assert chat.last == generate(fresh, encode_prompt(tokenizer, kept), 12, stop_ids=(tokenizer.eot_id,))
    assert chat.dropped > 0  # the conversation did outgrow the context
    with pytest.raises(ValueError, match="no room left in the context of 64"):
        "".join(chat.send("word " * 80))
    chat.close()


def test_a_typed_end_of_turn_token_is_text(model, tokenizer):
    chat = Chat(model, tokenizer, max_new_tokens=5, stop_ids=tuple(tokenizer.stop_ids))
    "".join(chat.send("Say <|eot|> twice <|eot|>"))
    cached = chat.decoder.held[0]
    first_eot = cached.index(tokenizer.eot_id)
    assert tokenizer.decode(cached[1:first_eot]) == "Say <|eot|> twice <|eot|>"
    assert first_eot == len(encode_prompt(tokenizer, ["Say <|eot|> twice <|eot|>"])) - 1  # the turn ends after it
    chat.close()


def test_chat_cli(model, tokenizer, tmp_path, monkeypatch, capsys):
    save_checkpoint_dir(model, tokenizer, tmp_path / "ckpt")
    lines = iter(["Hello <|eot|> there", "", "/reset", "Hello <|eot|> there", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    load_script("generate/chat.py").main(source=ModelSource(checkpoint_dir=tmp_path / "ckpt"),
                                         sampling=Sampling(temperature=0), stopping=Stopping(max_new_tokens=8))
    out, err = capsys.readouterr()
    expected = tokenizer.decode(generate(model, encode_prompt(tokenizer, ["Hello <|eot|> there"]), 8,
                                         stop_ids=tuple(tokenizer.stop_ids)).tokens)
    assert out == f"{expected}\n{expected}\n"
    assert len([line for line in err.splitlines() if line.startswith("[")]) == 2  # a stats line per reply
    assert "(new conversation)" in err and next(lines) == "never read"


def test_a_system_text_on_a_model_that_never_saw_one_is_warned_about(model, tokenizer, base_tokenizer, capsys):
    from lit_llama.tokenizer import extend_tokenizer

    trained_without = copy.copy(tokenizer)
    trained_without.system_text = False
    [warning] = new_chat(model, trained_without, system="Be brief.").warnings
    assert warning.startswith("warning: this model was fine-tuned without system texts and without "
                              "role tokens: a system text shifts which turn it reads as its own")
    assert new_chat(model, trained_without).warnings == []  # no system text: nothing to warn about
    with_roles = extend_tokenizer(base_tokenizer, role_tokens=True)
    with_roles.system_text = False
    chat = new_chat(LLaMA(LLaMAConfig.from_name("tiny", vocab_size=with_roles.vocab_size, n_layer=1)), with_roles,
                    system="Be brief.")
    assert chat.warnings == []
    assert capsys.readouterr().err == ""  # the library prints nothing: generate/chat.py prints the warnings


def test_chat_cli_prints_the_warnings(model, tokenizer, tmp_path, monkeypatch, capsys):
    trained_without = copy.copy(tokenizer)
    trained_without.system_text = False
    save_checkpoint_dir(model, trained_without, tmp_path / "ckpt")
    monkeypatch.setattr("builtins.input", lambda prompt="": "/exit")
    load_script("generate/chat.py").main(source=ModelSource(checkpoint_dir=tmp_path / "ckpt"), system="Be brief.")
    assert capsys.readouterr().err.startswith("warning: this model was fine-tuned without system texts")
