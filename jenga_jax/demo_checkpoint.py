"""A tiny random checkpoint directory to try the server, the CLI and ``LLM`` with
(nothing is downloaded): a Llama-architecture config.json, orbax parameters (random,
perturbed), a byte-level BPE tokenizer.json trained on a few sentences, a chat template
in tokenizer_config.json and the end-of-sequence id in generation_config.json.

    jenga-jax demo-checkpoint /tmp/tiny-llama

Its replies are noise (random weights); everything around them is real.
"""

from __future__ import annotations

import json
import os
import pathlib

VOCAB_SIZE = 320
BOS, EOS = "<s>", "</s>"
SPECIAL_TOKENS = ("<pad>", BOS, EOS, "<unk>")
# A ChatML-like template in transformers' format (jinja2, rendered by the server).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
_CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "paged attention for hybrid models shares one pool of memory",
    "a large page is the least common multiple of every layer's page",
    "<|system|> <|user|> <|assistant|> hello, how are you? fine, thanks.",
)


def hf_config(seed: int = 0) -> dict:
    """config.json of the tiny Llama (as transformers writes it)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": "tiny-random-llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "torch_dtype": "float32",
    }


def build_tokenizer():
    """A byte-level BPE tokenizer of VOCAB_SIZE tokens (BOS added to every encode)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 10, trainer)
    bos = SPECIAL_TOKENS.index(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos)]
    )
    return tok


def write_demo_checkpoint(path: str | os.PathLike, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny checkpoint into the new directory `path`; returns it."""
    from flax import nnx

    from models.checkpoint import save_params
    from models.decoder import HybridDecoder
    from models.hf import decoder_config
    from models.pretrained import CONVERTED_INFO, ORBAX_PARAMS
    from models.random_init import perturb

    path = pathlib.Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; the demo checkpoint goes into a new directory")
    hf = hf_config(seed)
    model = HybridDecoder(decoder_config(hf, "float32"), rngs=nnx.Rngs(seed))
    perturb(model, seed=seed + 1, scale=0.5)
    path.mkdir(parents=True)
    save_params(model, path / ORBAX_PARAMS)
    (path / "config.json").write_text(json.dumps(hf, indent=1) + "\n")
    eos = {"eos_token_id": hf["eos_token_id"], "bos_token_id": hf["bos_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(eos, indent=1) + "\n")
    build_tokenizer().save(str(path / "tokenizer.json"))
    tokenizer_config = {"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1) + "\n")
    info = {"dtype": "float32", "source": "jenga_jax.demo_checkpoint (random weights)"}
    (path / CONVERTED_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return path
