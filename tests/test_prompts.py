import pytest

from lit_llama.prompts import (Segment, alpaca_user_turn, encode_conversation, encode_prompt, encode_segments, mark_label_runs,
                               special_names, split_special)

HI = [565, 959, 264, 267, 36]  # "Hi there!" with the fixture tokenizer
HELLO = [565, 503, 955, 36, 565, 318, 351, 358, 750, 1006]  # "Hello! How can I help?"
BOS, EOT = 1, 1024


def test_two_turn_conversation_exact_ids_and_labels(tokenizer):
    sample = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?"])
    assert sample.ids == [BOS, *HI, EOT, *HELLO, EOT]
    # the user turn and its EOT are masked; every assistant token and its EOT are targets
    assert sample.loss_mask == [False] * 7 + [True] * 11
    assert sample.turn_ends == [7, 18] and sample.reply_ends == [18]


def test_multi_turn_supervises_every_assistant_turn(tokenizer):
    sample = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?", "Hi there!", "Hello! How can I help?"])
    assert sample.ids == [BOS, *HI, EOT, *HELLO, EOT, *HI, EOT, *HELLO, EOT]
    assert sample.loss_mask == ([False] * 7 + [True] * 11) + ([False] * 6 + [True] * 11)
    assert sample.turn_ends == [7, 18, 24, 35] and sample.reply_ends == [18, 35]


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


BE_BRIEF = [919, 595, 959, 952, 968, 973]  # "Be brief."
ADD = [348, 962, 962, 264, 789, 972, 362, 973]  # "Add the numbers."
TWO_AND_THREE = [951, 1001, 280, 951, 1004]  # "2 and 3"
FIVE = [951, 1005]  # "5"


def test_system_text_comes_first_masked_and_closed_by_eot(tokenizer):
    sample = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?"], system="Be brief.")
    assert sample.ids == [BOS, *BE_BRIEF, EOT, *HI, EOT, *HELLO, EOT]
    assert sample.loss_mask == [False] * 14 + [True] * 11
    assert sample.turn_ends == [14, 25] and sample.reply_ends == [25]  # the system text is not a turn
    # never trained, even when user turns are
    unmasked = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?"], mask_inputs=False, system="Be brief.")
    assert unmasked.loss_mask == [False] * 8 + [True] * 17
    prompt = encode_prompt(tokenizer, ["Hi there!"], system="Be brief.")
    assert prompt == sample.ids[:14]


def test_alpaca_user_turn():
    assert alpaca_user_turn("Add the numbers.", "2 and 3") == "Add the numbers.\n\n2 and 3"
    assert alpaca_user_turn("Add the numbers.", "") == alpaca_user_turn("Add the numbers.", " \n") == "Add the numbers."
    assert alpaca_user_turn("Add the numbers.", "2 and 3", style="alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:")
    assert alpaca_user_turn("Add the numbers.", style="alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Response:")


def test_alpaca_rows_as_one_exchange(tokenizer):
    sample = encode_conversation(tokenizer, [alpaca_user_turn("Add the numbers.", "2 and 3"), "5"])
    assert sample.ids == [BOS, *ADD, 13, 13, 1001, 280, 951, 1004, EOT, *FIVE, EOT]  # "\n\n2": no "▁" after the newlines
    assert sample.loss_mask == [False] * 16 + [True] * 3
    sample = encode_conversation(tokenizer, [alpaca_user_turn("Add the numbers."), "5"])
    assert sample.ids == [BOS, *ADD, EOT, *FIVE, EOT]


def test_special_names_and_split(tokenizer):
    names = special_names(tokenizer)
    assert names == {"<s>": 1, "</s>": 2, "<|eot|>": 1024}
    assert split_special("Hi<|eot|></s>x <s>", names) == ["Hi", 1024, 2, "x ", 1]
    assert split_special("no names here", names) == ["no names here"]
    # the longest name wins where names overlap
    assert split_special("a<|eot|>b", {"<|eot|>": 7, "<|eot": 8}) == ["a", 7, "b"]


def test_segments_encode_as_written(tokenizer):
    # text right after text continues it: no space appears between "Hi" and " there!"
    [sample] = encode_segments(tokenizer, [[Segment("Hi"), Segment(" there!", label=True)]])
    assert sample.ids == HI == tokenizer.encode("Hi there!")
    assert sample.loss_mask == [False, False, True, True, True]
    # text after a special id starts afresh, like each turn of a conversation: a segments layout can
    # spell the LIMA format id for id
    layout = mark_label_runs([Segment(special_id=BOS), Segment("Hi there!"), Segment(special_id=EOT),
                              Segment("Hello! How can I help?", label=True), Segment(special_id=EOT, label=True)])
    [sample] = encode_segments(tokenizer, [layout])
    lima = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?"])
    assert (sample.ids, sample.loss_mask, sample.turn_ends, sample.reply_ends) == (lima.ids, lima.loss_mask, [7, 18], [18])


def test_role_tokens_open_every_turn_and_the_reply(base_tokenizer):
    from lit_llama.tokenizer import extend_tokenizer

    tokenizer = extend_tokenizer(base_tokenizer, role_tokens=True)
    SYSTEM, USER, ASSISTANT = (tokenizer.roles[r] for r in ("system", "user", "assistant"))
    assert (EOT, SYSTEM, USER, ASSISTANT) == (1024, 1025, 1026, 1027)
    sample = encode_conversation(tokenizer, ["Hi there!", "Hello! How can I help?"], system="Hi there!")
    assert sample.ids == [BOS, SYSTEM, *HI, EOT, USER, *HI, EOT, ASSISTANT, *HELLO, EOT]
    # role tokens are never targets: the assistant's is part of the prompt its reply follows
    assert sample.loss_mask == [False] * 16 + [True] * 11
    assert encode_prompt(tokenizer, ["Hi there!"]) == [BOS, USER, *HI, EOT, ASSISTANT]
    assert encode_prompt(tokenizer, ["Hi there!"]) == sample.ids[:1] + sample.ids[8:16]


@pytest.mark.parametrize("roles", [False, True])
@pytest.mark.parametrize("system", [None, "Hi there!"])
@pytest.mark.parametrize("mask_inputs", [True, False])
def test_the_first_exchange_of_a_sample_is_the_prompt_inference_makes(base_tokenizer, roles, system, mask_inputs):
    """evaluate_halting and the training's sample reply ask the model the first user turn as generation
    does; with role tokens that prompt ends in <|ASSISTANT|>, which is never trained."""
    from lit_llama.prompts import first_exchange
    from lit_llama.tokenizer import extend_tokenizer

    tokenizer = extend_tokenizer(base_tokenizer, role_tokens=roles)
    turns = ["Hi there!", "Hello! How can I help?", "Hi there!", "Bye"]
    sample = encode_conversation(tokenizer, turns, mask_inputs=mask_inputs, system=system)
    prompt, reply = first_exchange(tokenizer, sample.ids, sample.loss_mask)
    assert prompt == encode_prompt(tokenizer, turns[:1], system)
    assert tokenizer.decode(reply) == turns[1]
