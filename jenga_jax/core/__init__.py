"""Host core: layer kinds, layouts, the LCM allocator, prefix caching, the KV cache manager.

Plain Python and numpy; nothing here imports JAX.
"""

from jenga_jax.core.cache_stats import CacheStats
from jenga_jax.core.errors import (
    JengaError,
    LayoutError,
    RequestError,
    RequestTooLargeError,
    UnknownModelError,
)
from jenga_jax.core.kv_cache_manager import AllocationResult, KVCacheManager
from jenga_jax.core.layer_kinds import AttentionType, LayerKind
from jenga_jax.core.layout import KindGroup, ModelLayout
from jenga_jax.core.page_plan import ALLOCATORS, PagePlan, make_plan
from jenga_jax.core.registry import get_config, get_layout, model_names
from jenga_jax.core.request import ImageInput, TraceRequest

__all__ = [
    "ALLOCATORS",
    "AllocationResult",
    "AttentionType",
    "CacheStats",
    "ImageInput",
    "JengaError",
    "KVCacheManager",
    "KindGroup",
    "LayerKind",
    "LayoutError",
    "ModelLayout",
    "PagePlan",
    "RequestError",
    "RequestTooLargeError",
    "TraceRequest",
    "UnknownModelError",
    "get_config",
    "get_layout",
    "make_plan",
    "model_names",
]
