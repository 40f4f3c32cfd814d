"""Greedy generation with a tiny hybrid model through the KV cache manager and the
jitted paged steps over one shared pool.

python examples/generate.py                    # tiny Ministral-like (1 full : 3 sliding)
python examples/generate.py --family jamba --new-tokens 32   # Mamba + attention

The model has random weights (nothing is downloaded), so the tokens are arbitrary ids;
what the demo shows is the machinery: chunked prefill, a second request that reuses
the first one's pages through the prefix cache, windows releasing pages, the pool's
use per kind, and the paged logits checked against a dense no-cache forward pass.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from flax import nnx

from jenga_jax.engine.model_runner import Image, ModelRunner, Work
from models import FAMILIES, HybridDecoder, tiny_config
from models.random_init import perturb


def _prefill(runner, rid, chunk):
    """Prefill a waiting request in chunks; returns (its prefix-cache hit, the logits of
    its last prompt token). The first chunk starts after the hit."""
    known, hit, done, logits = runner.manager.num_tokens(rid), None, None, None
    while done is None or done < known:
        n = chunk if done is None else min(chunk, known - done)  # the first: after the hit
        rows, out, refused = runner.step([Work(rid, n)])
        if refused:
            raise RuntimeError(f"the pool cannot hold {rid}: {refused[0][1]}")
        hit = rows[0].start if hit is None else hit
        done = rows[0].start + rows[0].num_tokens
        logits = out[0]
    return hit, logits


def _usage(runner) -> str:
    stats = runner.manager.stats()
    kinds = ", ".join(
        f"{k.type.value}: {n} pages" for k, n in zip(runner.layout.kinds, stats.pages_per_kind)
    )
    return (
        f"pool {stats.pool_bytes / 1024:.0f} KiB, held {stats.held_bytes / 1024:.0f} KiB "
        f"({kinds}), cached-only {stats.cached_only_bytes / 1024:.0f} KiB"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="ministral", choices=sorted(FAMILIES))
    p.add_argument("--prompt-len", type=int, default=80)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--chunk", type=int, default=32, help="prefill chunk (tokens)")
    p.add_argument("--num-large-pages", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    cfg = tiny_config(args.family)
    model = perturb(HybridDecoder(cfg, rngs=nnx.Rngs(args.seed)), seed=args.seed + 1)
    runner = ModelRunner(
        model,
        num_large_pages=args.num_large_pages,
        checkpoint_interval=args.chunk if cfg.mamba else None,
    )
    print(f"{cfg.name}: layers {[t.value for t in cfg.layer_types]}")
    print(runner.plan.describe())
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
    # Two requests: b shares a's prompt but its last 8 tokens, so it hits a's pages.
    prompts = {"a": prompt, "b": prompt[:-8] + rng.integers(0, cfg.vocab_size, 8).tolist()}
    images = {}
    if cfg.vision_dim:
        embeds = rng.normal(size=(24, cfg.vision_dim)).astype(np.float32)
        images = {rid: [Image("demo-image", embeds)] for rid in prompts}
    paged_logits = {}
    start = time.perf_counter()
    for rid, toks in prompts.items():
        runner.add_request(rid, toks, images=images.get(rid, []), max_new_tokens=args.new_tokens)
        hit, logits = _prefill(runner, rid, args.chunk)
        print(f"\n{rid}: prompt {len(toks)} tokens, prefix-cache hit {hit} tokens")
        paged_logits[rid] = [logits]
    generated = {rid: [int(np.argmax(paged_logits[rid][0]))] for rid in prompts}
    for _ in range(args.new_tokens - 1):  # both requests decode in one batch
        work = [Work(rid, 1, (generated[rid][-1],)) for rid in prompts]
        rows, logits, refused = runner.step(work, decode=True)
        if refused:
            raise RuntimeError(f"out of pages: {refused}")
        for row, lg in zip(rows, logits):
            paged_logits[row.request_id].append(lg)
            generated[row.request_id].append(int(np.argmax(lg)))
    elapsed = time.perf_counter() - start
    print(f"\n{len(prompts)} x {args.new_tokens} tokens in {elapsed:.1f} s (compiles included)")
    print(_usage(runner))
    for rid, toks in prompts.items():
        print(f"{rid} generated: {generated[rid]}")
        seq = toks + generated[rid][:-1]
        kw = {}
        if images:
            kw = dict(image_embeds=np.concatenate([im.embeds for im in images[rid]])[None])
        dense = np.asarray(model.forward_dense(np.asarray([seq]), **kw))[0, len(toks) - 1 :]
        got = np.stack(paged_logits[rid])
        err = np.max(np.abs(got - dense)) / np.max(np.abs(dense))
        same = [int(t) for t in np.argmax(dense, axis=-1)] == generated[rid]
        print(f"  vs dense no-cache forward: max rel error {err:.1e}, same tokens: {same}")
        runner.free(rid)
    print(_usage(runner))


if __name__ == "__main__":
    main()
