"""Ahead-of-time compile of the attention kernels and steps for accelerators this machine lacks.

One row per compiled kernel or step: platform, target, what ("kernel-decode" /
"kernel-prefill", or "prefill" / "decode" for a whole step), family (the case), dtype,
head_dim, batch, context (tokens per row), ok (it compiled), the pool's bytes, alias /
temp bytes (XLA's; null where not applicable), registers and spill bytes per thread,
shared memory per block (Triton; null on TPU); Triton rows add tiles (rows x keys /
warps / stages) and fits (no spill, shared memory within the target's limit). One
function per platform makes its rows:

- ``cuda``: the Triton kernels' TTIR (from ``jax.export``) compiled by the ``triton``
  package for sm_90 and sm_80, measured by its ``ptxas -v`` (no GPU needed, see
  ``pallas_kernels/gpu_compile.py``).
- ``tpu``: the Mosaic kernel and whole bf16 steps compiled by libtpu for compile-only
  TPU devices (v5e by default; see ``pallas_kernels/tpu_compile.py``); a step row's
  alias and temp bytes say whether the pool is updated in place.

    python benchmarks/aot_compile.py --json docs/results/aot_compile.jsonl
    python benchmarks/aot_compile.py --families llama3-8b --targets sm_90   # one family
    python benchmarks/aot_compile.py --platform tpu --json docs/results/aot_compile_tpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax.numpy as jnp

from pallas_kernels import gpu_compile, tpu_compile

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


# TPU: what -> (batch, q_len, context) of the kernel rows; 128K tokens per row.
TPU_KERNEL_SHAPES = {
    "kernel-decode": [(64, 1, 131072), (256, 1, 131072)],
    "kernel-prefill": [(64, 256, 131072)],
}
TPU_STEP_FAMILIES = ("gemma3", "llama-vision", "jamba")  # sliding + full; cross; Mamba
TPU_POOL_BYTES = 256 * 2**20
TPU_COLUMNS = [
    ("target", 6),
    ("what", 14),
    ("family", 12),
    ("dtype", 8),
    ("head_dim", 8),
    ("batch", 5),
    ("context", 7),
    ("ok", 5),
    ("pool_MiB", 8),
    ("alias_MiB", 9),
    ("temp_MiB", 8),
    ("temp/pool", 9),
]


def _tpu_row(target, what, family, dtype, head_dim, batch, context, pool_bytes, got):
    return dict(
        platform="tpu",
        target=target,
        what=what,
        family=family,
        dtype=dtype,
        head_dim=head_dim,
        batch=batch,
        context=context,
        ok=got.ok,
        pool_bytes=pool_bytes,
        alias_bytes=got.alias_bytes,
        temp_bytes=got.temp_bytes,
        registers=None,
        spill_bytes=None,
        shared_bytes=None,
        **({"error": got.error} if got.error else {}),
    )


def tpu_kernel_rows(families, dtypes, targets, whats):
    """The Mosaic kernel alone (kind full, 16 tokens per page), each row compiled."""
    for target in targets:
        for family in families:
            q_heads, kv_heads, head_dim = FAMILIES[family]
            for dtype in dtypes:
                for what in whats:
                    for batch, q_len, context in TPU_KERNEL_SHAPES.get(what, []):
                        case = tpu_compile.KernelCase(
                            batch, q_len, context, q_heads, kv_heads, head_dim, dtype,
                            tpp=16 if jnp.dtype(dtype).itemsize == 2 else 8,
                        )  # fmt: skip
                        got = case.compile(target)
                        yield _tpu_row(
                            target, what, family, dtype, head_dim, batch, context,
                            case.pool_bytes, got,
                        )  # fmt: skip


def tpu_step_rows(families, targets, whats):
    """Whole bf16 prefill / decode steps (jenga_jax.engine.aot: d_model 1024, 32 / 8
    heads of 128, a 256 MiB pool, the Mosaic kernel)."""
    from jenga_jax.engine import aot

    for target in targets:
        for family in families:
            for what in whats:
                case = aot.step_case(
                    family, what, tpu_compile.device(target), pool_bytes=TPU_POOL_BYTES
                )
                got = tpu_compile.compile_stats(case.fn, *case.args)
                yield _tpu_row(
                    target, what, family, "bfloat16", aot.WIDTH["head_dim"], case.batch,
                    case.context, case.pool_bytes, got,
                )  # fmt: skip


def format_tpu_row(row) -> str:
    mib = {
        k + "_MiB": "" if row[k + "_bytes"] is None else f"{row[k + '_bytes'] / 2**20:.1f}"
        for k in ("pool", "alias", "temp")
    }
    ratio = "" if row["temp_bytes"] is None else f"{row['temp_bytes'] / row['pool_bytes']:.4f}"
    cells = {**row, **mib, "temp/pool": ratio}
    return " ".join(f"{str(cells.get(k, '')):>{w}}" for k, w in TPU_COLUMNS)


def tiles_label(t) -> str:
    """rows x keys / warps / stages, e.g. "64x32/w8/s2"."""
    return f"{t.block_rows}x{t.block_keys}/w{t.num_warps}/s{t.num_stages}"


def format_row(row) -> str:
    return " ".join(f"{str(row.get(k, '')):>{w}}" for k, w in COLUMNS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write one JSON line per compiled kernel here")
    p.add_argument("--platform", default="cuda", choices=["cuda", "tpu"])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES) + list(TPU_STEP_FAMILIES))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), help="default: all (tpu: bf16)")
    p.add_argument("--targets", nargs="+", help="default: sm_90 sm_80 (tpu: v5e)")
    whats = list(SHAPES) + ["prefill", "decode"]
    p.add_argument("--what", nargs="+", default=whats, choices=whats)
    args = p.parse_args(argv)
    start = time.time()
    out = open(args.json, "w") if args.json else None
    if args.platform == "tpu":
        rows, fmt, columns = _tpu_rows(args), format_tpu_row, TPU_COLUMNS
    else:
        families = args.families or list(FAMILIES)
        targets = args.targets or list(gpu_compile.TARGETS)
        rows = cuda_rows(
            families, args.dtypes or DTYPES, targets, [w for w in args.what if w in SHAPES]
        )
        fmt, columns = format_row, COLUMNS
    print(" ".join(f"{k:>{w}}" for k, w in columns))
    bad = 0
    for row in rows:
        print(fmt(row), row.get("error", ""), flush=True)
        bad += not row.get("fits", row["ok"])
        if out:
            out.write(json.dumps(row) + "\n")
    if out:
        out.close()
    what = "fail" if args.platform == "tpu" else "spill, exceed shared memory or fail"
    print(f"{bad} row(s) {what}; {time.time() - start:.0f} s")
    return 0


def _tpu_rows(args):
    """Kernel rows (FAMILIES' heads) then step rows (TPU_STEP_FAMILIES), as asked."""
    targets = args.targets or ["v5e"]
    kernels = [f for f in args.families or ["llama3-8b"] if f in FAMILIES]
    steps = [f for f in args.families or TPU_STEP_FAMILIES if f in TPU_STEP_FAMILIES]
    kernel_whats = [w for w in args.what if w in TPU_KERNEL_SHAPES]
    yield from tpu_kernel_rows(kernels, args.dtypes or ["bfloat16"], targets, kernel_whats)
    step_whats = [w for w in args.what if w in ("prefill", "decode")]
    yield from tpu_step_rows(steps, targets, step_whats)


if __name__ == "__main__":
    sys.exit(main())
