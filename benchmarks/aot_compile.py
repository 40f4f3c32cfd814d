"""Ahead-of-time compile of the attention kernels for accelerators this machine lacks.

One row per compiled kernel: platform, target, what ("kernel-decode" / "kernel-prefill"),
family (the case), dtype, head_dim, batch, context (tokens per row), ok (it compiled), the
pool's bytes, alias / temp bytes (XLA's; null where not applicable), registers and spill
bytes per thread, shared memory per block; Triton rows add tiles (rows x keys / warps /
stages) and fits (no spill, shared memory within the target's limit). One function per
platform makes its rows; today only ``cuda``: the Triton kernels' TTIR (from
``jax.export``) compiled by the ``triton`` package for sm_90 and sm_80, measured by its
``ptxas -v`` (no GPU needed, see ``pallas_kernels/gpu_compile.py``).

    python benchmarks/aot_compile.py --json docs/results/aot_compile.jsonl
    python benchmarks/aot_compile.py --families llama3-8b --targets sm_90   # one family
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax.numpy as jnp

from pallas_kernels import gpu_compile

# name -> (q_heads, kv_heads, head_dim)
FAMILIES = {
    "llama3.2-1b": (32, 8, 64),
    "phi-2": (32, 32, 80),
    "llama3-8b": (32, 8, 128),
    "gemma2-9b": (16, 8, 256),
}
DTYPES = ("bfloat16", "float32")
# what -> (batch, q_len, context): a decode step, a 512-token prefill chunk at 4K.
SHAPES = {"kernel-decode": (8, 1, 4096), "kernel-prefill": (2, 512, 4096)}
COLUMNS = [
    ("target", 6),
    ("what", 14),
    ("family", 11),
    ("dtype", 8),
    ("head_dim", 8),
    ("tiles", 14),
    ("registers", 9),
    ("spill_bytes", 11),
    ("shared_bytes", 12),
    ("ok", 5),
    ("fits", 5),
]


def cuda_rows(families, dtypes, targets, whats=tuple(SHAPES)):
    """Triton rows: each (family, dtype, what) exported once, compiled per target."""
    for family in families:
        q_heads, kv_heads, head_dim = FAMILIES[family]
        for dtype in dtypes:
            for what in whats:
                batch, q_len, context = SHAPES[what]
                case = gpu_compile.PagedCase(
                    batch, q_len, context, q_heads, kv_heads, head_dim, jnp.dtype(dtype)
                )
                [kernel] = gpu_compile.export_triton_kernels(*case.export_args())
                for target in targets:
                    row = dict(
                        platform="cuda",
                        target=target,
                        what=what,
                        family=family,
                        dtype=dtype,
                        head_dim=head_dim,
                        batch=batch,
                        context=context,
                        ok=False,
                        pool_bytes=case.pool_bytes,
                        alias_bytes=None,
                        temp_bytes=None,
                        registers=None,
                        spill_bytes=None,
                        shared_bytes=None,
                        fits=False,
                        tiles=tiles_label(case.tiles()),
                    )
                    try:
                        used = gpu_compile.compile_kernel(kernel, target)
                    except Exception as e:  # report and go on: one failing kernel is a row
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    else:
                        limit = gpu_compile.SHARED_LIMIT[target]
                        row.update(
                            ok=True,
                            registers=used.registers,
                            spill_bytes=used.spill_bytes,
                            shared_bytes=used.shared_bytes,
                            fits=used.spill_bytes == 0 and used.shared_bytes <= limit,
                        )
                    yield row


def tiles_label(t) -> str:
    """rows x keys / warps / stages, e.g. "64x32/w8/s2"."""
    return f"{t.block_rows}x{t.block_keys}/w{t.num_warps}/s{t.num_stages}"


def format_row(row) -> str:
    return " ".join(f"{str(row.get(k, '')):>{w}}" for k, w in COLUMNS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write one JSON line per compiled kernel here")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--targets", nargs="+", default=list(gpu_compile.TARGETS))
    p.add_argument("--what", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args(argv)
    start = time.time()
    print(" ".join(f"{k:>{w}}" for k, w in COLUMNS))
    out = open(args.json, "w") if args.json else None
    bad = 0
    for row in cuda_rows(args.families, args.dtypes, args.targets, args.what):
        print(format_row(row), row.get("error", ""), flush=True)
        bad += not row["fits"]
        if out:
            out.write(json.dumps(row) + "\n")
    if out:
        out.close()
    print(f"{bad} kernel(s) spill, exceed shared memory or fail; {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
