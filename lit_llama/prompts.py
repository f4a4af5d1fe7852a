"""The conversation format, defined once for training data and for inference prompts.

    <bos> user <EOT> assistant <EOT> user <EOT> assistant <EOT> ...

Each turn is encoded on its own and closed by the end-of-turn id, inserted by id (never parsed from
text). In training labels the user turns and their EOT are masked; every assistant token and the EOT
that ends it are learned, which is how the model learns to stop. An inference prompt is the same
encoding of a conversation that ends with a user turn, so the model continues with the assistant's.
"""

from dataclasses import dataclass

from lit_llama.tokenizer import Tokenizer


@dataclass
class EncodedConversation:
    ids: list[int]
    loss_mask: list[bool]  # True where the id is a training target
    turn_ends: list[int]  # turn_ends[i]: index just past the EOT of turn i (where a cut keeps whole turns)


def encode_conversation(tokenizer: Tokenizer, turns: list[str], mask_inputs: bool = True) -> EncodedConversation:
    """Encode alternating user/assistant `turns` (user first)."""
    if tokenizer.eot_id is None:
        raise ValueError("the tokenizer has no end-of-turn token: prepare the data with scripts/prepare_lima.py")
    ids, loss_mask, turn_ends = [tokenizer.bos_id], [False], []
    for i, text in enumerate(turns):
        turn = tokenizer.encode(text) + [tokenizer.eot_id]
        is_assistant = i % 2 == 1
        ids += turn
        loss_mask += [is_assistant or not mask_inputs] * len(turn)
        turn_ends.append(len(ids))
    return EncodedConversation(ids, loss_mask, turn_ends)


def encode_prompt(tokenizer: Tokenizer, turns: list[str]) -> list[int]:
    """Ids of a conversation that ends with a user turn, ready for the assistant's reply."""
    if len(turns) % 2 != 1:
        raise ValueError(f"a prompt needs an odd number of turns ending with the user's, got {len(turns)}")
    return encode_conversation(tokenizer, turns).ids
