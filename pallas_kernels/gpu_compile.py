"""Compile the Triton kernels for NVIDIA GPUs on any machine and read what they use.

``jax.export(..., platforms=["cuda"])`` lowers a Pallas kernel to Triton IR (TTIR) with no
GPU present; each Triton custom call's ``backend_config`` carries that TTIR (as MLIR
bytecode) with its ``num_warps`` / ``num_stages``. The optional ``triton`` package compiles
it for a ``GPUTarget`` ("sm_90", "sm_80") down to a cubin; the log of the ``ptxas -v`` it
runs gives registers and spills; shared memory is Triton's dynamic shared memory from the
compiled kernel's metadata. Nothing here needs a GPU; ``triton`` is imported only by
:func:`compile_kernel` (tests skip without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import tempfile

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels import triton_paged

TRITON_CALL = "__gpu$xla.gpu.triton"  # jax 0.10.2's custom call for Pallas-on-Triton
TARGETS = {"sm_90": 90, "sm_80": 80}  # name -> compute capability
# Shared memory one block may use (opt-in maximum): H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One Triton custom call of an exported function."""

    name: str
    ttir: str  # Triton IR as MLIR text
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """What ptxas gave one compiled kernel, per thread (registers, spills) or per block."""

    target: str
    registers: int
    spill_bytes: int  # bytes stored to local memory by spills, per thread
    stack_bytes: int  # local stack frame per thread (spills included)
    shared_bytes: int  # dynamic shared memory per block


@dataclasses.dataclass(frozen=True)
class PagedCase:
    """Shapes of one Triton paged-attention call (kind full, one layer); q_len 1: decode."""

    batch: int
    q_len: int
    context: int  # keys per row (kv_len), all on pages of ``tpp`` tokens
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: jnp.dtype
    tpp: int = 16
    tuning: tuple = ()  # (name, value) pairs for the kernel: block_keys, num_warps, ...

    @property
    def view_shape(self):  # [P, L, tpp, 2 * Hkv, D]
        pages = self.batch * -(-self.context // self.tpp)
        return (pages, 1, self.tpp, 2 * self.kv_heads, self.head_dim)

    @property
    def pool_bytes(self) -> int:
        return math.prod(self.view_shape) * jnp.dtype(self.dtype).itemsize

    def export_args(self):
        """(fn, *ShapeDtypeStructs) for :func:`export_triton_kernels`."""
        b, n = self.batch, self.q_len
        args = [
            jax.ShapeDtypeStruct((b, n, self.q_heads, self.head_dim), self.dtype),
            jax.ShapeDtypeStruct(self.view_shape, self.dtype),
            jax.ShapeDtypeStruct((b, -(-self.context // self.tpp)), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
            jax.ShapeDtypeStruct((b, n), jnp.int32),
        ]
        kernel = (
            triton_paged.paged_decode_attention if n == 1 else triton_paged.paged_prefill_attention
        )

        def fn(q, view, block_tables, kv_lens, q_positions):
            opts = dict(layer=0, kind="full", scale=self.head_dim**-0.5, **dict(self.tuning))
            return kernel(q, view, block_tables, kv_lens, q_positions, **opts)

        return (fn, *args)

    def tiles(self) -> triton_paged.Tiles:
        """The tiles the kernel is compiled with (defaults, then ``tuning``)."""
        tuning = dict(self.tuning)
        tiles = triton_paged.default_tiles(
            self.q_len,
            self.q_heads // self.kv_heads,
            self.head_dim,
            self.dtype,
            block_rows=tuning.get("block_rows"),
            block_keys=tuning.get("block_keys"),
        )
        given = {k: tuning[k] for k in ("num_warps", "num_stages") if k in tuning}
        return dataclasses.replace(tiles, **given)


def export_triton_kernels(fn, *args) -> list[TritonKernel]:
    """Exports ``fn(*args)`` (arrays or ShapeDtypeStructs) for cuda -> its Triton kernels."""
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    return kernels_in_module(exported.mlir_module())


def kernels_in_module(text: str) -> list[TritonKernel]:
    """The Triton custom calls of a StableHLO module (text), in program order."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    found = []
    with mlir.make_ir_context():
        module = ir.Module.parse(text)
        for op in _walk(module.operation):
            if op.name != "stablehlo.custom_call":
                continue
            if ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_CALL:
                continue
            config = ir.DictAttr(op.attributes["mhlo.backend_config"])
            found.append(
                (
                    ir.StringAttr(config["name"]).value,
                    ir.StringAttr(config["ir"]).value_bytes,
                    ir.IntegerAttr(config["num_warps"]).value,
                    ir.IntegerAttr(config["num_stages"]).value,
                )
            )
    kernels = []
    for name, bytecode, num_warps, num_stages in found:
        with lowering._new_ir_context():  # a context with the Triton dialect
            ttir = ir.Module.parse(bytecode).operation.get_asm()
        kernels.append(TritonKernel(name, ttir, num_warps, num_stages))
    return kernels


def _walk(op):
    for region in op.regions:
        for block in region:
            for inner in block:
                yield inner
                yield from _walk(inner)


def compile_kernel(kernel: TritonKernel, target: str) -> KernelResources:
    """Compiles TTIR with the ``triton`` package (>= 3.4) for ``target``; reads its ptxas log.

    Triton runs ``ptxas -v`` itself (its own flags); the log it prints on request is read
    back, and the compile skips Triton's cache so that ptxas does run.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    options = dict(
        num_warps=kernel.num_warps,
        num_stages=kernel.num_stages,
        num_ctas=1,
        enable_fp_fusion=True,  # Triton's default so far
    )
    target_spec = GPUTarget("cuda", TARGETS[target], 32)
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(src, "w") as f:
            f.write(kernel.ttir)
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            compiled = triton.compile(src, target=target_spec, options=options)
    used = parse_ptxas_log(log.getvalue())
    return KernelResources(target=target, shared_bytes=int(compiled.metadata.shared), **used)


def parse_ptxas_log(log: str) -> dict[str, int]:
    """``ptxas -v`` output of one entry function -> registers, spill_bytes, stack_bytes."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    if regs is None or frame is None:
        raise ValueError(f"no resource usage in ptxas output:\n{log}")
    return dict(
        registers=int(regs.group(1)),
        spill_bytes=int(frame.group(2)),
        stack_bytes=int(frame.group(1)),
    )
