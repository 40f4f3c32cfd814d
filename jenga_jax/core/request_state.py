"""What the KV cache manager keeps per request (mutable, host side)."""

from __future__ import annotations

from jenga_jax.core.block_hash import BlockHasher
from jenga_jax.core.request import ImageInput


class RequestState:
    """One request as the manager tracks it: tokens, hashes and pages of every kind."""

    __slots__ = (
        "rid", "tokens", "images", "encoder_images", "hasher", "offset", "num_computed",
        "num_allocated", "running", "pages", "first", "registered", "owned", "cur",
        "frozen", "cross_pages", "unwritten", "fresh", "released", "last_ts", "covered",
        "state_due", "next_dead", "next_full",
    )  # fmt: skip

    def __init__(self, rid, tokens, images, encoder_images, hasher, offset, num_kinds):
        self.rid = rid
        self.tokens: list[int] = tokens  # the token stream (prompt, generated tokens)
        self.images: tuple[ImageInput, ...] = images
        self.encoder_images: tuple[ImageInput, ...] = encoder_images  # in cross pages
        self.hasher: BlockHasher = hasher
        self.offset = offset  # encoder tokens stored ahead of the prompt (paged baseline)
        self.num_computed = 0  # stream positions whose K/V exists
        self.num_allocated = 0  # end of the last allocation
        self.running = False
        self.reset(num_kinds)

    def reset(self, num_kinds):
        self.pages: list[list] = [[] for _ in range(num_kinds)]  # per kind, page index -> id
        self.first = [0] * num_kinds  # first page index still held
        self.registered = [0] * num_kinds  # pages below this index went through the cache
        self.owned: list[list[int]] = [[] for _ in range(num_kinds)]
        self.cur: list = [None] * num_kinds  # state kinds: page with the latest state
        self.frozen = [False] * num_kinds  # cur is a checkpoint: write the next state elsewhere
        self.cross_pages: list[list[int]] = [[] for _ in range(num_kinds)]
        self.unwritten: set[tuple[int, int]] = set()  # (kind, page) the next step must fill
        self.fresh: list[tuple[int, int]] = []  # (kind, page) cached by the last allocation
        self.released: list[tuple[int, int, int]] = []  # (kind, page, prefix) out of window
        self.last_ts = 0  # clock of the last step (balanced eviction)
        # Watermarks that let a decode step skip the per-kind loops when nothing is due:
        self.covered = 0  # tokens every token kind's pages cover
        self.state_due = True  # some state kind needs new pages for its next write
        self.next_dead = 0  # tokens computed at which some kind's oldest page dies
        self.next_full = 0  # tokens allocated at which some kind's next page is full
