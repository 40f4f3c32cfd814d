"""Device side: what runs under JAX (KV pool views, reference attention, later kernels)."""
