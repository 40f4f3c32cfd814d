"""The ASGI app: OpenAI-compatible routes over an :class:`EngineLoop`.

``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream: true`` as
server-sent events), ``/health``, ``/metrics``. Errors are OpenAI error bodies: 400 for
a bad request, 401 for a wrong API key, 404 for an unknown model or route, 429 when the
queue is full, 503 while shutting down or after the engine failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from jenga_jax.core.errors import RequestError
from jenga_jax.engine.sampling import UINT32, SamplingParams
from jenga_jax.server.chat_template import ChatTemplate, ChatTemplateError
from jenga_jax.server.choices import Choice, chat_logprobs, completion_logprobs
from jenga_jax.server.engine_loop import EngineLoop, EngineStopped, QueueFull, RequestSpec
from jenga_jax.server.errors import APIError, bad_request
from jenga_jax.server.protocol import ChatCompletionRequest, CompletionRequest
from jenga_jax.server.sse import EventStreamResponse, event
from jenga_jax.server.text_output import ChoiceText

LOG = logging.getLogger("jenga_jax.server")


class ServerState:
    """What the routes need: the engine loop, the served name, text tools, the key."""

    def __init__(
        self,
        engine_loop: EngineLoop,
        *,
        model_name: str,
        chat_template: ChatTemplate | None = None,
        api_key: str | None = None,
        metrics=None,
    ):
        self.loop = engine_loop
        self.engine = engine_loop.engine  # read-only here: sizes and the tokenizer
        self.tokenizer = self.engine.tokenizer
        self.model_name = model_name
        self.chat_template = chat_template
        self.api_key = api_key
        self.metrics = metrics
        self.created = int(time.time())


def build_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop.start(asyncio.get_running_loop())
        LOG.info("serving %s", state.model_name)
        try:
            yield
        finally:
            LOG.info("shutting down: aborting unfinished requests")
            await asyncio.to_thread(state.loop.stop)

    app = FastAPI(title="jenga-jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        return bad_request(f"{param}: {message}" if param else message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            raise APIError(503, state.loop._why_stopped(), type="service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            raise APIError(404, "metrics are off", type="not_found_error")
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def check_key(request: Request) -> None:
        if state.api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
                raise APIError(
                    401, "invalid or missing API key (Authorization: Bearer KEY)",
                    code="invalid_api_key",
                )  # fmt: skip

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        body.check_supported()
        prompts = _completion_prompts(state, body.prompt)
        return await _serve(state, request, body, prompts, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        body.check_supported()
        if state.chat_template is None:
            raise bad_request(
                "this model has no chat template (tokenizer_config.json or "
                "chat_template.jinja); serve it with --chat-template FILE, or use "
                "/v1/completions",
                "messages",
            )
        if state.tokenizer is None:
            raise bad_request("chat needs a tokenizer; this model serves token ids only")
        try:
            text = state.chat_template.render(
                body.template_messages(), add_generation_prompt=body.add_generation_prompt
            )
        except ChatTemplateError as e:
            raise bad_request(str(e), "messages") from e
        prompt = state.tokenizer.encode(text, add_special_tokens=False)
        return await _serve(state, request, body, [prompt], chat=True)

    app.include_router(v1)
    return app


# ---------------------------------------------------------------------- requests


def _model_card(state: ServerState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "jenga-jax",
        "max_model_len": state.engine.max_model_len,
    }


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves {state.model_name!r}",
            type="not_found_error",
            param="model",
            code="model_not_found",
        )


def _completion_prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) or prompt == []:
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise bad_request("the prompt is empty", "prompt")
            if state.tokenizer is None:
                raise bad_request(
                    "this model has no tokenizer: give prompts as token ids", "prompt"
                )
            p = state.tokenizer.encode(p)
        if not p:
            raise bad_request("the prompt is empty", "prompt")
        out.append(list(p))
    return out


def _sampling_params(state: ServerState, body, prompt_len: int, choice: int) -> SamplingParams:
    limit = body.output_limit if isinstance(body, ChatCompletionRequest) else body.max_tokens
    room = state.engine.max_model_len - prompt_len
    if limit is None:  # chat: the rest of the context
        if room < 1:
            raise bad_request(
                f"the prompt has {prompt_len} tokens: no room left in max_model_len "
                f"{state.engine.max_model_len}",
                "messages",
            )
        limit = room
    seed = None if body.seed is None else (body.seed + choice) % UINT32
    want_logprobs = (
        body.logprobs is not None if isinstance(body, CompletionRequest) else body.logprobs
    )
    try:
        return SamplingParams(
            temperature=body.temperature,
            top_k=max(body.top_k, 0),
            top_p=body.top_p,
            seed=seed,
            max_tokens=limit,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            logprobs=bool(want_logprobs),
        )
    except RequestError as e:
        raise bad_request(str(e)) from e


async def _serve(state: ServerState, request: Request, body, prompts, *, chat: bool):
    if body.stop_strings and state.tokenizer is None:
        raise bad_request("stop strings need a tokenizer; use stop_token_ids", "stop")
    prefix = "chatcmpl" if chat else "cmpl"
    response_id = f"{prefix}-{uuid.uuid4().hex[:24]}"
    specs, choices = [], []
    for p_index, prompt in enumerate(prompts):
        for j in range(body.n):
            index = p_index * body.n + j
            rid = f"{response_id}-{index}"
            params = _sampling_params(state, body, len(prompt), j)
            specs.append(RequestSpec(rid, tuple(prompt), params, body.cache_salt))
            text = ChoiceText(state.tokenizer, body.stop_strings)
            choices.append(Choice(index, rid, len(prompt), text))
    try:
        handle = await state.loop.submit(specs)
    except RequestError as e:
        field = re.match(r"SamplingParams\.(\w+)", str(e))
        param = field.group(1) if field else ("messages" if chat else "prompt")
        raise bad_request(str(e), param) from e
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from e  # fmt: skip
    except EngineStopped as e:
        raise APIError(503, str(e), type="service_unavailable") from e
    reply = _Reply(state, body, response_id, prompts, choices, chat)
    if body.stream:
        return EventStreamResponse(_stream(state, handle, reply), lambda: state.loop.abort(handle))
    result = asyncio.ensure_future(_collect(state, handle, reply))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
        state.loop.abort(handle)  # no-op when all finished
    if not result.done() or result.cancelled():
        return Response(status_code=499)  # the client left: nobody reads this
    return JSONResponse(result.result())


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _outputs(state: ServerState, handle, reply: _Reply):
    """(choice, new token ids, new logprobs) until every choice is done."""
    while not all(c.done for c in reply.choices):
        index, item = await handle.outputs.get()
        batch = [(index, item)]
        while not handle.outputs.empty():  # whatever else came meanwhile, at once
            batch.append(handle.outputs.get_nowait())
        updates = []
        for index, item in batch:
            if isinstance(item, BaseException):
                raise APIError(503, str(item), type="service_unavailable")
            choice = reply.choices[index]
            if choice.done:
                continue
            new, lps = choice.update(item)
            if choice.done and not item.finished:  # a stop string: stop the engine request
                state.loop.abort(handle, [choice.request_id])
            updates.append((choice, new, lps))
        yield updates


async def _collect(state: ServerState, handle, reply: _Reply) -> dict:
    async for _ in _outputs(state, handle, reply):
        pass
    return reply.full()


async def _stream(state: ServerState, handle, reply: _Reply):
    try:
        async for updates in _outputs(state, handle, reply):
            chunks = [reply.chunk(c, new, lps) for c, new, lps in updates]
            text = "".join(event(json.dumps(c)) for c in chunks if c is not None)
            if text:
                yield text
    except APIError as e:
        yield event(json.dumps(e.body()))
        return
    tail = ""
    if reply.body.stream_options and reply.body.stream_options.include_usage:
        tail = event(
            json.dumps({**reply.envelope(chunk=True), "choices": [], "usage": reply.usage()})
        )
    yield tail + event("[DONE]")


class _Reply:
    """Formats the response (or its stream chunks) of one completion request."""

    def __init__(self, state: ServerState, body, response_id, prompts, choices, chat: bool):
        self.state, self.body, self.id = state, body, response_id
        self.prompts, self.choices, self.chat = prompts, choices, chat

    def envelope(self, chunk: bool = False) -> dict:
        if self.chat:
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": int(time.time()),
            "model": self.state.model_name,
        }

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        cached = sum(c.cached_tokens for c in self.choices[:: self.body.n])  # once per prompt
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _logprobs(self, choice: Choice, ids, lps, offset: int):
        if not lps and not (ids and self._wants_logprobs()):
            return None
        tok = self.state.tokenizer
        if self.chat:
            return chat_logprobs(tok, ids, lps)
        return completion_logprobs(tok, ids, lps, offset)

    def _wants_logprobs(self) -> bool:
        lp = self.body.logprobs
        return bool(lp) if self.chat else lp is not None

    def full(self) -> dict:
        out = []
        for c in self.choices:
            text = c.text.take(final=True)
            item = {"index": c.index, "finish_reason": c.finish_reason}
            item["logprobs"] = (
                self._logprobs(c, c.token_ids, c.logprobs, 0) if self._wants_logprobs() else None
            )
            if self.chat:
                item["message"] = {"role": "assistant", "content": text}
            else:
                item["text"] = text
            if self.body.return_token_ids:
                item["token_ids"] = c.token_ids
                item["prompt_token_ids"] = self.prompts[c.index // self.body.n]
            out.append(item)
        return {**self.envelope(), "choices": out, "usage": self.usage()}

    def chunk(self, c: Choice, new, lps) -> dict | None:
        offset = c.text.sent
        text = c.text.take(final=c.done)
        wants_tokens = self.body.return_token_ids or self._wants_logprobs()
        if not text and not c.done and not (new and wants_tokens):
            return None
        item = {"index": c.index, "finish_reason": c.finish_reason}
        item["logprobs"] = self._logprobs(c, new, lps, offset) if self._wants_logprobs() else None
        if self.chat:
            delta = {"content": text}
            if not c.role_sent:
                delta["role"] = "assistant"
                c.role_sent = True
            item["delta"] = delta
        else:
            item["text"] = text
        if self.body.return_token_ids:
            item["token_ids"] = new
        return {**self.envelope(chunk=True), "choices": [item]}
