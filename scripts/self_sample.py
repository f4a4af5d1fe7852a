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

import json
import os
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

# run from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from lit_llama.cli import run
from lit_llama.errors import BadPath, BadValue, MissingFile, file_error
from lit_llama.files import check_writable
from lit_llama.records import BadRecord, PrepareReport, alpaca_turns, lima_turns, located_records, message_turns
from lit_llama.generate import ContinuousBatch, Decoder, Generation, Request, Sampling, room_for, stop_reason
from lit_llama.inference import Dtype, ModelSource, place
from lit_llama.model import LLaMA
from lit_llama.prompts import encode_prompt
from lit_llama.streaming import Detokenizer
from lit_llama.tokenizer import Tokenizer

BLANK_LINE = "\n\n"
TOO_LONG = "the echo prompt leaves no room for a reply in the model's context"
EMPTY = "an empty reply"
CAPPED = "a reply cut off at its token cap (--max_new_tokens, or the context's end)"


def query_and_reference(record: dict) -> tuple[str, str]:
    """A record's query and its reference reply (see the module's docstring); BadRecord for any other."""
    if "messages" in record:
        turns = message_turns(record)[1]
    elif "conversations" in record:
        turns = lima_turns(record)
    elif "instruction" in record:
        turns = alpaca_turns(record)
    else:
        raise BadRecord("neither 'messages', 'conversations' nor an Alpaca 'instruction'")
    return turns[0], turns[1]


def echo_prompt(tokenizer: Tokenizer, query: str, reference: str) -> list[int]:
    """The query, the reference as the assistant's reply, the query again: in the conversation format
    when the tokenizer has an end-of-turn token, else as plain paragraphs after bos."""
    if tokenizer.eot_id is not None:
        return encode_prompt(tokenizer, [query, reference, query])
    return tokenizer.encode(f"{query}{BLANK_LINE}{reference}{BLANK_LINE}{query}{BLANK_LINE}", bos=True)


def read_cache(path: Path) -> dict[int, str]:
    """The query of each input record index that `path` holds a reply to. A last line that a kill cut
    short (no newline at its end, or not JSON) is removed from the file: its record is sampled again."""
    if not path.is_file():
        return {}
    try:
        data = path.read_bytes()
    except OSError as e:  # there but unreadable (permissions)
        raise file_error(e, f"--destination_path {path}") from None
    end = data.rfind(b"\n") + 1  # records are written whole, newline last: what follows the last one is cut short
    lines = data[:end].split(b"\n")[:-1]
    queries = {}
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            index, query = record["index"], record["messages"][0]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            if n < len(lines):
                raise BadValue(f"--destination_path {path}:{n} is not a row of this script: give a new "
                               f"destination, or the cache this script wrote") from None
            end -= len(line) + 1
            continue
        queries[index] = query
    if end < len(data):
        print(f"{path}: removed a last line cut short ({len(data) - end} bytes), left by an interrupted run",
              file=sys.stderr)
        os.truncate(path, end)
    return queries


@dataclass
class Job:
    index: int  # the record's index among the input's usable records: its generator's seed is seed + index
    where: str
    query: str
    reference: str
    prompt: list[int]  # the echo prompt's ids (empty when a server encodes it)
    cap: int


class BlankLine:
    """Whether a plain-text reply has reached a blank line, from its tokens as they are sampled."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.detokenizer = Detokenizer(tokenizer)
        self.text = ""

    def add(self, token: int) -> bool:
        self.text += self.detokenizer.add(token)
        return BLANK_LINE in self.text


@torch.inference_mode()
def sample_replies(model: LLaMA, tokenizer: Tokenizer, jobs: list[Job], sampling: Sampling, seed: int,
                   batch_size: int) -> Iterator[tuple[Job, Generation]]:
    """Each job with its reply's generation, in the order they finish: a continuous batch of up to
    `batch_size` slots, job i sampling with a generator seeded seed + i. Decoding stops on the tokenizer's
    stop ids, and a plain-text reply (no end-of-turn token) at its first blank line too."""
    if not jobs:
        return
    stop_ids = tuple(tokenizer.stop_ids)
    plain = tokenizer.eot_id is None
    device = model.lm_head.weight.device
    cache_length = max(len(job.prompt) + job.cap for job in jobs)
    with Decoder(model, min(batch_size, len(jobs)), cache_length) as decoder:
        batch = ContinuousBatch(decoder)
        upcoming = iter(jobs)
        running: dict[Request, tuple[Job, Optional[BlankLine]]] = {}
        while True:
            # requests join as slots free up: one generator per request in flight, not one per input record
            while len(batch.waiting) < decoder.batch_size and (job := next(upcoming, None)) is not None:
                generator = torch.Generator(device).manual_seed(seed + job.index)
                request = Request(job.prompt, job.cap, sampling, stop_ids, generator)
                batch.submit(request)
                running[request] = (job, BlankLine(tokenizer) if plain else None)
            if not batch.busy:
                return
            for request, token in batch.step():
                job, blank_line = running[request]
                if blank_line is not None and token not in stop_ids and blank_line.add(token) and not request.done:
                    batch.cancel(request)  # the paragraph is over: its slot takes the next query now
                if request.done:
                    del running[request]
                    yield job, request.generation


def reply_text(tokenizer: Tokenizer, generation: Generation, plain: bool) -> tuple[str, str]:
    """The reply's text, stripped, and why it ended; a plain-text reply ends at its first blank line."""
    text, reason = tokenizer.decode(generation.tokens), stop_reason(generation, tokenizer)
    if plain and BLANK_LINE in text:
        text, reason = text.split(BLANK_LINE, 1)[0], "blank line"
    return text.strip(), reason


def main(
    data_path: Path,
    destination_path: Path,
    *,
    source: ModelSource = ModelSource(),
    base_url: Optional[str] = None,
    model: Optional[str] = None,
    api_key: Optional[str] = None,
    plain: bool = False,
    concurrency: int = 8,
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
        base_url: sample through this OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) instead of
            loading a model here
        model: the name the server serves the model as (with --base_url)
        api_key: the server's API key, if it asks for one (with --base_url)
        plain: with --base_url, send the echo prompt as plain text to /completions, ending each reply at
            its first blank line (a base model); by default as messages to /chat/completions
        concurrency: requests in flight at once (with --base_url)
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
    sampling = Sampling(temperature, None, top_p)
    if min(max_new_tokens, batch_size, concurrency, max_rows or 1) < 1:
        raise BadValue("--max_new_tokens, --batch_size, --concurrency and --max_rows must be at least 1")
    if (base_url is None) != (model is None):
        raise BadValue("--base_url and --model go together: the server's address and the name it serves the model as")
    check_writable(destination_path.parent, 0, "--destination_path")  # before the model loads, not after the sampling
    cached = read_cache(destination_path)
    counts = Counts(cached=len(cached))
    records = islice(located_records(data_path, counts.bad, query_and_reference), max_rows)
    if base_url is not None:
        jobs = plan_jobs(records, lambda query, reference: ([], max_new_tokens), cached=cached, counts=counts,
                         destination_path=destination_path)
        server = Server(base_url.rstrip("/"), model, api_key, plain)
        replies = server.replies(jobs, sampling, seed, concurrency)
    else:
        llm, tokenizer = source.load()
        llm = place(llm, dtype.precision)

        def prompt_of(query: str, reference: str) -> tuple[list[int], int]:
            prompt = echo_prompt(tokenizer, query, reference)
            return prompt, room_for(llm, len(prompt), max_new_tokens)

        jobs = plan_jobs(records, prompt_of, cached=cached, counts=counts, destination_path=destination_path)
        replies = ((job, *reply_text(tokenizer, generation, tokenizer.eot_id is None))
                   for job, generation in sample_replies(llm, tokenizer, jobs, sampling, seed, batch_size))
    write_replies(destination_path, replies, counts, total=len(jobs), keep_unfinished=keep_unfinished)
    return summarize(counts, destination_path, keep_unfinished)


@dataclass
class Server:
    """An OpenAI-compatible server that samples the replies: the echo prompt as messages, or as plain text."""

    base_url: str
    model: str
    api_key: Optional[str]
    plain: bool

    def post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url + path, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())

    def ask(self, job: Job, sampling: Sampling, seed: int) -> tuple[Job, Optional[str], str]:
        """The job's reply and why it ended; (job, None, why) for a prompt the server finds too long."""
        body = {"model": self.model, "max_tokens": job.cap, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "seed": seed + job.index}
        if self.plain:
            text = f"{job.query}{BLANK_LINE}{job.reference}{BLANK_LINE}{job.query}{BLANK_LINE}"
            body.update(prompt=text, stop=[BLANK_LINE])
        else:
            body["messages"] = [{"role": "user", "content": job.query}, {"role": "assistant", "content": job.reference},
                                {"role": "user", "content": job.query}]
        try:
            choice = self.post("/completions" if self.plain else "/chat/completions", body)["choices"][0]
        except urllib.error.HTTPError as e:
            error = json.loads(e.read() or b"{}").get("error") or {}
            if e.code == 400 and error.get("code") == "context_length_exceeded":
                return job, None, TOO_LONG
            raise BadValue(f"--base_url {self.base_url} answered {e.code} for {job.where}: "
                           f"{error.get('message', e.reason)}") from None
        except urllib.error.URLError as e:
            raise BadValue(f"--base_url {self.base_url}: {e.reason} (is the server running?)") from None
        text = choice["text"] if self.plain else choice["message"]["content"]
        return job, text.strip(), "max_new_tokens" if choice["finish_reason"] == "length" else choice["finish_reason"]

    def replies(self, jobs: list[Job], sampling: Sampling, seed: int,
                concurrency: int) -> Iterator[tuple[Job, Optional[str], str]]:
        """Each job's reply, `concurrency` requests at a time, in the order they finish."""
        with ThreadPoolExecutor(concurrency) as pool:
            for future in as_completed([pool.submit(self.ask, job, sampling, seed) for job in jobs]):
                yield future.result()


def check_paths(data_path: Path, destination_path: Path) -> None:
    if data_path.is_dir():
        raise BadPath(f"--data_path {data_path} is a directory: give the data file itself")
    if not data_path.is_file():
        raise MissingFile(f"--data_path {data_path} not found")
    if destination_path.is_dir():
        raise BadValue(f"--destination_path {destination_path} is a directory: give the JSONL file to write")
    if destination_path.resolve() == data_path.resolve():
        raise BadValue(f"--destination_path {destination_path} is the --data_path file: give another file")


@dataclass
class Counts:
    """What a run read, skipped and wrote: the figures of its summary line."""

    bad: PrepareReport = field(default_factory=PrepareReport)  # input records that are no query with a reference
    skipped: PrepareReport = field(default_factory=PrepareReport)  # usable records that got no reply
    cached: int = 0  # replies the destination held before the run
    resumed: int = 0  # usable records among those
    written: int = 0
    unfinished: int = 0  # replies cut off at their cap, kept


def plan_jobs(records: Iterable[tuple[str, tuple[str, str]]], prompt_of: Callable[[str, str], tuple[list[int], int]],
              *, cached: dict[int, str], counts: Counts, destination_path: Path) -> list[Job]:
    """A job for each usable record (where, (query, reference)) the cache holds no reply to, its echo
    prompt and reply cap from `prompt_of`, unless that finds no room for a reply (ValueError)."""
    jobs = []
    for index, (where, (query, reference)) in enumerate(records):
        if index in cached:
            if cached[index] != query:
                raise BadValue(f"--destination_path {destination_path} holds a reply to another query as row {index} "
                               f"({where}): it was written from other data; give a new destination")
            counts.resumed += 1
            continue
        try:
            jobs.append(Job(index, where, query, reference, *prompt_of(query, reference)))
        except ValueError:
            counts.skipped.skip(where, TOO_LONG)
    return jobs


def write_replies(destination_path: Path, replies: Iterator[tuple[Job, Optional[str], str]], counts: Counts, *,
                  total: int, keep_unfinished: bool) -> None:
    """Append each reply (its text, and why it ended) to the destination as soon as it is done; an empty
    reply, one cut off at its cap unless kept, or none (a prompt too long: the reason says), is counted instead."""
    try:
        out = open(destination_path, "a", encoding="utf-8")
    except OSError as e:  # there but not writable
        raise file_error(e, f"--destination_path {destination_path}") from None
    with out, tqdm(total=total, unit="reply") as bar:
        for job, reply, reason in replies:
            bar.update()
            drop = reason if reply is None else EMPTY if not reply else \
                CAPPED if reason == "max_new_tokens" and not keep_unfinished else None
            if drop:
                with tqdm.external_write_mode(file=sys.stderr):  # the message on a line of its own, not the bar's
                    counts.skipped.skip(job.where, drop)
                continue
            counts.unfinished += reason == "max_new_tokens"
            record = {"messages": [{"role": "user", "content": job.query}, {"role": "assistant", "content": reply}],
                      "source": job.where, "index": job.index, "stop_reason": reason}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()  # a kill loses at most the record being written
            counts.written += 1


def summarize(counts: Counts, destination_path: Path, keep_unfinished: bool) -> dict:
    """The run's counts, also printed as one line."""
    bad, skipped, cached = counts.bad, counts.skipped, counts.cached + counts.written
    summary = {"read": bad.read, "bad_rows": dict(bad.dropped), "resumed": counts.resumed, "written": counts.written,
               "cached": cached, "too_long": skipped.dropped.get(TOO_LONG, 0),
               "empty_reply": skipped.dropped.get(EMPTY, 0),
               "hit_cap": skipped.dropped.get(CAPPED, 0) + counts.unfinished,
               "unfinished_kept": counts.unfinished, "destination": str(destination_path)}
    bad_rows = ", ".join(f"{n} {reason}" for reason, n in sorted(bad.dropped.items()))
    print(f"read {bad.read} rows; replies cached: {counts.written} new, {counts.resumed} from before, {cached} in all; "
          f"skipped: {sum(bad.dropped.values())} bad rows{f' ({bad_rows})' if bad_rows else ''}, "
          f"{summary['too_long']} too long for the context, {summary['empty_reply']} empty replies, "
          f"{summary['hit_cap']} that hit the cap{' (kept)' if keep_unfinished else ''}; written to {destination_path}")
    return summary


if __name__ == "__main__":
    run(main)
