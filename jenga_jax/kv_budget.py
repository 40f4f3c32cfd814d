"""How many bytes the KV pool gets when it is given as a fraction of free memory.

Free memory is the device's (``memory_stats``: limit less in use, after the weights are
placed); on a CPU, the host's available memory. The pool never takes more than
``CACHE_HEADROOM`` times what ``max_num_seqs`` requests of ``max_model_len`` tokens hold
at once: past that, memory would only keep more prefixes cached.
"""

from __future__ import annotations

import math
import os

CACHE_HEADROOM = 2


def free_memory_bytes(device=None) -> int:
    """Free memory of `device` (None: JAX's first device), host memory on a CPU."""
    import jax

    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_available_bytes()


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def request_bytes(plan, max_model_len: int, max_encoder_tokens: int = 0) -> int:
    """An upper bound of what one request of max_model_len tokens holds under `plan`
    (every token kind's pages for the whole stream, two states per state kind)."""
    total = 0
    for k in plan.kinds:
        if k.is_token_kind:
            tokens = max_encoder_tokens if k.type.name == "CROSS" else max_model_len
            total += math.ceil(tokens / k.tokens_per_page) * k.page_bytes
        else:
            total += 2 * k.pages_per_state * k.page_bytes
    return total


def kv_budget_bytes(
    cfg,
    *,
    fraction: float,
    max_num_seqs: int,
    max_model_len: int,
    max_encoder_tokens: int = 0,
    allocator: str = "jenga",
    checkpoint_interval: int | None = None,
    free_bytes: int | None = None,
) -> int:
    """fraction (0, 1] of free memory, capped (see the module); at least one large page."""
    from jenga_jax.core.page_plan import make_plan

    if not 0 < fraction <= 1:
        raise ValueError(f"the KV memory fraction must be in (0, 1], got {fraction}")
    plan = make_plan(cfg.layout(cfg.dtype, checkpoint_interval), allocator, 16)
    free = free_memory_bytes() if free_bytes is None else free_bytes
    cap = CACHE_HEADROOM * max_num_seqs * request_bytes(plan, max_model_len, max_encoder_tokens)
    budget = min(int(free * fraction), cap)
    return max(budget, plan.large_page_bytes)
