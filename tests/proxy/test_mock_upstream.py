"""The mock upstream itself: fault modes by flag, by header and by body."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from creditgate.proxy.mock_faults import FAULT_MODES
from creditgate.proxy.mock_upstream import create_mock_app

HELLO = {"messages": [{"role": "user", "content": "hi"}]}


async def test_headers_set_fault_modes_and_the_body_overrides_them(upstream: TestServer) -> None:
    url = upstream.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url, json=HELLO, headers={"x-mock-status": "418"})
        assert resp.status == 418
        assert (await resp.json())["error"]["message"] == "mock status 418"

        resp = await s.post(
            url, json={**HELLO, "mock": {"chunks": 3}}, headers={"x-mock-chunks": "1"}
        )
        answer = await resp.json()
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["choices"][0]["message"]["content"] == "Hello from the"

        resp = await s.post(url, json=HELLO, headers={"x-mock-no-usage": "true"})
        assert "usage" not in await resp.json()

        resp = await s.post(url, json=HELLO, headers={"x-mock-chunks": "many"})
        assert resp.status == 400
        assert "chunks: expected int" in (await resp.json())["error"]["message"]

        resp = await s.post(url, json={**HELLO, "mock": {"explode": True}})
        assert resp.status == 400
        assert "explode: no such fault mode" in (await resp.json())["error"]["message"]

        stats = await (await s.get(upstream.make_url("/mock/stats"))).json()
        assert stats["requests"]["default"] == 3  # refused modes are not requests


async def test_for_model_limits_faults_to_one_model() -> None:
    server = TestServer(create_mock_app(status=503, for_model="broken"))
    await server.start_server()
    try:
        url = server.make_url("/v1/chat/completions")
        async with aiohttp.ClientSession() as s:
            assert (await s.post(url, json={**HELLO, "model": "broken"})).status == 503
            assert (await s.post(url, json={**HELLO, "model": "fine"})).status == 200
    finally:
        await server.close()


def test_help_documents_every_fault_mode() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "creditgate", "mock-upstream", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for mode in FAULT_MODES:
        assert mode.flag in out and mode.header in out, mode.name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
async def test_flags_are_server_defaults() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "creditgate",
            "mock-upstream",
            "--port",
            str(port),
            "--chunks",
            "4",
            "--drop-after",
            "2",
        ],
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while True:
                try:
                    await s.get(f"{base}/v1/models")
                    break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "mock-upstream did not start"
                    time.sleep(0.1)
            answer = await (await s.post(f"{base}/v1/chat/completions", json=HELLO)).json()
            assert answer["usage"]["completion_tokens"] == 4  # --chunks
            resp = await s.post(f"{base}/v1/chat/completions", json={**HELLO, "stream": True})
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()  # --drop-after 2: the connection is cut mid-stream
            resp = await s.post(
                f"{base}/v1/chat/completions",
                json={**HELLO, "stream": True},
                headers={"x-mock-drop-after": "9"},  # a request overrides the default
            )
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
            stats = await (await s.get(f"{base}/mock/stats")).json()
            assert stats["requests"] == {"default": 3}
            assert stats["completed"] == {"default": 2}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_usage_details_and_a_reported_cost_on_request(upstream: TestServer) -> None:
    """OpenAI's details are parts of the totals; OpenRouter's cost is written digit for digit."""
    url = upstream.make_url("/v1/chat/completions")
    base = {"prompt_tokens": 100, "chunks": 5}
    async with aiohttp.ClientSession() as s:
        modes = {
            **base,
            "cached_tokens": 150,  # more than the text: clamped to it
            "audio_input_tokens": 20,
            "audio_output_tokens": 4,
            "reasoning_tokens": 30,
            "accepted_prediction_tokens": 2,
            "rejected_prediction_tokens": 6,
        }
        usage = (await (await s.post(url, json={**HELLO, "mock": modes})).json())["usage"]
        assert usage == {
            "prompt_tokens": 120,
            "completion_tokens": 45,
            "total_tokens": 165,
            "prompt_tokens_details": {"cached_tokens": 100, "audio_tokens": 20},
            "completion_tokens_details": {
                "reasoning_tokens": 30,
                "audio_tokens": 4,
                "accepted_prediction_tokens": 2,
                "rejected_prediction_tokens": 6,
            },
        }
        resp = await s.post(url, json={**HELLO, "mock": {**base, "cost": "0.000123456789012"}})
        raw = await resp.read()
        assert b'"cost":0.000123456789012' in raw  # the JSON number as given
        assert (await resp.json())["usage"]["cost_details"] == {"upstream_inference_cost": None}
        resp = await s.post(url, json={**HELLO, "mock": {"cost": "1_000"}})
        assert resp.status == 400 and "not a JSON number" in await resp.text()
        resp = await s.post(url, json={**HELLO, "mock": {"reasoning_tokens": -1}})
        assert resp.status == 400
