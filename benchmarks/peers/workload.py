"""The checkpoint and the seeded trace that every system of serving_peers.py serves.

The checkpoint is a tiny float32 Llama made with transformers (random weights, a
word-level tokenizer of "<id>" tokens so that peers that want one find one); nothing is
downloaded. The trace is plain JSON (token ids and lengths), so that every driver reads
the same requests whatever its venv.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The Llama checkpoint's architecture. Heads of 128 (2 query heads sharing 1 KV
    head): EasyDeL 0.3.0's XLA ragged-page attention fails on head_dim 64 ("cannot
    reshape array of shape (128, 2, 128) into shape (128, 2, 2, 128)"), whose KV cache
    it packs differently."""

    layers: int = 4
    hidden: int = 256
    heads: int = 2
    kv_heads: int = 1
    intermediate: int = 1024
    vocab_size: int = 4096
    max_position: int = 512
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kv_bytes_per_token(self, itemsize: int = 4) -> int:
        """Key and value bytes one token takes in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


@dataclasses.dataclass(frozen=True)
class TraceShape:
    """The trace: every request arrives at once, decodes greedily and never stops early.

    Prompts are prompt_min..prompt_max random token ids (uniform, inclusive); every
    request generates output_len tokens. The batch-1 run is one request of
    batch1_prompt tokens generating batch1_output tokens."""

    num_requests: int = 128
    prompt_min: int = 100
    prompt_max: int = 400
    output_len: int = 64
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 512
    batch1_prompt: int = 128
    batch1_output: int = 64
    seed: int = 0

    def check(self, model: ModelShape) -> None:
        """Raise ValueError if the trace cannot run on `model` as configured."""
        if not 1 <= self.prompt_min <= self.prompt_max:
            raise ValueError(
                f"need 1 <= prompt_min <= prompt_max, got {self.prompt_min}, {self.prompt_max}"
            )
        for name in ("num_requests", "output_len", "max_num_seqs", "batch1_output"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        longest = max(self.prompt_max + self.output_len, self.batch1_prompt + self.batch1_output)
        if longest > self.max_model_len:
            raise ValueError(
                f"the longest request ({longest} tokens) exceeds max_model_len {self.max_model_len}"
            )
        if self.max_model_len > model.max_position:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position {model.max_position}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs")


def make_trace(shape: TraceShape, vocab_size: int) -> dict:
    """The trace as JSON data: settings, requests [{prompt, max_tokens}] and the batch-1
    request; the same for the same shape (seeded)."""
    rng = random.Random(shape.seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab_size) for _ in range(n)]

    requests = [
        {
            "prompt": prompt(rng.randint(shape.prompt_min, shape.prompt_max)),
            "max_tokens": shape.output_len,
        }
        for _ in range(shape.num_requests)
    ]
    return {
        "settings": {
            "max_num_seqs": shape.max_num_seqs,
            "max_num_batched_tokens": shape.max_num_batched_tokens,
            "max_model_len": shape.max_model_len,
        },
        "requests": requests,
        "batch1": {"prompt": prompt(shape.batch1_prompt), "max_tokens": shape.batch1_output},
    }


def write_trace(trace: dict, path: pathlib.Path) -> None:
    path.write_text(json.dumps(trace))


def make_checkpoint(path: pathlib.Path, model: ModelShape) -> pathlib.Path:
    """Save a random float32 LlamaForCausalLM and its tokenizer to `path` (made if
    missing); returns `path`. Needs torch, transformers and tokenizers."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden,
        intermediate_size=model.intermediate,
        num_hidden_layers=model.layers,
        num_attention_heads=model.heads,
        num_key_value_heads=model.kv_heads,
        max_position_embeddings=model.max_position,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(model.seed)
    hf = LlamaForCausalLM(config).to(torch.float32).eval()
    hf.save_pretrained(path, safe_serialization=True)
    vocab = {f"<{i}>": i for i in range(model.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<3>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<0>", eos_token="<1>", pad_token="<2>", unk_token="<3>"
    ).save_pretrained(path)
    return path


def transformers_greedy(checkpoint, prompts, max_tokens) -> list[list[int]]:
    """Greedy tokens of transformers' own forward for each prompt (the reference the
    engines are checked against): float32, the whole sequence every step (no cache
    API, which changes between transformers versions), argmax of the last logits."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for prompt, n in zip(prompts, max_tokens):
            ids = list(prompt)
            for _ in range(n):
                logits = model(input_ids=torch.tensor([ids])).logits  # [1, len, vocab]
                ids.append(int(logits[0, -1].argmax()))
            outs.append(ids[len(prompt) :])
    return outs
