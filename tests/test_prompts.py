import pytest

from lit_llama.prompts import encode_conversation, encode_prompt

HI = [565, 959, 264, 267, 36]  # "Hi there!" with the fixture tokenizer
HELLO = [565, 503, 955, 36, 565, 318, 351, 358, 750, 1006]  # "Hello! How can I help?"
BOS, EOT = 1, 1024


def test_two_turn_conversation_exact_ids_and_labels(tokenizer):
    sample = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?"])
    assert sample.ids == [BOS, *HI, EOT, *HELLO, EOT]
    # the user turn and its EOT are masked; every assistant token and its EOT are targets
    assert sample.loss_mask == [False] * 7 + [True] * 11
    assert sample.turn_ends == [7, 18]


def test_multi_turn_supervises_every_assistant_turn(tokenizer):
    sample = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?", "Hi there!", "Hello! How can I help?"])
    assert sample.ids == [BOS, *HI, EOT, *HELLO, EOT, *HI, EOT, *HELLO, EOT]
    assert sample.loss_mask == ([False] * 7 + [True] * 11) + ([False] * 6 + [True] * 11)
    assert sample.turn_ends == [7, 18, 24, 35]


def test_unmasked_inputs_train_everything_but_bos(tokenizer):
    sample = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?"], mask_inputs=False)
    assert sample.loss_mask == [False] + [True] * 17


def test_prompt_is_the_training_prefix(tokenizer):
    turns = ["Hi there!", "Hello! How can I help?", "Hi there!"]
    prompt = encode_prompt(tokenizer, turns)
    assert prompt == [BOS, *HI, EOT, *HELLO, EOT, *HI, EOT]
    full = encode_conversation(tokenizer, turns + ["Hello! How can I help?"])
    assert full.ids[: len(prompt)] == prompt  # inference sees exactly what training saw
    with pytest.raises(ValueError, match="odd number of turns"):
        encode_prompt(tokenizer, turns[:2])


def test_needs_an_eot_token(base_tokenizer):
    with pytest.raises(ValueError, match="no end-of-turn token"):
        encode_conversation(base_tokenizer, ["a", "b"])
