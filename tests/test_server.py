"""The OpenAI-compatible server on 127.0.0.1, driven by the real `openai` client: token
ids equal to the Engine's for the same seeds (completions and chat, streaming or not,
n > 1), stop strings and ids, logprobs, every bad request's status and body, the API
key, /metrics parsed with prometheus-client, tenant salts, and clients that disconnect
(their requests aborted, every page back, the manager's invariants intact)."""

# ruff: noqa: E501 (the bad-request table: one case per line)
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import pytest

openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
pytest.importorskip("fastapi", reason="needs the serve extra")
pytest.importorskip("tokenizers", reason="needs the weights extra (tokenizers)")

import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from jenga_jax.core.invariants import check_manager  # noqa: E402
from jenga_jax.demo_checkpoint import write_demo_checkpoint  # noqa: E402
from jenga_jax.engine.sampling import SamplingParams  # noqa: E402
from jenga_jax.loading import EngineOptions, load_engine  # noqa: E402
from jenga_jax.server.api import build_app  # noqa: E402
from jenga_jax.server.launch import ServerOptions, build_server_state  # noqa: E402
from jenga_jax.server.load_client import stream_completion  # noqa: E402

KEY = "test-key"
NAME = "tiny"
OPTIONS = EngineOptions(
    max_model_len=96, kv_budget_bytes=1 << 20, max_num_seqs=4, max_num_batched_tokens=32
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, path):
        engine, self.tokenizer = load_engine(path, OPTIONS)
        self.state = build_server_state(
            engine, path, ServerOptions(served_model_name=NAME, api_key=KEY, max_queued_requests=64)
        )
        self.port = _free_port()
        config = uvicorn.Config(
            build_app(self.state), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.02)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=KEY, max_retries=0
        )

    def engine_call(self, fn):
        """fn(engine) on the engine thread."""
        return self.state.loop.call_sync(fn, timeout=120)

    def offline(self, prompts, params):
        """Engine.generate on the same engine (idle between tests): the reference."""
        outs = self.engine_call(lambda e: e.generate(prompts, params))
        return [list(o.output_token_ids) for o in outs]

    def raw(self, method, path, body=None, key=KEY, raw_body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw_body if raw_body is not None else (json.dumps(body) if body else None)
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        return resp.status, text

    def wait_idle(self):
        while self.engine_call(lambda e: e.has_unfinished()):
            time.sleep(0.05)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny"))
    yield s
    s.stop()
    assert not s.state.loop.alive


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


PROMPT = "the quick brown fox"


def test_completions_match_the_engine(server):
    prompt_ids = server.tokenizer.encode(PROMPT)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12)
    (want,) = server.offline([prompt_ids], params)
    r = server.client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, seed=7,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert _ids(r.choices[0]) == want
    assert r.usage.completion_tokens == len(want)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.choices[0].text == server.tokenizer.decode(want)
    # streamed: the same tokens and text, piece by piece
    chunks = list(
        server.client.completions.create(
            model=NAME, prompt=prompt_ids, max_tokens=12, temperature=0.8, top_p=0.9, seed=7,
            stream=True, stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
    )  # fmt: skip
    streamed = [t for c in chunks for ch in c.choices for t in ch.model_extra["token_ids"]]
    assert streamed == want
    assert "".join(ch.text for c in chunks for ch in c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == len(want)
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason


def test_n_choices_and_several_prompts(server):
    ids = [server.tokenizer.encode(p) for p in ("hello", "paged attention")]
    r = server.client.completions.create(
        model=NAME, prompt=["hello", "paged attention"], n=2, max_tokens=6, seed=11,
        temperature=1.0, extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, c in enumerate(r.choices):  # choice j of a prompt samples with seed + j
        params = SamplingParams(temperature=1.0, seed=11 + i % 2, max_tokens=6)
        assert _ids(c) == server.offline([ids[i // 2]], params)[0]


def test_chat_matches_the_engine_streaming_or_not(server):
    messages = [{"role": "user", "content": "hello, how are you?"}]
    text = server.state.chat_template.render(messages)
    assert text.startswith("<s><|user|>\nhello") and text.endswith("<|assistant|>\n")
    prompt = server.tokenizer.encode(text, add_special_tokens=False)
    assert prompt.count(1) == 1  # one BOS: the template's
    (want,) = server.offline([prompt], SamplingParams(temperature=0.0, max_tokens=10))
    r = server.client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0.0,
        extra_body={"return_token_ids": True},
    )  # fmt: skip
    assert _ids(r.choices[0]) == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == server.tokenizer.decode(want)
    stream = server.client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=10, temperature=0.0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_and_stop_ids(server):
    base = server.client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=24, temperature=0.0,
        extra_body={"return_token_ids": True, "stop_token_ids": []},
    )  # fmt: skip
    ids, text = _ids(base.choices[0]), base.choices[0].text
    stop_id = ids[3]
    r = server.client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=24, temperature=0.0,
        extra_body={"return_token_ids": True, "stop_token_ids": [stop_id]},
    )  # fmt: skip
    assert _ids(r.choices[0]) == ids[: ids.index(stop_id) + 1]
    assert r.choices[0].finish_reason == "stop"
    visible = text.strip()
    assert len(visible) >= 4, text
    stop = visible[len(visible) // 2 : len(visible) // 2 + 2]
    for stream in (False, True):
        r = server.client.completions.create(
            model=NAME, prompt=PROMPT, max_tokens=24, temperature=0.0, stop=[stop], stream=stream
        )
        choices = [c.choices[0] for c in r] if stream else [r.choices[0]]
        assert "".join(c.text for c in choices) == text[: text.index(stop)]
        assert choices[-1].finish_reason == "stop"


def test_logprobs(server):
    r = server.client.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=5, temperature=0.0, logprobs=0
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == 5
    assert all(x == 0.0 for x in lp.token_logprobs)  # greedy: the token has all the mass
    r = server.client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=1.0, seed=3, logprobs=True,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(c.logprob < 0 for c in content)


BAD = [  # (path, body, status, param or None, message part)
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "Field required"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": NAME, "prompt": [5, 99999]}, 400, "prompt", "token ids"),
    ("/v1/completions", {"model": NAME, "prompt": "x " * 200}, 400, "prompt", "max_model_len"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 500}, 400, "prompt", "max_model_len"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop_token_ids": [10**6]}, 400, "stop_token_ids", "vocab"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_k": 10**6}, 400, "top_k", "vocab size"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "presence_penalty": 1}, 400, "presence_penalty", "not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 2}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "cache_salt": ""}, 400, "cache_salt", "at least 1"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user"}], "tools": [{}]}, 400, "tools", "not supported"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"content": "x"}]}, 400, "messages.0.role", "Field required"),
    ("/v1/nothing", {}, 404, None, "Not Found"),
]  # fmt: skip


@pytest.mark.parametrize("path,body,status,param,message", BAD)
def test_bad_requests(server, path, body, status, param, message):
    got, text = server.raw("POST", path, body)
    assert got == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_bad_json_key_and_health(server):
    status, text = server.raw("POST", "/v1/completions", raw_body="{not json")
    assert status == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    for key in (None, "wrong"):
        status, text = server.raw("GET", "/v1/models", key=key)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    assert server.raw("GET", "/health", key=None) == (200, '{"status":"ok"}')
    models = server.client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert models.data[0].model_extra["max_model_len"] == OPTIONS.max_model_len


def test_queue_full_is_429(server):
    loop = server.state.loop
    limit = loop.max_in_flight
    loop.max_in_flight = 0  # (read on the loop: no request in flight now)
    try:
        status, text = server.raw("POST", "/v1/completions", {"model": NAME, "prompt": "x"})
    finally:
        loop.max_in_flight = limit
    assert status == 429 and json.loads(text)["error"]["code"] == "queue_full"


def test_cache_salt_separates_tenants(server):
    prompt = "a large page is the least common multiple of every layer's page " * 2
    usage = {}
    for who, salt in (("a1", "tenant-a"), ("a2", "tenant-a"), ("b", "tenant-b"), ("none", None)):
        r = server.client.completions.create(
            model=NAME, prompt=prompt, max_tokens=2, temperature=0.0,
            extra_body={"cache_salt": salt} if salt else {},
        )  # fmt: skip
        usage[who] = r.usage.prompt_tokens_details.cached_tokens
    assert usage["a1"] == 0 and usage["a2"] > 0  # the same tenant hits
    assert usage["b"] == 0 and usage["none"] == 0  # another salt (or none) does not

    def page_tables(engine):  # both tenants running at once: no physical page in common
        ids = engine.tokenizer.encode(prompt + "again")
        params = SamplingParams(temperature=0.0, max_tokens=4)
        for rid, salt in (("t-a", "tenant-a"), ("t-b", "tenant-b"), ("t-a2", "tenant-a")):
            engine.add_request(ids, params, request_id=rid, cache_salt=salt)
        while engine.num_waiting:
            engine.step()
        kinds = range(len(engine.runner.plan.kinds))
        tables = {
            rid: {
                (k, p) for k in kinds for p in engine.manager.block_table(rid, k) if p is not None
            }
            for rid in ("t-a", "t-b", "t-a2")
        }
        for rid in tables:
            engine.abort(rid)
        return tables

    tables = server.engine_call(page_tables)
    assert tables["t-a"] and tables["t-b"]
    assert not tables["t-a"] & tables["t-b"]
    assert not tables["t-a2"] & tables["t-b"]


def test_disconnects_free_every_page(server):
    """16 streaming clients at once, 4 hang up after 3 events: the rest finish, the
    aborted ones leave no page behind, the manager's invariants hold."""
    prompts = [server.tokenizer.encode(f"request {i}: the quick brown fox") for i in range(16)]

    async def run():
        tasks = [
            stream_completion(
                "127.0.0.1", server.port,
                {"model": NAME, "prompt": p, "max_tokens": 40, "temperature": 0.0,
                 "stop_token_ids": []},
                disconnect_after=3 if i % 4 == 0 else None, api_key=KEY,
            )
            for i, p in enumerate(prompts)
        ]  # fmt: skip
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert all(r.status == 200 for r in results)
    gone = [r for r in results if r.disconnected]
    assert len(gone) == 4
    for i, r in enumerate(results):
        if not r.disconnected:  # all of it, once, as the engine makes it
            want = server.offline([prompts[i]], SamplingParams(temperature=0.0, max_tokens=40))
            assert r.token_ids == want[0] or r.finish_reason == "stop"
    server.wait_idle()

    def check(engine):
        check_manager(engine.manager)
        return engine.manager.stats()

    stats = server.engine_call(check)
    assert stats.num_running == 0 and stats.running_bytes == 0
    assert server.state.loop.in_flight == 0


def test_metrics_parse(server):
    status, text = server.raw("GET", "/metrics", key=None)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "jenga_num_requests_running", "jenga_num_requests_waiting", "jenga_kv_held_bytes",
        "jenga_kv_needed_bytes", "jenga_kv_cached_bytes", "jenga_kv_waste_ratio",
        "jenga_kv_kind_held_bytes", "jenga_prefix_cache_hit_rate", "jenga_num_preemptions",
        "jenga_prompt_tokens", "jenga_generation_tokens", "jenga_time_to_first_token_seconds",
        "jenga_inter_token_latency_seconds", "jenga_requests_finished",
    ):  # fmt: skip
        assert name in families, name
    value = {s.name: s.value for f in families.values() for s in f.samples}
    generated = server.engine_call(lambda e: e.counters.generated_tokens)
    assert value["jenga_generation_tokens_total"] == generated > 0
    assert value["jenga_num_requests_running"] == 0
    assert value["jenga_time_to_first_token_seconds_count"] > 0
    assert 0 < value["jenga_prefix_cache_hit_rate"] <= 1
