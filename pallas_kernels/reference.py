"""The pure-JAX backend: :func:`jenga_jax.device.reference_attention.paged_attention`.

``page_fill`` int [batch, max_pages] (cross only) says how many tokens each page of a
request holds: with several images per request, each image starts on a fresh page, so a
page may be partly filled in the middle of the sequence. The key in slot ``j`` (page
``j // tpp``, offset ``j % tpp``) exists iff ``j < kv_len`` and ``j % tpp <
page_fill[b, j // tpp]``.
"""

from jenga_jax.device.reference_attention import paged_attention

__all__ = ["paged_attention"]
