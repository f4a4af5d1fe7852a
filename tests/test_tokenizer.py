import json

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from lit_llama.tokenizer import DEFAULT_EOT, Tokenizer


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


def test_refuses_an_existing_piece_and_double_extension(base_tokenizer, tokenizer):
    with pytest.raises(ValueError, match="already a piece"):
        base_tokenizer.with_special_tokens(["<s>"], eot="<s>")
    with pytest.raises(ValueError, match="already has special tokens"):
        tokenizer.with_special_tokens(["<|user|>"])
