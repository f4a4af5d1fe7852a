import json

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from conftest import REPO
from lit_llama.generate import resolve_stop_ids
from lit_llama.tokenizer import DEFAULT_EOT, Tokenizer, extend_tokenizer


def test_base_ids_are_llama_like(base_tokenizer):
    assert (base_tokenizer.processor.unk_id(), base_tokenizer.bos_id, base_tokenizer.eos_id) == (0, 1, 2)
    assert base_tokenizer.vocab_size == 1024
    assert base_tokenizer.eot_id is None and base_tokenizer.stop_ids == [2]


def test_eot_is_appended_as_a_control_piece(base_tokenizer, tokenizer):
    assert tokenizer.eot_id == 1024 == base_tokenizer.vocab_size
    assert tokenizer.vocab_size == 1025
    assert tokenizer.stop_ids == [1024, 2]
    assert tokenizer.processor.is_control(1024)
    assert tokenizer.processor.id_to_piece(1024) == DEFAULT_EOT
    # every base piece keeps its id
    for i in range(base_tokenizer.vocab_size):
        assert tokenizer.processor.id_to_piece(i) == base_tokenizer.processor.id_to_piece(i)


def test_saved_tokenizer_is_plain_sentencepiece(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    plain = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert plain.piece_to_id(DEFAULT_EOT) == 1024 and plain.is_control(1024)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "tokenizer.model").read_bytes())
    assert proto.pieces[1024].type == sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL

    special = json.loads((tmp_path / "special_tokens.json").read_text())
    assert special["tokens"] == [{"content": DEFAULT_EOT, "id": 1024, "mode": "appended"}]
    assert special["eot_id"] == 1024 and special["stop_ids"] == [1024, 2] and special["base_vocab_size"] == 1024

    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.eot_id == 1024 and reloaded.special_tokens == {DEFAULT_EOT: 1024}
    assert reloaded.base_sha256 == tokenizer.base_sha256


@pytest.mark.parametrize("text", [DEFAULT_EOT, f"a{DEFAULT_EOT}b", f"stop {DEFAULT_EOT} now", "<s></s>", "<|eot|"])
def test_text_never_encodes_to_a_special_id(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.eot_id not in ids and tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == text  # the literal survives as ordinary pieces


def test_decode_skips_or_shows_special_tokens(tokenizer):
    ids = [tokenizer.bos_id] + tokenizer.encode("Hi there") + [tokenizer.eot_id] + tokenizer.encode("Bye")
    assert tokenizer.decode(ids) == "Hi there Bye"
    assert tokenizer.decode(ids, skip_special=False) == f"Hi there{DEFAULT_EOT}Bye"


def test_unicode_and_byte_fallback_round_trip(tokenizer):
    text = "café 你好 🙂\nnew line\ttab"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_refuses_an_existing_piece_and_a_second_eot(base_tokenizer, tokenizer):
    with pytest.raises(ValueError, match="already a piece"):
        base_tokenizer.with_special_tokens(["<s>"], eot="<s>")
    with pytest.raises(ValueError, match="already has an end-of-turn token"):
        tokenizer.with_special_tokens(["<|end|>"], eot="<|end|>")


TWENTY = 823  # "▁twenty": a piece the shipped LIMA sample never uses


@pytest.mark.parametrize("piece", ["▁twenty", 823, "823"])
def test_repurpose_an_existing_piece_by_text_or_id(base_tokenizer, tmp_path, piece):
    tokenizer = extend_tokenizer(base_tokenizer, repurpose_eot=piece)
    assert tokenizer.eot_id == TWENTY and tokenizer.vocab_size == 1024  # the vocabulary does not grow
    assert tokenizer.special_tokens == {DEFAULT_EOT: TWENTY} and tokenizer.special[0].mode == "repurposed"
    tokenizer.save(tmp_path)
    plain = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    # renamed in the written model, so that no tool matching special tokens by text finds it in text
    assert plain.is_control(TWENTY) and plain.id_to_piece(TWENTY) == DEFAULT_EOT
    special = json.loads((tmp_path / "special_tokens.json").read_text())
    assert special["tokens"] == [{"content": DEFAULT_EOT, "id": TWENTY, "mode": "repurposed", "piece": "▁twenty"}]
    assert special["stop_ids"] == [TWENTY, 2]
    assert Tokenizer.from_dir(tmp_path).special == tokenizer.special


def test_text_that_used_to_encode_to_the_repurposed_piece_now_avoids_it(base_tokenizer):
    tokenizer = extend_tokenizer(base_tokenizer, repurpose_eot="▁twenty")
    text = "twenty-one is twenty plus one; twenty"
    assert TWENTY in base_tokenizer.encode(text)
    ids = tokenizer.encode(text)
    assert TWENTY not in ids
    assert tokenizer.decode(ids) == text  # encoded with other pieces, nothing lost
    # the other pieces keep their ids
    assert tokenizer.encode("the cat") == base_tokenizer.encode("the cat")


@pytest.mark.parametrize("piece, reason", [
    ("<s>", "control piece"), ("</s>", "control piece"), (0, "unknown piece"), ("<0x41>", "byte piece"),
    ("▁nonexistent_piece", "not a piece"), (5000, "outside the vocabulary"),
])
def test_repurpose_refuses_special_byte_and_unknown_pieces(base_tokenizer, piece, reason):
    reason = {"control piece": "bos/eos/unk/pad and special tokens keep their roles",
              "unknown piece": "bos/eos/unk/pad and special tokens keep their roles"}.get(reason, reason)
    with pytest.raises(ValueError, match=reason):
        extend_tokenizer(base_tokenizer, repurpose_eot=piece)


def test_a_numeric_piece_is_named_by_its_text_and_other_digits_are_ids(base_tokenizer):
    one = base_tokenizer.processor.piece_to_id("1")  # the tiny tokenizer has the pieces "0" to "9"
    assert one != 1 and base_tokenizer.piece_id("1") == one
    assert resolve_stop_ids(base_tokenizer, stop_tokens=("1",)) == (base_tokenizer.eos_id, one)
    assert base_tokenizer.piece_id("823") == base_tokenizer.piece_id(823) == TWENTY  # no piece "823": an id


@pytest.fixture(scope="module")
def reserved_tokenizer(tmp_path_factory) -> Tokenizer:
    """A tokenizer like Mistral v0.3's: control pieces held in reserve, and role pieces of its own format."""
    prefix = tmp_path_factory.mktemp("reserved") / "spm"
    spm.SentencePieceTrainer.train(input=str(REPO / "data" / "tiny" / "corpus.txt"), model_prefix=str(prefix),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=3, control_symbols=["[INST]", "[/INST]", *(f"[control_{i}]" for i in range(8))],
                                   minloglevel=2)
    return Tokenizer(prefix.with_suffix(".model").read_bytes())


def test_a_reserved_control_piece_can_be_repurposed(reserved_tokenizer, capsys):
    i = reserved_tokenizer.piece_id("[control_5]")
    tokenizer = extend_tokenizer(reserved_tokenizer, repurpose_eot="[control_5]")
    assert tokenizer.eot_id == i and tokenizer.vocab_size == reserved_tokenizer.vocab_size
    assert tokenizer.special[0].piece == "[control_5]" and tokenizer.processor.id_to_piece(i) == DEFAULT_EOT
    assert tokenizer.processor.is_control(i) and i not in tokenizer.encode("[control_5] <|eot|> text")
    assert capsys.readouterr().err == ""
    # one named like a role of the model's own format is allowed, with a warning
    inst = reserved_tokenizer.piece_id("[INST]")
    assert extend_tokenizer(reserved_tokenizer, repurpose_eot="[INST]").eot_id == inst
    assert "warning: '[INST]'" in capsys.readouterr().err
    # bos, eos, unk and pad keep their roles
    for role in ("<pad>", "<s>", "</s>", "<unk>"):
        with pytest.raises(ValueError, match="keep their roles"):
            extend_tokenizer(reserved_tokenizer, repurpose_eot=role)


def test_a_tokenizer_with_an_eot_keeps_it_for_a_second_round(tokenizer):
    assert extend_tokenizer(tokenizer) is tokenizer
    assert extend_tokenizer(tokenizer, eot_token=DEFAULT_EOT) is tokenizer
    more = extend_tokenizer(tokenizer, extra_special_tokens=["<|user|>"])  # only new tokens are added
    assert more.special_tokens == {DEFAULT_EOT: 1024, "<|user|>": 1025} and more.eot_id == 1024
    assert more.base_vocab_size == 1024 and more.base_sha256 == tokenizer.base_sha256
    with pytest.raises(ValueError, match=r"already has an end-of-turn token, '<\|eot\|>' \(id 1024\): a second round reuses it"):
        extend_tokenizer(tokenizer, eot_token="<|end|>")
    with pytest.raises(ValueError, match="a second round reuses it"):
        extend_tokenizer(tokenizer, repurpose_eot="▁twenty")


def test_several_appended_tokens(base_tokenizer, tmp_path):
    tokenizer = base_tokenizer.with_special_tokens(append=[DEFAULT_EOT, "<|user|>", "<|assistant|>"], eot=DEFAULT_EOT)
    assert tokenizer.special_tokens == {DEFAULT_EOT: 1024, "<|user|>": 1025, "<|assistant|>": 1026}
    assert tokenizer.eot_id == 1024 and tokenizer.stop_ids == [1024, 2]
    for text in ("<|user|> hi <|assistant|>", "<|eot|><|user|>"):
        assert not set(tokenizer.encode(text)) & {1024, 1025, 1026}
    tokenizer.save(tmp_path)
    assert Tokenizer.from_dir(tmp_path).special_tokens == tokenizer.special_tokens
    with pytest.raises(ValueError, match="not among the special tokens"):
        base_tokenizer.with_special_tokens(append=["<|user|>"], eot=DEFAULT_EOT)
