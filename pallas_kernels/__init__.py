"""Pallas paged-attention kernels over Jenga's shared KV pool.

- :func:`paged_attention` (:mod:`pallas_kernels.dispatch`): the reference's signature,
  backend chosen by platform (cpu: pure JAX, gpu: Triton, tpu: Mosaic).
- :mod:`pallas_kernels.triton_paged`: GPU kernel (decode with split-K, ragged prefill).
- :mod:`pallas_kernels.mosaic_paged`: TPU kernel (per-request SMEM block tables,
  double-buffered DMAs of whole token-major pages, every KV head per program).
- :mod:`pallas_kernels.rows`: the query-row layout and the merge of partials.

See docs/kernels.md.
"""

from pallas_kernels.dispatch import BACKENDS, choose_backend, paged_attention, parse_backend

__all__ = ["BACKENDS", "choose_backend", "paged_attention", "parse_backend"]
