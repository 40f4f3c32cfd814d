"""Decode attention: achieved bandwidth of the Pallas kernels vs the bytes they must read.

For each batch x context x kind, one decode step (q_len 1) over a paged view filled with
random K/V: the Pallas kernel chosen by platform (Triton on GPU, Mosaic on TPU), the
pure-JAX reference, and, for kind "full" on GPU, upstream
``jax.experimental.pallas.ops.gpu.paged_attention`` (no window/chunk/sinks; given the
same K/V in its own layout). "Must read" counts the K/V of the keys a query can see
(full/cross: the context, sliding: the window, chunked: the current chunk), plus q and
the output; bandwidth = must-read bytes / median time, also given as a percentage of
the device's copy bandwidth measured in the same run (read + write of a large buffer).
Rows whose inputs or reference temporaries would not fit ``--max-gib`` are skipped.

    python benchmarks/kernels.py --json kernels.jsonl       # on an H100 (or a TPU)
    python benchmarks/kernels.py --quick                    # CPU smoke run (interpret)
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jenga_jax.device.reference_attention import paged_attention as reference_attention
from pallas_kernels import dispatch

KINDS = {"full": {}, "sliding": {"window": 4096}, "chunked": {"chunk": 8192}, "cross": {}}


def visible_keys(kind: str, context: int, opts: dict) -> int:
    """Keys the last token (position context - 1) sees."""
    if kind == "sliding":
        return min(context, opts["window"])
    if kind == "chunked":
        return (context - 1) % opts["chunk"] + 1
    return context


def make_inputs(batch, context, *, q_heads, kv_heads, head_dim, tpp, dtype, seed=0):
    """A view [pages, 1, tpp, 2 * kv_heads, head_dim] (what kind_view returns), randomly
    permuted block tables, every request at `context` tokens, the query at the last one."""
    pages_per_seq = -(-context // tpp)
    num_pages = batch * pages_per_seq
    key = jax.random.key(seed)
    view = jax.random.normal(key, (num_pages, 1, tpp, 2 * kv_heads, head_dim), dtype)
    perm = jax.random.permutation(jax.random.fold_in(key, 1), num_pages).astype(jnp.int32)
    block_tables = perm.reshape(batch, pages_per_seq)
    kv_lens = jnp.full((batch,), context, jnp.int32)
    q_positions = jnp.full((batch, 1), context - 1, jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 2), (batch, 1, q_heads, head_dim), dtype)
    return q, view, block_tables, kv_lens, q_positions


def time_fn(fn, args, iters: int) -> float:
    """Median seconds per call (after one warm-up/compile call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def upstream_gpu(q, view, block_tables, kv_lens, *, scale: float, interpret: bool):
    """jax.experimental.pallas.ops.gpu.paged_attention on the same K/V -> (fn, args).

    It has no softmax scale (q is pre-scaled here, outside the timed call) and takes K
    and V as separate [kv_heads, pages, tpp, head_dim] arrays (copied here, also untimed).
    """
    from jax.experimental.pallas.ops.gpu import paged_attention as upstream

    pages_per_seq = block_tables.shape[1]
    k_splits = max(d for d in range(1, 17) if pages_per_seq % d == 0)
    per_split = pages_per_seq // k_splits
    ppcb = max(d for d in range(1, 9) if per_split % d == 0)
    kv_heads = view.shape[3] // 2
    k_pages = jnp.transpose(view[:, 0, :, :kv_heads], (2, 0, 1, 3))  # [kv_heads, pages, tpp, D]
    v_pages = jnp.transpose(view[:, 0, :, kv_heads:], (2, 0, 1, 3))
    fn = jax.jit(
        functools.partial(
            upstream.paged_attention,
            block_h=16,
            pages_per_compute_block=ppcb,
            k_splits=k_splits,
            interpret=interpret,
        )
    )
    q_scaled = (q[:, 0].astype(jnp.float32) * scale).astype(q.dtype)
    return fn, (q_scaled, k_pages, v_pages, block_tables, kv_lens)


def run_row(batch, context, kind, args, *, backend, interpret, iters, max_gib, copy_gbps):
    opts = KINDS[kind]
    q_heads, kv_heads, head_dim, tpp = args.q_heads, args.kv_heads, args.head_dim, args.tpp
    dtype = jnp.dtype(args.dtype)
    item = dtype.itemsize
    kv_bytes = batch * -(-context // tpp) * tpp * 2 * kv_heads * head_dim * item
    if kv_bytes > max_gib * 2**30:
        return [dict(kind=kind, batch=batch, context=context, skipped="K/V over --max-gib")]
    inputs = make_inputs(
        batch, context, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, tpp=tpp, dtype=dtype
    )
    n_vis = visible_keys(kind, context, opts)
    must_read = batch * (n_vis * 2 * kv_heads * head_dim * item + 2 * q_heads * head_dim * item)
    common = dict(layer=0, kind=kind, scale=head_dim**-0.5, **opts)
    methods = {
        "pallas": jax.jit(
            functools.partial(
                dispatch.paged_attention, **common, backend=backend, interpret=interpret
            )
        ),
    }
    # The reference gathers every page of the table and upcasts K and V to float32.
    if kv_bytes * (1 + 2 * 4 / item) <= max_gib * 2**30:
        methods["reference"] = jax.jit(functools.partial(reference_attention, **common))
    rows, outs = [], {}
    for name, fn in methods.items():
        t = time_fn(fn, inputs, iters)
        outs[name] = fn(*inputs)
        rows.append((name, t))
    if kind == "full" and (jax.default_backend() == "gpu" or interpret) and args.upstream:
        if 2 * kv_bytes <= max_gib * 2**30:
            fn, up_args = upstream_gpu(*inputs[:4], scale=common["scale"], interpret=interpret)
            t = time_fn(fn, up_args, iters)
            outs["upstream"] = fn(*up_args)[:, None]
            rows.append(("upstream", t))
            del up_args
    base = np.asarray(outs["pallas"], np.float32)
    result = []
    for name, t in rows:
        got = np.asarray(outs[name], np.float32)
        err = float(np.max(np.abs(got - base)) / max(np.max(np.abs(base)), 1e-30))
        gbps = must_read / t / 1e9
        result.append(
            dict(
                kind=kind,
                batch=batch,
                context=context,
                method=name,
                backend=backend if name == "pallas" else "xla",
                time_us=round(t * 1e6, 1),
                must_read_mb=round(must_read / 1e6, 2),
                gb_per_s=round(gbps, 1),
                pct_copy=round(100 * gbps / copy_gbps, 1),
                copy_gb_per_s=round(copy_gbps, 1),
                max_rel_err_vs_pallas=float(f"{err:.2e}"),
                dtype=dtype.name,
                q_heads=q_heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                tokens_per_page=tpp,
                device=jax.devices()[0].device_kind,
            )
        )
    return result


def copy_bandwidth(mib: float, iters: int) -> float:
    """GB/s of x + 1 over a bfloat16 buffer of `mib` MiB (it reads and writes it once)."""
    x = jnp.ones((int(mib * 2**20) // 2,), jnp.bfloat16)
    seconds = time_fn(jax.jit(lambda x: x + 1), (x,), iters)
    return 2 * x.nbytes / seconds / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tpp", type=int, default=16, help="tokens per page")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--backend", default=None, help="pallas backend (default: by platform)")
    p.add_argument("--interpret", action="store_true", help="run kernels in interpret mode")
    p.add_argument("--no-upstream", dest="upstream", action="store_false")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--max-gib", type=float, default=30.0, help="skip rows needing more memory")
    p.add_argument("--copy-mib", type=float, default=1024.0, help="buffer of the copy test")
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (interpret mode)")
    p.add_argument("--json", metavar="PATH", help="write one JSON object per row (JSON lines)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.iters, args.copy_mib = [1, 2], [64, 200], 2, 64
        args.q_heads, args.kv_heads, args.head_dim = 4, 2, 32
        args.interpret = True
        if args.backend is None:
            args.backend = "triton"
    backend = dispatch.choose_backend(args.backend)[0]
    if backend == "reference":
        print("no kernel backend on this platform: pass --backend triton --interpret, or --quick")
        return 1
    kind_name = jax.devices()[0].device_kind
    copy_gbps = copy_bandwidth(args.copy_mib, args.iters)
    print(f"device: {kind_name}; jax {jax.__version__}; pallas backend: {backend}", end="")
    print(f"{' (interpret)' * args.interpret}; copy bandwidth {copy_gbps:.1f} GB/s")
    header = f"{'kind':8} {'batch':>5} {'context':>7} {'method':10} {'us':>10} {'MB':>9} "
    header += f"{'GB/s':>8} {'%copy':>6} {'err':>8}"
    print(header)
    rows = []
    for kind in args.kinds:
        for batch in args.batches:
            for context in args.contexts:
                for row in run_row(
                    batch,
                    context,
                    kind,
                    args,
                    backend=backend,
                    interpret=args.interpret,
                    iters=args.iters,
                    max_gib=args.max_gib,
                    copy_gbps=copy_gbps,
                ):
                    rows.append(row)
                    if "skipped" in row:
                        print(f"{kind:8} {batch:>5} {context:>7} skipped: {row['skipped']}")
                        continue
                    pct = "-" if row["pct_copy"] is None else f"{row['pct_copy']:.1f}"
                    print(
                        f"{kind:8} {batch:>5} {context:>7} {row['method']:10} "
                        f"{row['time_us']:>10.1f} {row['must_read_mb']:>9.2f} "
                        f"{row['gb_per_s']:>8.1f} {pct:>6} {row['max_rel_err_vs_pallas']:>8.1e}"
                    )
                    sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
