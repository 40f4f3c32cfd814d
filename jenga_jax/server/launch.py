"""Run the server: a checkpoint directory in, an OpenAI-compatible endpoint out.

``serve(path, ...)`` loads the engine (``jenga_jax.loading``), compiles every step
shape (logged as it goes), and runs uvicorn until SIGINT / SIGTERM; then it stops
accepting connections, lets open requests finish for up to ``graceful_s`` seconds,
aborts the rest and stops the engine thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

LOG = logging.getLogger("jenga_jax.server")


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None  # None: the directory's name
    api_key: str | None = None
    chat_template: str | None = None  # a file overriding the checkpoint's template
    max_queued_requests: int = 1024
    warmup: bool = True
    graceful_s: float = 10.0
    log_level: str = "info"


def build_server_state(engine, path, options: ServerOptions):
    """The app's state for `engine` serving the checkpoint in `path`."""
    from jenga_jax.server.api import ServerState
    from jenga_jax.server.chat_template import ChatTemplate
    from jenga_jax.server.engine_loop import EngineLoop
    from jenga_jax.server.metrics import ServerMetrics

    template = ChatTemplate.from_dir(path)
    if options.chat_template:
        special = template.special_tokens if template else {}
        template = ChatTemplate.from_file(options.chat_template, special)
    name = options.served_model_name or os.path.basename(os.path.normpath(str(path)))
    kinds = [f"{i}:{k.rule.name}" for i, k in enumerate(engine.runner.plan.kinds)]
    metrics = ServerMetrics(name, kinds)
    loop = EngineLoop(engine, max_in_flight=options.max_queued_requests, metrics=metrics)
    return ServerState(
        loop, model_name=name, chat_template=template, api_key=options.api_key, metrics=metrics
    )


def serve(path, engine_options, options: ServerOptions) -> None:
    import uvicorn

    from jenga_jax.loading import load_engine
    from jenga_jax.server.api import build_app

    t0 = time.perf_counter()
    engine, _ = load_engine(path, engine_options)
    state = build_server_state(engine, path, options)  # template errors before compiling
    LOG.info("loaded %s in %.1f s", path, time.perf_counter() - t0)
    if options.warmup:
        warm_up(engine)
    config = uvicorn.Config(
        build_app(state),
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        timeout_graceful_shutdown=options.graceful_s,
        access_log=options.log_level == "debug",
    )
    uvicorn.Server(config).run()


def warm_up(engine) -> None:
    """Compile every step shape, logging the progress."""
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 5:
            last[0] = now
            LOG.info("compiled %d/%d step shapes (%.0f s)", done, total, now - t0)

    n = engine.warmup(progress)
    LOG.info("warm: %d step shapes in %.1f s", n, time.perf_counter() - t0)
