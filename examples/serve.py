"""The example serving loop: a tiny hybrid model, a seeded workload with images, metrics.

python examples/serve.py                       # Llama-3.2-Vision-like model, 48 requests
python examples/serve.py --compare             # the same workload with the paged baseline too
python examples/serve.py --family gemma3 --checkpoint /path/to/orbax_dir
python examples/serve.py --interactive         # prompts from stdin, tokens streamed back
python examples/serve.py --model /path/to/dir --interactive   # real weights, text

The model has random weights unless --checkpoint names an orbax checkpoint of the same
tiny architecture (``models.checkpoint.save_params``), or --model names a checkpoint
directory: Hugging Face (config.json + safetensors) or converted to orbax (``python -m
models.hf.convert``). Nothing is downloaded. With a tokenizer.json in that directory,
interactive prompts and replies are text; otherwise tokens are bytes (the tiny models
have a 256-token vocabulary) and replies are shown as ASCII ("." for the rest): what
the loop then shows is the machinery and its numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from jenga_jax.arg_types import nonnegative_float, positive_float, positive_int

LOG = logging.getLogger("jenga_jax.serve")


def build_model(args):
    """(model, tokenizer or None) from --model, --checkpoint or the tiny --family."""
    from flax import nnx

    from jenga_jax.engine.text import Tokenizer
    from models import HybridDecoder, tiny_config
    from models.checkpoint import load_params
    from models.pretrained import load_pretrained
    from models.random_init import perturb

    if args.model:
        return load_pretrained(args.model, dtype=args.dtype), Tokenizer.from_dir(args.model)
    model = HybridDecoder(tiny_config(args.family), rngs=nnx.Rngs(args.seed))
    if args.checkpoint:
        return load_params(model, args.checkpoint), None
    return perturb(model, seed=args.seed), None


def build_engine(model, args, allocator: str, tokenizer=None):
    from jenga_jax.engine.llm_engine import Engine
    from jenga_jax.engine.scheduler import SchedulerConfig

    return Engine(
        model,
        kv_budget_bytes=int(args.kv_budget_mib * 2**20),
        allocator=allocator,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
        ),
        max_model_len=args.max_model_len,
        max_encoder_tokens=args.max_encoder_tokens,
        seed=args.seed,
        tokenizer=tokenizer,
    )


def check_fits(engine, trace) -> None:
    """Refuse, before anything compiles, a pool that cannot hold a request of the trace
    (host bookkeeping only: each request is added and aborted)."""
    from jenga_jax.core.errors import RequestError
    from jenga_jax.engine.model_runner import Image
    from jenga_jax.engine.sampling import SamplingParams

    for r in trace:
        images = [Image(im.content_hash, _zeros(im.num_tokens, engine.cfg)) for im in r.images]
        try:
            rid = engine.add_request(
                list(r.prompt_token_ids), SamplingParams(max_tokens=r.output_len), images or None
            )
        except RequestError as e:
            raise SystemExit(f"serve.py: error: {e} (raise --kv-budget-mib)") from None
        engine.abort(rid)


def _zeros(n: int, cfg):
    import numpy as np

    return np.zeros((n, cfg.vision_dim), np.float32)


def serve_workload(model, args) -> None:
    from jenga_jax.core.workloads import image_questions_like
    from jenga_jax.engine.serving import format_table, run_trace

    trace = image_questions_like(
        args.requests,
        vocab_size=model.cfg.vocab_size,
        seed=args.seed,
        image_tokens_mean=args.image_tokens,
        arrival_rate=args.arrival_rate,
    )
    if model.cfg.vision_dim is None:  # a text-only model: the same questions, no images
        trace = [dataclasses.replace(r, images=()) for r in trace]
    fits = [r for r in trace if len(r.prompt_token_ids) < args.max_model_len]
    cut = sum(len(r.prompt_token_ids) + r.output_len > args.max_model_len for r in fits)
    trace = [  # outputs end at max_model_len
        dataclasses.replace(
            r, output_len=min(r.output_len, args.max_model_len - len(r.prompt_token_ids))
        )
        for r in fits
    ]
    if cut or len(trace) < args.requests:
        LOG.warning(
            "max_model_len %d: %d requests left out, %d with fewer output tokens",
            args.max_model_len, args.requests - len(trace), cut,
        )  # fmt: skip
    if not trace:
        raise SystemExit("serve.py: error: no request of the workload fits --max-model-len")
    engines = {
        a: build_engine(model, args, a) for a in (["jenga", "paged"] if args.compare else ["jenga"])
    }
    for engine in engines.values():
        check_fits(engine, trace)
    reports = []
    for allocator, engine in engines.items():
        print(f"{allocator}: warming up (compiling every step shape)", file=sys.stderr)
        t0 = time.perf_counter()
        engine.warmup(None if args.quiet else _compile_progress)
        print(f" {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        reports.append(
            run_trace(
                engine,
                trace,
                workload="demo",
                temperature=args.temperature,
                progress=not args.quiet,
            )
        )
    r = reports[0]
    print(
        f"\n{r.model}: {r.num_requests} requests, KV budget {args.kv_budget_mib} MiB, "
        f"{r.generated_tokens} tokens generated"
    )
    print(format_table(reports))
    if args.json:
        with open(args.json, "w") as f:
            for rep in reports:
                f.write(json.dumps(rep.row()) + "\n")


def interactive(model, args, tokenizer) -> None:
    """Prompts from stdin, replies streamed to stdout; a bad prompt is answered with an
    error line and the loop goes on; Ctrl-C (or an empty line, or EOF) quits."""
    from jenga_jax.core.errors import RequestError
    from jenga_jax.engine.sampling import SamplingParams
    from jenga_jax.loading import check_pool_fits

    engine = build_engine(model, args, "jenga", tokenizer)
    try:
        check_pool_fits(engine)
    except ValueError as e:
        raise SystemExit(f"serve.py: error: {e}") from None
    params = SamplingParams(
        temperature=args.temperature or 0.8, top_p=0.95, max_tokens=args.max_tokens, seed=None
    )
    print("type a prompt, then Enter (empty line, EOF or Ctrl-C quits)", file=sys.stderr)
    try:
        while True:
            sys.stderr.write("> ")
            sys.stderr.flush()
            line = sys.stdin.readline()
            text = line.rstrip("\n")
            if not text:
                break
            if tokenizer is not None:
                pieces = engine.stream_text(text, params)
            else:  # bytes in; printable ASCII out as is, else "."
                tokens = engine.stream(list(text.encode("utf-8")), params)
                pieces = (chr(t) if 32 <= t < 127 else "." for t in tokens)
            try:
                for piece in pieces:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except RequestError as e:  # too long, bad tokens: say so, keep serving
                print(f"error: {e}", file=sys.stderr)
                continue
            finally:
                pieces.close()  # a reply cut short by Ctrl-C is aborted: its pages freed
            sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("interrupted", file=sys.stderr)


def _compile_progress(done: int, total: int) -> None:
    sys.stderr.write(f"\r  step shapes compiled (or loaded from the cache): {done}/{total}")
    sys.stderr.flush()


FAMILIES = ("gemma2", "gemma3", "gpt-oss", "jamba", "llama", "llama-vision", "llama4", "ministral")


def main(argv=None) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=fmt)
    p.add_argument("--family", default="llama-vision", choices=FAMILIES, help="tiny model")
    p.add_argument("--checkpoint", help="orbax checkpoint of the tiny --family model")
    p.add_argument("--model", help="checkpoint directory: Hugging Face or converted (orbax)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="--model's dtype (default: as stored)")  # fmt: skip
    p.add_argument("--requests", type=positive_int, default=48, help="workload size")
    p.add_argument("--image-tokens", type=positive_int, default=192, help="mean image tokens")
    p.add_argument("--arrival-rate", type=positive_float,
                   help="requests/s (default: all at once)")  # fmt: skip
    p.add_argument("--kv-budget-mib", type=positive_float, default=2.0, help="KV pool")
    p.add_argument("--max-num-seqs", type=positive_int, default=32, help="requests per step")
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=256,
                   help="tokens per step")  # fmt: skip
    p.add_argument("--max-model-len", type=positive_int, default=256,
                   help="longest request (prompt + output)")  # fmt: skip
    p.add_argument("--max-encoder-tokens", type=positive_int, default=320,
                   help="most image tokens per request")  # fmt: skip
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy")
    p.add_argument("--max-tokens", type=positive_int, default=48, help="interactive replies")
    p.add_argument("--seed", type=int, default=0, help="model and workload seed")
    p.add_argument("--compare", action="store_true", help="also run the paged baseline")
    p.add_argument("--interactive", action="store_true", help="prompts from stdin")
    p.add_argument("--json", help="write one JSON line per allocator here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.model and args.checkpoint:
        p.error("give --model or --checkpoint, not both")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax"):  # jax logs at INFO which backends it could not start
        logging.getLogger(noisy).setLevel(logging.WARNING)
    model, tokenizer = build_model(args)
    if args.interactive:
        interactive(model, args, tokenizer)
    else:
        serve_workload(model, args)


if __name__ == "__main__":
    main()
