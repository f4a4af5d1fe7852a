"""DELIA's self-sampled cache (scripts/self_sample.py is its command line): each query's echo prompt,
the model's own reply to it, decoded here on a continuous batch or asked of an OpenAI-compatible
server, and the JSONL cache those replies are appended to, resumable after a kill.

    echo_prompt(tokenizer, query, reference)     the prompt: the query, the reference, the query again
    plan_jobs(records, prompt_of, ...)           a job per usable record the cache does not hold yet
    sample_replies(model, tokenizer, jobs, ...)  the replies decoded here
    Server(base_url, model, ...).replies(jobs)   the replies asked of a server
    write_replies(destination, replies, ...)     each appended as it is done
"""

import json
import os
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from tqdm import tqdm

from lit_llama.cli import FlagGroup
from lit_llama.errors import BadPath, BadValue, MissingFile, file_error
from lit_llama.decoder import Decoder
from lit_llama.generate import ContinuousBatch, Generation, Request, Sampling, room_for, stop_reason
from lit_llama.model import LLaMA
from lit_llama.prompts import encode_prompt
from lit_llama.records import BadRecord, PrepareReport, alpaca_turns, lima_turns, message_turns
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
    return tokenizer.encode(plain_echo(query, reference), bos=True)


def plain_echo(query: str, reference: str) -> str:
    """The echo prompt as plain paragraphs, for a base model: its reply is the next paragraph."""
    return f"{query}{BLANK_LINE}{reference}{BLANK_LINE}{query}{BLANK_LINE}"


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


@dataclass(frozen=True)
class Server(FlagGroup):
    """An OpenAI-compatible server to sample the replies through, instead of a model loaded here
    (generate/serve.py, vLLM, llama.cpp's server).

    Args:
        base_url: the server's address, e.g. http://127.0.0.1:8000/v1
        model: the name the server serves the model as
        api_key: the server's API key, if it asks for one
        plain: send the echo prompt as plain text to /completions, each reply ending at its first blank
            line (a base model); by default as messages to /chat/completions
        concurrency: requests in flight at once
    """

    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key: Optional[str] = None
    plain: bool = False
    concurrency: int = 8

    def check(self) -> None:
        if (self.base_url is None) != (self.model is None):
            raise BadValue("--base_url and --model go together: the server's address and the name it serves the "
                           "model as")
        if self.concurrency < 1:
            raise BadValue("--concurrency must be at least 1")

    def post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.base_url.rstrip("/") + path, json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=3600) as response:
            return json.loads(response.read())

    def ask(self, job: Job, sampling: Sampling, seed: int) -> tuple[Job, Optional[str], str]:
        """The job's reply and why it ended; (job, None, why) for a prompt the server finds too long."""
        body = {"model": self.model, "max_tokens": job.cap, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "seed": seed + job.index}
        if self.plain:
            body.update(prompt=plain_echo(job.query, job.reference), stop=[BLANK_LINE])
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

    def replies(self, jobs: list[Job], sampling: Sampling, seed: int) -> Iterator[tuple[Job, Optional[str], str]]:
        """Each job's reply, `concurrency` requests at a time, in the order they finish."""
        with ThreadPoolExecutor(self.concurrency) as pool:
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


def decoded_here(model: LLaMA, tokenizer: Tokenizer, records: Iterable[tuple[str, tuple[str, str]]], *,
                 max_new_tokens: int, sampling: Sampling, seed: int, batch_size: int,
                 **cache: Any) -> tuple[list[Job], Iterator[tuple[Job, Optional[str], str]]]:
    """The jobs of `records` (`cache`: plan_jobs' cached, counts and destination_path), each prompt capped
    at the model's context, and their replies as `model` decodes them: text and why each ended."""
    def prompt_of(query: str, reference: str) -> tuple[list[int], int]:
        prompt = echo_prompt(tokenizer, query, reference)
        return prompt, room_for(model, len(prompt), max_new_tokens)

    jobs = plan_jobs(records, prompt_of, **cache)
    plain = tokenizer.eot_id is None
    return jobs, ((job, *reply_text(tokenizer, generation, plain))
                  for job, generation in sample_replies(model, tokenizer, jobs, sampling, seed, batch_size))
