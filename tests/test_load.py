"""The HTTP load generator against a server that closes kept-alive connections as they are
reused, as llama.cpp's server does with idle ones (benchmarks/llama_server.py loads it): a
real TCP server on 127.0.0.1 that answers a connection's first request and closes the
connection when the next one comes, without a response."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from ray_inference.bench.load import run_load
from ray_inference.bench.prompts import Workload

TOKENS = 2
STREAM = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in (
    {"choices": [{"index": 0, "delta": {"content": "a"}}]},
    {"choices": [{"index": 0, "delta": {"content": "b"}}]},
    {"choices": [], "usage": {"completion_tokens": TOKENS}})).encode() + b"data: [DONE]\n\n"


async def _load_against(answers_per_connection: int, requests: int):
    bodies: list[dict] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
                body = await reader.readexactly(length)
                if answered == answers_per_connection:
                    return  # closed without a response
                bodies.append(json.loads(body))
                answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(STREAM), STREAM))
                await writer.drain()
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await run_load(f"http://127.0.0.1:{port}", "m", 1,
                                Workload.make(requests, TOKENS, TOKENS, 0))
    return result, bodies


def test_a_request_on_a_connection_the_server_closed_goes_once_more():
    result, bodies = asyncio.run(_load_against(answers_per_connection=1, requests=3))
    # Requests 2 and 3 each met a closed connection first: neither is an error.
    assert (result.requests, result.errors, result.tokens) == (3, 0, 3 * TOKENS)
    assert len(bodies) == 3
    # OpenAI's way to ask for the usage that counts the tokens (llama.cpp sends it only then).
    assert all(b["stream_options"] == {"include_usage": True} for b in bodies)


@pytest.mark.parametrize("requests", [1, 2])
def test_a_request_that_fails_twice_is_an_error_and_the_run_goes_on(requests):
    result, bodies = asyncio.run(_load_against(answers_per_connection=0, requests=requests))
    assert (result.requests, result.errors, bodies) == (0, requests, [])
    assert "without sending a response" in result.error_samples[0]
