"""Write DELIA's self-sampled cache: for each query that comes with a reference reply, the model being
tuned writes a reply of its own, and the query with that reply becomes a training conversation. The prompt is
a one-shot echo: the query, the reference as the assistant's turn, then the same query again.

    python scripts/self_sample.py --lora_path out/lora --data_path data/queries.jsonl \\
        --destination_path data/self_sampled.jsonl
    python scripts/prepare_conversations.py --data_path data/self_sampled.jsonl --checkpoint_dir checkpoints/tiny \\
        --destination_path data/self_sampled

Input records (JSONL, or a JSON array of records):
- {"messages": [...]}: the first user turn is the query, the first assistant turn the reference; a
  system message is left out (the echo prompt has none, and the cached record holds the query and
  the reply only);
- {"conversations": [user, assistant, ...]} (LIMA's): the first two turns;
- {"instruction", "input", "output"} (Alpaca's): the instruction (and its input) is the query, the
  output the reference.
Any other record is counted and skipped, the first of each kind named by file:line.

A fine-tune (its tokenizer has an end-of-turn token) gets the conversation format,
`<bos> query <EOT> reference <EOT> query <EOT>`, and its reply ends on EOT or EOS. A base checkpoint
gets plain text, "query\\n\\nreference\\n\\nquery\\n\\n" after bos, and its reply ends on EOS or at its
first blank line, where its paragraph ends.

The destination is JSONL that scripts/prepare_conversations.py reads, one record per reply, appended as
soon as the reply is done: {"messages": [{"role": "user", "content": query}, {"role": "assistant",
"content": reply}], "source": "file:line", "index": i, "stop_reason": "eot" | "eos" | "blank line" |
"max_new_tokens"}. Usable record i of the input (from 0) samples with a generator of its own, seeded
seed + i, so its reply depends neither on its batch neighbours nor on where a run stopped: run again
with the same flags after an interruption, and the records cached already are skipped.

With `--base_url` the replies come from an OpenAI-compatible server instead (generate/serve.py,
vLLM, llama.cpp's server) serving the model as `--model`: the echo prompt goes to /chat/completions as
three messages (or, with `--plain true`, to /completions as text), `--concurrency` requests at a time,
each with its row's seed. The engine's word for how a reply ended is the stop reason then: "stop" or,
when it reached `--max_new_tokens`, "max_new_tokens".

    python scripts/self_sample.py --base_url http://127.0.0.1:8000/v1 --model lora --data_path data/queries.jsonl \
        --destination_path data/self_sampled.jsonl --concurrency 16
"""

import sys
from itertools import islice
from pathlib import Path
from typing import Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_llama.cli import run
from lit_llama.errors import BadValue
from lit_llama.files import check_writable
from lit_llama.generate import Sampling
from lit_llama.inference import Dtype, ModelSource, place
from lit_llama.records import located_records
from lit_llama.self_sample import (Counts, Server, check_paths, decoded_here, plan_jobs, query_and_reference, read_cache,
                                   summarize, write_replies)


def main(
    data_path: Path,
    destination_path: Path,
    *,
    source: ModelSource = ModelSource(),
    server: Server = Server(),
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 1234,
    max_rows: Optional[int] = None,
    dtype: Dtype = Dtype(),
    keep_unfinished: bool = False,
) -> dict:
    """Cache the model's own reply to each query of `data_path`, prompted with the query, its reference
    reply and the query again.

    Args:
        data_path: a JSONL file (or a JSON array) of messages, conversations or Alpaca rows, each a
            query with a reference reply
        destination_path: the JSONL cache to write, {"messages": [user, assistant], "source", "index",
            "stop_reason"} rows; when it exists, the rows it holds are kept and only the others are sampled
        temperature: sampling temperature; 0 picks the most likely token every step
        top_p: sample among the fewest most likely tokens that hold this much of the probability (1: all)
        max_new_tokens: most tokens of a reply
        batch_size: replies decoded side by side (a continuous batch: a finished row takes the next query)
        seed: seed of the sampling: usable row i of the input (from 0) samples with its own generator,
            seeded seed + i
        max_rows: sample the first this many usable rows only (a row too long for the context counts)
        keep_unfinished: keep replies cut off at their token cap; by default they are dropped and
            counted, as training on one would teach the end-of-turn token after a cut-off reply

    Returns the counts that the summary line prints.
    """
    data_path, destination_path = Path(data_path), Path(destination_path)
    check_paths(data_path, destination_path)
    server.check()
    sampling = Sampling(temperature, None, top_p)
    if min(max_new_tokens, batch_size, max_rows or 1) < 1:
        raise BadValue("--max_new_tokens, --batch_size and --max_rows must be at least 1")
    check_writable(destination_path.parent, 0, "--destination_path")  # before the model loads, not after the sampling
    cached = read_cache(destination_path)
    counts = Counts(cached=len(cached))
    records = islice(located_records(data_path, counts.bad, query_and_reference), max_rows)
    cache = dict(cached=cached, counts=counts, destination_path=destination_path)
    if server.base_url is not None:
        jobs = plan_jobs(records, lambda query, reference: ([], max_new_tokens), **cache)
        replies = server.replies(jobs, sampling, seed)
    else:
        model, tokenizer = source.load()
        jobs, replies = decoded_here(place(model, dtype.precision), tokenizer, records, max_new_tokens=max_new_tokens,
                                     sampling=sampling, seed=seed, batch_size=batch_size, **cache)
    write_replies(destination_path, replies, counts, total=len(jobs), keep_unfinished=keep_unfinished)
    return summarize(counts, destination_path, keep_unfinished)


if __name__ == "__main__":
    run(main)
