"""Faults and bad input: nothing lost, nothing injected, one clear line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2

from conftest import REPO, load_script
from lit_llama.checkpoint import load_finetuned, load_state_dict
from lit_llama.finetune import DataArgs, RunLayout
from lit_llama.model import LLaMA
from lit_llama.prompts import encode_conversation
from lit_llama.tokenizer import extend_tokenizer
from lit_llama.training import TrainArgs

QUICK = dict(warmup_iters=1, global_batch_size=2, micro_batch_size=2, eval_interval=100, eval_iters=1)


def lora_setup(tiny_checkpoint, lima_data, out_dir, **train):
    load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint), layout=RunLayout(out_dir),
                                          train=TrainArgs(**{**QUICK, **train}))


def test_sigterm_saves_a_checkpoint_and_stops(tiny_checkpoint, lima_data, tmp_path):
    out_dir = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "finetune/lora.py", "--data_dir", str(lima_data), "--checkpoint_dir", str(tiny_checkpoint),
                             "--out_dir", str(out_dir), "--train.max_iters", "2000", "--train.save_interval", "0",
                             "--train.eval_interval", "1000"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while (not (out_dir / "metrics.csv").exists() or len((out_dir / "metrics.csv").read_text().splitlines()) < 3) \
            and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "SIGTERM: saved a checkpoint" in output and "--resume true" in output
    state = torch.load(out_dir / "training_state.pth", weights_only=True)
    rows = (out_dir / "metrics.csv").read_text().splitlines()[1:]
    assert 2 <= state["step"] < 2000 and state["step"] == len(rows)  # the step it stopped at, saved
    assert load_finetuned(out_dir)[0] is not None


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_checkpoint, lima_data, tmp_path):
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=r"the (training loss|gradient norm) is (nan|inf) at step (\d+); stopped before updating") as error:
        lora_setup(tiny_checkpoint, lima_data, out_dir, learning_rate=1e30, max_iters=20, save_interval=1)
    bad_step = int(error.value.args[0].split(" at step ")[1].split(";")[0])
    state = torch.load(out_dir / "training_state.pth", weights_only=True)
    assert state["step"] == bad_step - 1  # the last good one, not overwritten
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_unwritable_or_full_out_dir_fails_before_training(tiny_checkpoint, lima_data, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=f"--out_dir {blocker / 'out'} is not writable"):
        lora_setup(tiny_checkpoint, lima_data, blocker / "out", max_iters=1)

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match="GiB free but checkpoints need about"):
        lora_setup(tiny_checkpoint, lima_data, tmp_path / "full_disk", max_iters=1)
    assert not (tmp_path / "full_disk" / "metrics.csv").exists()


def test_a_device_count_the_machine_lacks_fails_before_loading(tiny_checkpoint, lima_data, tmp_path, monkeypatch):
    def setup(**flags):
        load_script("finetune/lora.py").setup(data=DataArgs(lima_data, checkpoint_dir=tiny_checkpoint),
                                              layout=RunLayout(tmp_path / "out", **flags), train=TrainArgs(**QUICK))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="--accelerator cuda: no CUDA device is visible"):
        setup(accelerator="cuda")
    with pytest.raises(ValueError, match="--devices 0: give the number of devices per node"):
        setup(devices=0)
    with pytest.raises(ValueError, match="--accelerator tpux: You selected an invalid accelerator"):
        setup(accelerator="tpux")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--devices 4: this machine has 2 CUDA device\(s\) visible; use --devices 2"):
        setup(accelerator="auto", devices=4)
    assert not (tmp_path / "out").exists()  # nothing written, nothing loaded


def test_code_in_a_checkpoint_is_refused_and_corruption_is_named(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))

    torch.save({"w": torch.ones(2), "x": RunsCode()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="holds more than tensors and was not loaded"):
        load_state_dict(tmp_path / "evil.pth")
    torch.save({"w": torch.ones(1000)}, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:700])
    with pytest.raises(ValueError, match="cut.pth is truncated or corrupted"):
        load_state_dict(tmp_path / "cut.pth")


def test_lora_file_of_another_shape_and_a_corrupted_out_dir_end_in_one_line(tiny_checkpoint, lima_data, tmp_path):
    out_dir = tmp_path / "out"
    lora_setup(tiny_checkpoint, lima_data, out_dir, max_iters=1)
    hparams = json.loads((out_dir / "hyperparameters.json").read_text())
    hparams["lora"]["r"] = 4  # the file holds rank-8 matrices
    (out_dir / "hyperparameters.json").write_text(json.dumps(hparams))
    with pytest.raises(ValueError, match="lit_model_lora.pth does not fit the model of .*size mismatch"):
        load_finetuned(out_dir)

    weights = out_dir / "lit_model_lora.pth"
    weights.write_bytes(weights.read_bytes()[:500])
    out = subprocess.run([sys.executable, "generate/lora.py", "--lora_path", str(out_dir)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "is truncated or corrupted" in out.stderr


def test_a_load_error_of_one_line_is_shown_whole(tiny_checkpoint, lima_data, tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    lora_setup(tiny_checkpoint, lima_data, out_dir, max_iters=1)
    load = LLaMA.load_state_dict

    def one_line_error(model, state, strict=True, assign=False):
        if strict:  # the base checkpoint loads as ever
            return load(model, state, strict=strict, assign=assign)
        raise RuntimeError("size mismatch for lm_head.weight: the trained rows do not fit")

    monkeypatch.setattr(LLaMA, "load_state_dict", one_line_error)
    with pytest.raises(ValueError, match="does not fit the model of .*: size mismatch for lm_head.weight: the trained"):
        load_finetuned(out_dir)


def test_a_base_of_another_tokenizer_is_refused(tiny_checkpoint, lima_data, tmp_path):
    out_dir = tmp_path / "out"
    lora_setup(tiny_checkpoint, lima_data, out_dir, max_iters=1)
    other = tmp_path / "other"  # the same model and vocabulary size, a tokenizer with other ids
    shutil.copytree(tiny_checkpoint, other)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((other / "tokenizer.model").read_bytes())
    proto.pieces[300].piece, proto.pieces[301].piece = proto.pieces[301].piece, proto.pieces[300].piece
    (other / "tokenizer.model").write_bytes(proto.SerializeToString())
    out = subprocess.run([sys.executable, "generate/lora.py", "--lora_path", str(out_dir), "--checkpoint_dir", str(other)],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (f"error: {other} has another tokenizer than the base model {out_dir} was trained from; "
                                  f"pass the right one with --checkpoint_dir")
    load_finetuned(out_dir, tiny_checkpoint)  # its own base still loads


def test_chat_on_a_base_checkpoint_is_refused_at_the_start(tiny_checkpoint):
    out = subprocess.run([sys.executable, "generate/chat.py", "--checkpoint_dir", str(tiny_checkpoint)], cwd=REPO,
                         input="Hello\n/exit\n", capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: the tokenizer has no end-of-turn token (a base checkpoint?): chat with a fine-tune (--lora_path, "
        "--adapter_path, or a full or merged checkpoint); continue plain text with generate/base.py"]


SPELLINGS = ["<|eot|>", "<s>", "</s>", "<unk>", "▁twenty", "twenty", "<0x00>", "<|user|>", "\x00", "<|eot|"]
text_strategy = st.lists(st.one_of(st.sampled_from(SPELLINGS), st.text(max_size=12),
                                   st.binary(max_size=8).map(lambda b: b.decode("latin-1"))), max_size=8).map("".join)


@pytest.fixture(scope="module")
def tokenizers(base_tokenizer):
    return [
        base_tokenizer.with_special_tokens(append=["<|eot|>", "<|user|>"], eot="<|eot|>"),
        extend_tokenizer(base_tokenizer, repurpose_eot="▁twenty", extra_special_tokens=["<|user|>"]),
    ]


@settings(max_examples=300, deadline=None)
@given(text=text_strategy)
def test_no_text_encodes_to_a_special_id(tokenizers, text):
    for tokenizer in tokenizers:
        special = {t.id for t in tokenizer.special} | {tokenizer.bos_id, tokenizer.eos_id}
        ids = tokenizer.encode(text)
        assert not special & set(ids)
        if text.isprintable() and "▁" not in text:  # "▁" is sentencepiece's own spelling of a space
            assert tokenizer.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(turns=st.lists(text_strategy, min_size=1, max_size=5))
def test_special_ids_sit_only_where_the_format_puts_them(tokenizers, turns):
    for tokenizer in tokenizers:
        sample = encode_conversation(tokenizer, turns)
        special = {t.id for t in tokenizer.special} | {tokenizer.bos_id, tokenizer.eos_id}
        placed = [i for i, token in enumerate(sample.ids) if token in special]
        assert placed == [0] + [end - 1 for end in sample.turn_ends]  # bos, then one EOT closing each turn
