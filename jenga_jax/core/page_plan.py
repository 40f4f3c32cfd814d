"""Page plans: how a layout's kinds become allocator page sizes.

Three plans share one manager and allocator, so every comparison runs the same code:
  jenga    one page size per kind, large page = LCM, request-aware placement,
           balanced and aligned eviction;
  paged    PagedAttention as in vLLM v0: one page size (the largest kind's bytes per
           token over all attention layers), every layer keeps every token, encoder
           (image) tokens stored in all layers; states padded to whole pages;
  uniform  the vLLM v1 hybrid manager: layers of each kind split into groups of equal
           size (padding layers where counts do not divide), one byte size for all
           pages by scaling tokens per page (and padding state pages), per-kind
           freeing, one global LRU in release order.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from jenga_jax.core.errors import LayoutError
from jenga_jax.core.layer_kinds import AttentionType, LayerKind
from jenga_jax.core.layout import ModelLayout

ALLOCATORS = ("jenga", "paged", "uniform")
_MAX_HIT_GRANULARITY = 8  # jenga: lcm of tokens per page at most this many target pages
_SPLIT_PENALTY = 0.25  # jenga: estimated cost of one more kind, in pages of the plan
_MAX_KINDS = 8  # jenga: at most this many kinds after splitting layer groups
_ALIGN = 16  # tokens-per-page alignment the uniform plan keeps (attention kernels' block)
TPU_TILE_BYTES = 4096  # one TPU tile of the pool: 128 lanes x 8 rows x 4 B (16 x 2 B)


def tpu_alignment(layout: ModelLayout) -> dict:
    """make_plan options that keep every view of the pool a bitcast under TPU tiling
    (docs/device.md, "The pool on TPU"): a token page's rows (tokens per page x 2 x KV
    heads) a multiple of the tile's rows (8 for 4-byte, 16 for 2-byte, 32 for 1-byte
    dtypes), and every page whole tiles (state pages rounded up)."""
    multiple = 1
    for g in layout.groups:
        k = g.kind
        if k.is_token_kind:
            tile_rows = 8 * 4 // min(k.dtype_bytes, 4)
            multiple = math.lcm(multiple, tile_rows // math.gcd(tile_rows, 2 * k.num_kv_heads))
    return dict(tokens_per_page_multiple=multiple, page_bytes_multiple=TPU_TILE_BYTES)


@dataclasses.dataclass(frozen=True)
class PlannedKind:
    """One allocator kind: pages of one size holding one rule's K/V (or state)."""

    rule: LayerKind  # type, window, chunk, checkpoint interval of what the page holds
    num_layers: int  # layers stored per page, padding layers included
    tokens_per_page: int  # 0 for a state kind
    page_bytes: int
    layer_indices: tuple[int, ...]  # the real layers whose data the page holds
    pages_per_state: int = 1  # STATE: one state spans this many pages (layer sub-groups)

    @property
    def layers_per_page(self) -> int:
        return self.num_layers // self.pages_per_state

    @property
    def type(self) -> AttentionType:
        return self.rule.type

    @property
    def is_token_kind(self) -> bool:
        return self.rule.is_token_kind


@dataclasses.dataclass(frozen=True)
class PagePlan:
    allocator: str
    layout: ModelLayout
    kinds: tuple[PlannedKind, ...]
    large_page_bytes: int
    block_size: int  # hash granularity in tokens: divides every token kind's page
    images_inline: bool  # encoder tokens stored in the token stream (paged baseline)
    balanced_eviction: bool  # jenga: one access time per request and step, longer prefix first
    page_bytes_multiple: int = 1  # state pages rounded up to this (1: not aligned)

    def unaligned_kinds(self) -> list[str]:
        """Kinds whose pages are not whole multiples of `page_bytes_multiple` (token
        pages are never padded: on TPU their view is not a bitcast; the cause is a head
        dim that is not a multiple of 128)."""
        m = self.page_bytes_multiple
        return [k.rule.name for k in self.kinds if k.page_bytes % m]

    @property
    def hit_granularity(self) -> int:
        """A prefix hit length is a multiple of this (every kind's page, every checkpoint)."""
        g = 1
        for k in self.kinds:
            if k.is_token_kind:
                g = math.lcm(g, k.tokens_per_page)
            elif k.type is AttentionType.STATE and k.rule.checkpoint_interval:
                g = math.lcm(g, k.rule.checkpoint_interval)
        return g

    def describe(self) -> str:
        rows = [
            f"  {k.rule.name:<40} layers={k.num_layers:<3} tokens/page={k.tokens_per_page:<5} "
            f"page={k.page_bytes:>11,} B  x{self.large_page_bytes // k.page_bytes}"
            for k in self.kinds
        ]
        head = (
            f"{self.allocator} plan for {self.layout.name}: large page {self.large_page_bytes:,} B"
        )
        return "\n".join([head, *rows])


def make_plan(
    layout: ModelLayout,
    allocator: str = "jenga",
    tokens_per_page: int = 16,
    *,
    fixed_tokens_per_page: bool = False,
    tokens_per_page_multiple: int = 1,
    page_bytes_multiple: int = 1,
) -> PagePlan:
    """The page plan of one allocator for a layout.

    For jenga, `tokens_per_page` is a target: each kind's tokens per page (within
    [target / 2, 8 x target]) and the layers one state page holds are chosen to keep
    the LCM small (see `_jenga`), unless `fixed_tokens_per_page`. Every kind's tokens
    per page is then a multiple of `tokens_per_page_multiple` (TPU kernels want 8, or
    16 for bfloat16 pages), which must divide the target. `page_bytes_multiple`: state
    pages are rounded up to a multiple of it (the TPU tile, :func:`tpu_alignment`);
    a token page that is not a multiple of it is left as is (its view is then not a
    bitcast on TPU: head dims that are not a multiple of 128, see
    :meth:`PagePlan.unaligned_kinds`).
    """
    if allocator not in ALLOCATORS:
        raise LayoutError(f"unknown allocator {allocator!r}; choose one of {ALLOCATORS}")
    if not isinstance(tokens_per_page, int) or tokens_per_page <= 0:
        raise LayoutError(f"tokens_per_page must be a positive int, got {tokens_per_page!r}")
    m = tokens_per_page_multiple
    if not isinstance(m, int) or m <= 0 or tokens_per_page % m:
        raise LayoutError(
            f"tokens_per_page_multiple must be a positive int dividing tokens_per_page "
            f"({tokens_per_page}), got {m!r}"
        )
    a = page_bytes_multiple
    if not isinstance(a, int) or a <= 0:
        raise LayoutError(f"page_bytes_multiple must be a positive int, got {a!r}")
    if allocator == "jenga":
        plan = _jenga(layout, tokens_per_page, search=not fixed_tokens_per_page, multiple=m)
    else:
        plan = {"paged": _paged, "uniform": _uniform}[allocator](layout, tokens_per_page)
    return _align_state_pages(plan, a) if a > 1 else plan


def _align_state_pages(plan: PagePlan, multiple: int) -> PagePlan:
    """State pages rounded up to a multiple of `multiple` bytes; the large page again
    the LCM of the pages."""
    kinds = tuple(
        dataclasses.replace(k, page_bytes=-(-k.page_bytes // multiple) * multiple)
        if k.type is AttentionType.STATE
        else k
        for k in plan.kinds
    )
    large = math.lcm(*(k.page_bytes for k in kinds))
    return dataclasses.replace(
        plan, kinds=kinds, large_page_bytes=large, page_bytes_multiple=multiple
    )


def _page(rule: LayerKind, num_layers: int, tpp: int) -> int:
    if rule.type is AttentionType.STATE:
        return rule.state_bytes * num_layers
    return tpp * rule.bytes_per_token * num_layers


def _jenga(layout: ModelLayout, tpp: int, search: bool = True, multiple: int = 1) -> PagePlan:
    """One page size per kind, chosen to keep the LCM small.

    A large LCM leaves free small pages of one kind inside large pages that another
    kind cannot use (fragmentation); large pages cost rounding in each request's last
    page. Two families of plans are searched, and the one losing the fewest bytes per
    request (estimated) is kept:
      LCM plans     every kind keeps its layers together; tokens per page t_k per kind
                    and layers per state page (a state then spans several pages,
                    allocated together) are chosen;
      equal pages   a kind's layers may be split into groups (separate kinds with the
                    same rule) so that every page has one size: no fragmentation at all.
    Estimated loss per request: rounding t_k / 2 tokens of each kind (t_k for a
    sliding window: both ends), and (ratio_k - 1) / 2 pages of fragmentation per kind;
    a split costs a quarter page per extra kind (host bookkeeping grows with kinds).
    The prefix-hit granularity (lcm of the t_k) stays at most 8 target pages.
    """
    groups = layout.groups
    tokens = [g for g in groups if g.kind.type is not AttentionType.STATE]
    states = [g for g in groups if g.kind.type is AttentionType.STATE]
    most = _largest_page_tokens(states, tpp)
    candidates = [_best_lcm_parts(tokens, states, tpp, search, most, multiple)]
    if search:
        candidates += list(_equal_page_parts(tokens, states, tpp, most, multiple))
    parts, _ = min(candidates, key=lambda c: (c[1], len(c[0])))
    order = {g.kind: i for i, g in enumerate(groups)}
    kinds = []
    for kind, layers, t, per_state in sorted(parts, key=lambda p: (order[p[0]], p[1])):
        if kind.type is AttentionType.STATE:
            page = kind.state_bytes * len(layers) // per_state
            kinds.append(PlannedKind(kind, len(layers), 0, page, layers, pages_per_state=per_state))
        else:
            kinds.append(
                PlannedKind(kind, len(layers), t, t * kind.bytes_per_token * len(layers), layers)
            )
    return _finish("jenga", layout, tuple(kinds), tpp, images_inline=False, balanced=True)


def _rounding(kind: LayerKind, t: int, layers: int) -> float:
    ends = 2 if kind.type is AttentionType.SLIDING else 1
    return ends * t / 2 * kind.bytes_per_token * layers


def _largest_page_tokens(states, tpp: int) -> int:
    """Bound on tokens per page and on their lcm (the granularity of prefix hits).

    8 target pages; with a state kind, hits already come only at its checkpoints, so
    pages up to the checkpoint interval cost no hits (and any size if it has none).
    """
    most = _MAX_HIT_GRANULARITY * tpp
    for g in states:
        interval = g.kind.checkpoint_interval
        most = max(most, interval) if interval else 1 << 30
    return most


def _best_lcm_parts(tokens, states, tpp: int, search: bool, most: int, multiple: int = 1):
    """The cheapest plan keeping each kind's layers together: (parts, estimated loss)."""
    tpp_options = [[tpp] for _ in tokens]
    if search and len(tokens) <= 3:
        lo = _smallest_tpp(tokens, tpp, multiple)
        hi = min(most, 8 * tpp)
        tpp_options = [[t for t in range(lo, hi + 1) if t % multiple == 0] for _ in tokens]
    state_options = [_divisors(g.num_layers) if search else [g.num_layers] for g in states]
    best, best_cost = None, None
    for state_layers in itertools.product(*state_options):
        state_pages = [g.kind.state_bytes * d for g, d in zip(states, state_layers)]
        base = math.lcm(*state_pages) if state_pages else 1
        for tpps in itertools.product(*tpp_options):
            if math.lcm(*tpps) > most:
                continue  # prefix hits would come only every lcm(tokens per page) tokens
            pages = [t * g.bytes_per_token for t, g in zip(tpps, tokens)]
            large = math.lcm(base, *pages)
            cost = 0.0
            for t, g, page in zip(tpps, tokens, pages):
                cost += _rounding(g.kind, t, g.num_layers) + (large // page - 1) / 2 * page
            for g, d, page in zip(states, state_layers, state_pages):
                per_state, ratio = g.num_layers // d, large // page
                if per_state % ratio:
                    cost += (ratio - per_state % ratio) / 2 * page
            cost += sum(abs(math.log2(t / tpp)) for t in tpps) * 1e-3  # ties: near the target
            if best_cost is None or cost < best_cost:
                best, best_cost = (tpps, state_layers), cost
    tpps, state_layers = best
    parts = [(g.kind, g.layer_indices, t, 1) for g, t in zip(tokens, tpps)]
    parts += [(g.kind, g.layer_indices, 0, g.num_layers // d) for g, d in zip(states, state_layers)]
    return parts, best_cost


def _equal_page_parts(tokens, states, tpp: int, most: int, multiple: int = 1):
    """Plans whose pages all have one size, splitting kinds into layer groups."""
    units = {g.num_layers * tpp * g.kind.bytes_per_token for g in tokens}
    units |= {d * g.kind.state_bytes for g in states for d in _divisors(g.num_layers)}
    for unit in sorted(units):
        parts, cost, tpps = [], 0.0, []
        for g in tokens:
            bpt, lo = g.kind.bytes_per_token, _smallest_tpp(tokens, tpp, multiple)
            sizes = [
                n
                for n in range(1, g.num_layers + 1)
                if unit % (n * bpt) == 0
                and lo <= unit // (n * bpt) <= min(most, 32 * tpp)
                and unit // (n * bpt) % multiple == 0
            ]
            split = _fewest_parts(g.num_layers, sizes)
            if split is None:
                break
            start = 0
            for n in split:
                t = unit // (n * bpt)
                parts.append((g.kind, g.layer_indices[start : start + n], t, 1))
                cost += _rounding(g.kind, t, n) + abs(math.log2(t / tpp)) * 1e-3
                tpps.append(t)
                start += n
        else:
            for g in states:
                d, rem = divmod(unit, g.kind.state_bytes)
                if rem or g.num_layers % d:
                    break
                parts.append((g.kind, g.layer_indices, 0, g.num_layers // d))
            else:
                if len(parts) <= _MAX_KINDS and (not tpps or math.lcm(*tpps) <= most):
                    extra = len(parts) - len(tokens) - len(states)  # bookkeeping per step
                    yield parts, cost + extra * _SPLIT_PENALTY * unit


def _fewest_parts(total: int, sizes: list[int]) -> list[int] | None:
    """Fewest numbers from `sizes` (with repetition) summing to `total`, largest first."""
    best: list[list[int] | None] = [[]] + [None] * total
    for n in range(1, total + 1):
        for size in sizes:
            prev = best[n - size] if size <= n else None
            if prev is not None and (best[n] is None or len(prev) + 1 < len(best[n])):
                best[n] = prev + [size]
    return sorted(best[total], reverse=True) if best[total] is not None else None


def _smallest_tpp(groups, tpp: int, multiple: int = 1) -> int:
    """Pages are at least the target size; half pages where a window spans <= 16 pages.

    Small windows lose much to rounding at both ends; the other kinds of such a model
    may use half pages too, so that all pages can keep one size.
    """
    small = any(g.kind.type is AttentionType.SLIDING and g.kind.window <= 16 * tpp for g in groups)
    return max(multiple, tpp // 2) if small else tpp


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _paged(layout: ModelLayout, tpp: int) -> PagePlan:
    attn = [g for g in layout.groups if g.kind.type is not AttentionType.STATE]
    states = [g for g in layout.groups if g.kind.type is AttentionType.STATE]
    kinds = []
    page = 0
    if attn:
        widest = max((g.kind for g in attn), key=lambda k: k.bytes_per_token)
        rule = LayerKind(AttentionType.FULL, widest.num_kv_heads, widest.head_dim, widest.dtype)
        layers = tuple(sorted(i for g in attn for i in g.layer_indices))
        page = _page(rule, len(layers), tpp)
        kinds.append(PlannedKind(rule, len(layers), tpp, page, layers))
    if states:
        total = sum(g.state_bytes for g in states)
        padded = total if not page else -(-total // page) * page
        rule = LayerKind(AttentionType.STATE, state_bytes=padded)
        layers = tuple(sorted(i for g in states for i in g.layer_indices))
        kinds.append(PlannedKind(rule, 1, 0, padded, layers))
    has_cross = layout.has(AttentionType.CROSS)
    return _finish("paged", layout, tuple(kinds), tpp, images_inline=has_cross, balanced=True)


def _uniform(layout: ModelLayout, tpp: int) -> PagePlan:
    groups = layout.groups
    counts = [g.num_layers for g in groups]
    size = min(counts)
    if max(counts) < size * 1.25:
        size = max(counts)
    # Natural page of every kind at the base tokens per page, `size` layers per group.
    natural = [_page(g.kind, size, tpp) for g in groups]
    target = max(natural)
    kind_tpp, kind_bytes = [], []
    for g in groups:
        if g.kind.type is AttentionType.STATE:
            kind_tpp.append(0)
            kind_bytes.append(g.kind.state_bytes * size)
        else:
            per_token = g.kind.bytes_per_token * size
            t = _ALIGN * -(-target // (_ALIGN * per_token)) if per_token * tpp < target else tpp
            kind_tpp.append(t)
            kind_bytes.append(t * per_token)
    unified = max(kind_bytes)
    kinds = []
    for g, t in zip(groups, kind_tpp):
        rule = g.kind
        for start in range(0, g.num_layers, size):
            layers = g.layer_indices[start : start + size]
            kinds.append(PlannedKind(rule, size, t, unified, layers))
    return _finish("uniform", layout, tuple(kinds), tpp, images_inline=False, balanced=False)


def _finish(name, layout, kinds, tpp, *, images_inline, balanced) -> PagePlan:
    """Large page = LCM of the pages; state checkpoints rounded up to whole pages."""
    token_tpps = [k.tokens_per_page for k in kinds if k.is_token_kind]
    pages_lcm = math.lcm(*token_tpps) if token_tpps else 1
    kinds = tuple(
        dataclasses.replace(
            k,
            rule=dataclasses.replace(
                k.rule, checkpoint_interval=-(-k.rule.checkpoint_interval // pages_lcm) * pages_lcm
            ),
        )
        if k.type is AttentionType.STATE and k.rule.checkpoint_interval
        else k
        for k in kinds
    )
    large = 1
    for k in kinds:
        large = math.lcm(large, k.page_bytes)
    block = math.gcd(*token_tpps) if token_tpps else tpp
    return PagePlan(name, layout, kinds, large, block, images_inline, balanced)
