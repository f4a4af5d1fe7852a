"""The continuous batch behind the server: stepped by a thread of its own while any request is in it,
with requests joining and leaving from the server's threads.

    Engine(decoder)      submit(request, sink) and cancel(request) from any thread; each request's tokens
                         reach its sink on the engine's thread
"""

import queue
import threading
import traceback
from typing import Callable, Optional, Union

import torch

from lit_llama.errors import UsageError
from lit_llama.decoder import Decoder
from lit_llama.generate import ContinuousBatch, Request

Sink = Callable[[Union[tuple[int, bool], BaseException]], None]  # gets (token, done) per step, or the error


class Engine:
    """A `ContinuousBatch` on `decoder`, stepped by a thread of its own while any request is in it.
    `submit` and `cancel` may be called from any thread; each request's tokens go to its sink, called
    on the engine's thread."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.batch = ContinuousBatch(decoder)
        self.inbox: queue.SimpleQueue[tuple[str, Optional[Request], Optional[Sink]]] = queue.SimpleQueue()
        self.sinks: dict[Request, Sink] = {}
        self.thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self.running = False

    def start(self) -> None:
        self.running = True
        self.thread.start()

    def stop(self) -> None:
        self.inbox.put(("stop", None, None))
        self.thread.join()

    def submit(self, request: Request, sink: Sink) -> None:
        self.inbox.put(("submit", request, sink))

    def cancel(self, request: Request) -> None:
        self.inbox.put(("cancel", request, None))

    def take(self, block: bool) -> None:
        """Move what the inbox holds into the batch: waiting for one message first when `block`."""
        try:
            message = self.inbox.get(block=block)
            while True:
                kind, request, sink = message
                if kind == "submit":
                    try:
                        self.batch.submit(request)
                        self.sinks[request] = sink
                    except UsageError as error:  # checked by the caller already; a bad one fails alone
                        sink(error)
                elif kind == "cancel" and request in self.sinks:
                    self.batch.cancel(request)
                    del self.sinks[request]
                elif kind == "stop":
                    self.running = False
                message = self.inbox.get_nowait()
        except queue.Empty:
            pass

    @torch.inference_mode()
    def run(self) -> None:
        while self.running:
            self.take(block=not self.batch.busy)
            try:
                events = self.batch.step()
            except Exception as error:  # a failed step fails the requests in the batch, not the server
                traceback.print_exc()  # the server's log keeps the traceback; clients get a 500 naming the error
                for sink in self.sinks.values():
                    sink(error)
                self.sinks.clear()
                self.decoder.reset()  # what the failed step wrote to the cache is unknown: no slot is reused
                self.batch = ContinuousBatch(self.decoder)
                continue
            for request, token in events:
                self.sinks[request]((token, request.done))
                if request.done:
                    del self.sinks[request]
