"""The terminal chat of `mlcc run`: Ctrl-C stops the reply being written, not the program.

The conversation so far is the context of each turn. A turn that cannot fit the context window is refused in
one line and left out of the conversation, so the chat goes on.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from artifacts.errors import MlccError
from runtime.engine import Engine
from runtime.sampler import SamplingParams

PROMPT = ">>> "
QUIT_WORDS = {"exit", "quit", "/exit", "/quit"}
HELP = """commands:
  /help            this list
  /reset           forget the conversation and start over
  /exit, /quit     leave (also `exit` or `quit` alone, Ctrl-D, or Ctrl-C at an empty prompt)
Ctrl-C while a reply is being written stops it; the conversation keeps what was written.
Ctrl-C with a message typed drops the message."""


@contextmanager
def _sigint_sets(event: threading.Event) -> Iterator[None]:
    """While inside, the first Ctrl-C sets `event` (the engine stops between steps, leaving its state whole);
    a second one raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class TerminalChat:
    """An interactive chat on stdin/stdout; notes and errors go to stderr."""

    def __init__(self, engine: Engine, params: SamplingParams, raw: bool = False):
        self.engine = engine
        self.params = params
        self.use_template = not raw and engine.tokenizer.chat_template is not None
        self.out = sys.stdout
        self.history: list[dict[str, str]] = []
        self.shown = ""  # the reply as far as it is on the terminal

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def run(self) -> None:
        readline = None
        if sys.stdin.isatty():
            import readline  # line editing and history; no 4096-character line limit
        self.note(f"mlcc chat ({'chat template' if self.use_template else 'plain completion'}); /help for commands.")
        while True:
            try:
                line = input(PROMPT)
            except EOFError:  # Ctrl-D
                self.out.write("\n")
                return
            except KeyboardInterrupt:  # Ctrl-C: leave at an empty prompt, else drop what was typed
                self.out.write("\n")
                if readline is not None and readline.get_line_buffer().strip():
                    continue
                return
            if not self.handle(line):
                return

    def handle(self, line: str) -> bool:
        """One line typed at the prompt; False to leave the chat."""
        text = line.strip()
        if not text:
            return True
        if text.lower() in QUIT_WORDS:
            return False
        if text == "/help":
            self.note(HELP)
        elif text == "/reset":
            turns = sum(1 for m in self.history if m["role"] == "user")
            self.history.clear()
            self.note(f"conversation cleared ({turns} turn{'s' * (turns != 1)} forgotten)")
        elif text.startswith("/") and " " not in text:
            self.note(f"unknown command {text}; /help lists the commands")
        else:
            self.turn(line)
        return True

    def turn(self, text: str) -> None:
        user = {"role": "user", "content": text}
        self.shown = ""
        stop = threading.Event()
        try:
            with _sigint_sets(stop):
                reply = self.reply(self.prompt_ids(user), stop)
        except MlccError as e:  # nothing of this turn enters the conversation
            self.out.write("\n" if self.shown else "")
            self.out.flush()
            self.note(f"error: {e}")
            return
        self.out.write("\n")
        self.out.flush()
        if stop.is_set():
            self.note("[reply stopped]")
        if self.use_template:  # an interrupted reply stays in the conversation as far as it was shown
            self.history += [user, {"role": "assistant", "content": reply}]

    def prompt_ids(self, user: dict[str, str]) -> list[int]:
        """Token ids of the conversation with this turn added; a one-line error if that cannot fit."""
        window = self.engine.context_window
        if not self.use_template:
            ids = self.engine.tokenizer.encode(user["content"])
        else:
            ids = self.engine.tokenizer.encode_chat([*self.history, user])
        if len(ids) < window:
            return ids
        if self.history:
            alone = len(self.engine.tokenizer.encode_chat([user]))
            if alone < window:
                raise MlccError(
                    f"the conversation with this message is {len(ids)} tokens, over the context window of {window}; "
                    "/reset to start over"
                )
        raise MlccError(f"message too long: {len(ids)} tokens, the context window is {window}; not sent")

    def reply(self, ids: list[int], stop: threading.Event) -> str:
        """Stream the model's reply to `ids` onto the terminal until it ends or `stop` is set; the text shown."""
        pieces: deque[str] = deque()
        requests = self.engine.make_requests(ids, self.params, lambda delta: pieces.append(delta.text))
        self.engine.enqueue(requests)
        try:
            while not stop.is_set() and (pieces or any(r.finish_reason is None for r in requests)):
                if not pieces:
                    self.engine.step()
                while pieces and not stop.is_set():
                    piece = pieces.popleft()
                    self.shown += piece
                    self.out.write(piece)
                    self.out.flush()
        finally:  # stopped (or failed) mid-reply: free the sequence, drop what it still held back
            for request in requests:
                self.engine.abort(request)
        return self.shown
