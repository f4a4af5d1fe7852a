#!/usr/bin/env bash
# Every figure of benchmarks/RESULTS.md in one run: the CPU sizes always, the 7B shape when a GPU is there.
set -euo pipefail
cd "$(dirname "$0")"
date
for size in 30M 120M; do
    python finetune.py --method lora --size "$size"
    python finetune.py --method full --size "$size"
    python decode.py --size "$size"  # fp32; with llama.cpp when $LLAMA_CPP_CONVERT names its converter
    python decode.py --size "$size" --dtype bfloat16
    python batch_decode.py --size "$size"
    python multi_lora.py --size "$size"
    python prefill.py --size "$size"
done
python matvec.py --dtype bfloat16
python matvec.py --dtype float32
if [ -n "${LLAMA_CPP_CONVERT:-}" ]; then  # llama-cpp-python with its server extra, and llama.cpp's converter
    python serve_load.py --size 30M --compile true --batch_size 8
fi
python load.py
python checkpointing.py --size 120M --method lora --runs 5
python qlora.py --size 1.1B
python sharded_load.py
python sharded_load.py --method full
python sharded_load.py --quantize nf4 --processes '[2, 4]'  # nf4 under fsdp needs 2 or more
python group_by_length.py --size 30M
python mix_experiment.py --work_dir ../out/mix_experiment
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    python finetune.py --method lora --size 7B --device cuda --batch_size 1 --seq_len 2048
    python decode.py --size 7B --device cuda --new_tokens 256
    python qlora.py --size 7B --device cuda --seq_len 2048
fi
