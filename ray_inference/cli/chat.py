"""The interactive client: a prompt loop that keeps the conversation and knows a few commands.

Ctrl-C while an answer streams closes the stream (the gateway stops generating) and returns to
the prompt; Ctrl-C at the prompt clears the line; Ctrl-D leaves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import click

from ray_inference.cli import render
from ray_inference.cli.client import Answer, Client
from ray_inference.cli.errors import CliError
from ray_inference.cli.render import out

TEST_PROMPT = "What is artificial intelligence? Answer in one sentence."
DEFAULT_LOG_LINES = 20

HELP = f"""\
Type a question and press Enter; follow-ups keep the conversation's context.
Commands:
  status        cluster resources, nodes and actors
  actors        inference actors and the node each runs on
  models        served models
  logs [N]      the coordinator's last N events (default {DEFAULT_LOG_LINES})
  test          ask a predefined question (kept out of the conversation)
  clear, reset  forget the conversation
  help          this text
  quit, exit    leave (or Ctrl-D)
Ctrl-C stops an answer that is streaming."""


class ChatSession:
    def __init__(
        self,
        client: Client,
        model: str,
        *,
        system: str | None = None,
        params: dict[str, Any] | None = None,
        stream: bool = True,
    ):
        self.client = client
        self.model = model
        self.system = system
        self.params = params or {}
        self.stream = stream
        self.history: list[dict[str, str]] = []
        self.turn = 0
        self.commands: dict[str, Callable[[list[str]], None]] = {
            "status": self._status,
            "actors": self._actors,
            "models": self._models,
            "logs": self._logs,
            "test": lambda _args: self.ask(TEST_PROMPT, remember=False),
            "clear": self._clear,
            "reset": self._clear,
            "help": lambda _args: out(HELP),
        }

    def run(self) -> None:
        _enable_line_editing()
        out(
            f"Connected to {click.style(self.client.url, bold=True)}, model "
            f"{click.style(self.model, fg='cyan')}. Type 'help' for commands, Ctrl-D to leave."
        )
        while True:
            try:
                line = input(f"rayinfer ({self.model}) [{self.turn + 1}]> ").strip()
            except KeyboardInterrupt:
                out()
                continue
            except EOFError:
                out()
                return
            if not line:
                continue
            word, *args = line.split()
            word = word.lower().lstrip("/")
            if word in ("quit", "exit") and not args:
                return
            try:
                if word in self.commands and (
                    not args or (word == "logs" and len(args) == 1 and args[0].isdigit())
                ):
                    self.commands[word](args)
                else:
                    self.ask(line)
            except CliError as exc:
                out(click.style("Error: ", fg="red") + exc.message, err=True)

    def ask(self, prompt: str, *, remember: bool = True) -> Answer | None:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += self.history if remember else []
        messages.append({"role": "user", "content": prompt})
        body = {"model": self.model, "messages": messages, **self.params}
        self.turn += 1
        try:
            answer = self._stream(body) if self.stream else self._whole(body)
        except KeyboardInterrupt:
            out()
            out(click.style("(cancelled)", fg="yellow"))
            return None
        out(render.answered_by(answer.info, answer.seconds, answer.usage))
        if remember:
            self.history += [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": answer.text}]
        return answer

    def _stream(self, body: dict[str, Any]) -> Answer:
        answer = None
        try:
            with self.client.stream_chat(body) as (pieces, answer):
                for piece in pieces:
                    out(piece, nl=False)
        finally:
            if answer is not None and answer.text:
                out()  # end the partial line before any message that follows
        return answer

    def _whole(self, body: dict[str, Any]) -> Answer:
        answer, _raw = self.client.chat(body)
        out(answer.text)
        return answer

    def _status(self, _args: list[str]) -> None:
        out(render.cluster_report(self.client.get_json("/v1/cluster"), self.client.url))

    def _actors(self, _args: list[str]) -> None:
        actors = self.client.get_json("/v1/cluster").get("actors") or []
        out(render.actors_table(actors) if actors else "No inference actors yet.")

    def _models(self, _args: list[str]) -> None:
        out(render.models_table(self.client.get_json("/v1/models")))

    def _logs(self, args: list[str]) -> None:
        limit = int(args[0]) if args else DEFAULT_LOG_LINES
        out(render.events_text(self.client.get_json("/v1/events", {"limit": limit})))

    def _clear(self, _args: list[str]) -> None:
        self.history.clear()
        self.turn = 0
        out("Conversation cleared.")


def _enable_line_editing() -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (importing it gives input() history and editing)
