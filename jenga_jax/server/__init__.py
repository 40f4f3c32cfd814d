"""An OpenAI-compatible HTTP server over the engine (FastAPI on uvicorn).

One thread owns the :class:`~jenga_jax.engine.llm_engine.Engine` (``engine_loop``);
HTTP handlers on the asyncio loop hand it requests and aborts through a queue and get
its outputs back per request. ``api.build_app`` makes the ASGI app, ``launch.serve``
runs it (``jenga-jax serve DIR``). Needs the ``serve`` extra. See docs/serving.md.
"""
