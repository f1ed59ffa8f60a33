"""Fixtures: the default model's tokenizer (once per session), and `fake_server(**script)` that starts a
FakeGeneration server on a free port in a background asyncio loop and stops it after the test."""
from __future__ import annotations

import asyncio
import threading

import pytest

from loadtest.prompts import load_tokenizer
from tests.loadtest.fakes import FakeGeneration


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="session")
def server_loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-generation", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


@pytest.fixture
def fake_server(server_loop):
    servers: list[FakeGeneration] = []

    def start(**script) -> FakeGeneration:
        server = FakeGeneration(**script)
        asyncio.run_coroutine_threadsafe(server.start(), server_loop).result(10)
        servers.append(server)
        return server

    yield start
    for server in servers:
        asyncio.run_coroutine_threadsafe(server.stop(), server_loop).result(10)
