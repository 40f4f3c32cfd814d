"""The ``jenga-jax`` command: serve, generate, convert, report, demo-checkpoint.

Options are parsed and checked before anything heavy is imported (``--help`` does not
load JAX), and bad values are refused before any weight is read or step compiled.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

from jenga_jax.arg_types import nonnegative_float, positive_float, positive_int

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# ---------------------------------------------------------------------- option types


def _fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be in [1, 65535], got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


def _checkpoint_dir(text: str) -> str:
    path = pathlib.Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no directory at {text}")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text} has no config.json: not a checkpoint directory")
    return text


# ---------------------------------------------------------------------- parser


def _engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="weights' dtype (default: as stored)",
    )
    g.add_argument(
        "--max-model-len",
        type=positive_int,
        help="longest request, prompt + output tokens (default: the model's)",
    )
    g.add_argument(
        "--kv-memory-fraction",
        type=_fraction,
        default=0.9,
        help="fraction of free device memory (host memory on a CPU) for the KV "
        "pool, capped at twice what --max-num-seqs full-length requests hold",
    )
    g.add_argument(
        "--kv-budget-mib",
        type=positive_float,
        help="KV pool size in MiB (overrides --kv-memory-fraction)",
    )
    g.add_argument("--max-num-seqs", type=positive_int, default=16, help="most requests per step")
    g.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=256,
        help="most tokens per step (prefill chunks included)",
    )
    g.add_argument(
        "--allocator",
        choices=("jenga", "paged", "uniform"),
        default="jenga",
        help="KV page plan (paged / uniform: the baselines)",
    )
    g.add_argument("--no-prefix-caching", action="store_true", help="turn the prefix cache off")
    g.add_argument("--seed", type=_seed, default=0,
                   help="engine seed: unseeded requests derive their keys from it")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(
        prog="jenga-jax", description="Serve and run LLMs with Jenga's memory management.",
        formatter_class=fmt,
    )  # fmt: skip
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"), help="logging level")  # fmt: skip
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server", formatter_class=fmt,
                       description="Serve a checkpoint over an OpenAI-compatible API.")  # fmt: skip
    s.add_argument("model", type=_checkpoint_dir,
                   help="checkpoint directory (Hugging Face, or converted to orbax)")  # fmt: skip
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on")
    g.add_argument("--port", type=_port, default=8000, help="port to listen on")
    g.add_argument(
        "--served-model-name", help="the model's name in the API (default: the directory's name)"
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("JENGA_JAX_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $JENGA_JAX_API_KEY, else none)",
    )
    g.add_argument("--chat-template", help="jinja2 file overriding the checkpoint's template")
    g.add_argument(
        "--max-queued-requests",
        type=positive_int,
        default=1024,
        help="requests in flight (running + waiting) before 429s",
    )
    g.add_argument(
        "--no-warmup",
        action="store_true",
        help="compile step shapes on first use instead of at start",
    )
    g.add_argument("--graceful-shutdown-s", type=nonnegative_float, default=10.0,
                   help="on SIGINT/SIGTERM, seconds open requests get to finish")  # fmt: skip
    _engine_options(s)

    gen = sub.add_parser("generate", help="generate from prompts, print the replies",
                         formatter_class=fmt)  # fmt: skip
    gen.add_argument("model", type=_checkpoint_dir, help="checkpoint directory")
    gen.add_argument("prompts", nargs="+", help="prompts (text)")
    gen.add_argument("--max-tokens", type=positive_int, default=64, help="tokens per reply")
    gen.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=_fraction, default=1.0, help="nucleus mass (1: off)")
    gen.add_argument("--top-k", type=int, default=0, help="top-k (0: off)")
    gen.add_argument("--chat", action="store_true", help="each prompt is a user message")
    _engine_options(gen)

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint to orbax",
                       formatter_class=fmt)  # fmt: skip
    c.add_argument("hf_dir", type=_checkpoint_dir, help="config.json + *.safetensors")
    c.add_argument("out_dir", help="new directory for the converted checkpoint")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the stored parameters")  # fmt: skip

    r = sub.add_parser("report", help="Jenga vs paging on a model's KV layout (host only)",
                       formatter_class=fmt)  # fmt: skip
    from_memory_report_args(r)

    d = sub.add_parser("demo-checkpoint", formatter_class=fmt,
                       help="write a tiny random checkpoint (and tokenizer) to try")  # fmt: skip
    d.add_argument("out_dir", help="new directory")
    d.add_argument("--seed", type=_seed, default=0, help="weights' seed")
    return p


def from_memory_report_args(p: argparse.ArgumentParser) -> None:
    from jenga_jax.memory_report import add_arguments

    add_arguments(p)


# ---------------------------------------------------------------------- commands


def _options(args):
    from jenga_jax.loading import EngineOptions

    budget = None if args.kv_budget_mib is None else int(args.kv_budget_mib * 2**20)
    return EngineOptions(
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_memory_fraction=args.kv_memory_fraction,
        kv_budget_bytes=budget,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        allocator=args.allocator,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
    )


def _serve(args) -> None:
    from jenga_jax.server.launch import ServerOptions, serve

    if args.chat_template and not os.path.isfile(args.chat_template):
        raise ValueError(f"--chat-template: no file at {args.chat_template}")
    options = ServerOptions(
        host=args.host,
        port=args.port,
        served_model_name=args.served_model_name,
        api_key=args.api_key,
        chat_template=args.chat_template,
        max_queued_requests=args.max_queued_requests,
        warmup=not args.no_warmup,
        graceful_s=args.graceful_shutdown_s,
        log_level=args.log_level,
    )
    serve(args.model, _options(args), options)


def _generate(args) -> None:
    from jenga_jax.engine.sampling import SamplingParams
    from jenga_jax.llm import LLM

    opts = _options(args)
    llm = LLM(args.model, **{f: getattr(opts, f) for f in opts.__dataclass_fields__})
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, seed=args.seed,
    )  # fmt: skip
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params)
    else:
        outs = llm.generate(args.prompts, params)
    for out in outs:
        print(out.text if out.text is not None else " ".join(map(str, out.output_token_ids)))


def _convert(args) -> None:
    from models.hf.convert import convert

    print(f"wrote {convert(args.hf_dir, args.out_dir, args.dtype)}")


def _report(args) -> None:
    from jenga_jax.memory_report import run

    run(args)


def _demo_checkpoint(args) -> None:
    from jenga_jax.demo_checkpoint import write_demo_checkpoint

    print(f"wrote {write_demo_checkpoint(args.out_dir, seed=args.seed)}")


COMMANDS = {
    "serve": _serve,
    "generate": _generate,
    "convert": _convert,
    "report": _report,
    "demo-checkpoint": _demo_checkpoint,
}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from jenga_jax import __version__

        print(f"jenga-jax {__version__}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if getattr(args, "out_dir", None) and os.path.exists(args.out_dir):
        parser.error(f"{args.out_dir} exists; give a new directory")
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if args.log_level != "debug":  # orbax logs every read at INFO
        for noisy in ("absl", "jax"):  # jax logs at INFO which backends it could not start
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:  # CheckpointError is a ValueError
        print(f"jenga-jax {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
