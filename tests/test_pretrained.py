"""Checkpoint directories end to end: a Hugging Face directory with a tokenizer.json,
its orbax conversion (bit-identical parameters, identical generations), text prompts
and replies, end-of-sequence stops, dtype, sharded placement on two devices."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the hf extra (torch)")
transformers = pytest.importorskip("transformers", reason="needs transformers")
tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers")

from flax import nnx  # noqa: E402 (after the skips)

from hf_parity import hf_greedy, perturb, save  # noqa: E402
from jenga_jax import Engine, SamplingParams, Tokenizer  # noqa: E402
from jenga_jax.core.errors import RequestError  # noqa: E402
from models.hf import CheckpointError  # noqa: E402
from models.hf.convert import main as convert_main  # noqa: E402
from models.pretrained import load_pretrained  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 320
CORPUS = ["the quick brown fox jumps over the lazy dog", "paged attention for hybrid models"]


def _tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return perturb(torch, transformers.LlamaForCausalLM(cfg), seed=3)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = save(hf_model, tmp_path_factory.mktemp("hf"), max_shard_size="200KB")
    _tokenizer().save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def orbax_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "orbax"
    convert_main([str(hf_dir), str(out)])
    return out


def _params(model):
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _engine(model, tokenizer=None):
    return Engine(model, num_large_pages=32, max_model_len=96, tokenizer=tokenizer)


def test_conversion_is_bit_identical_and_generates_the_same(hf_dir, orbax_dir):
    from_hf, from_orbax = load_pretrained(hf_dir), load_pretrained(orbax_dir)
    a, b = _params(from_hf), _params(from_orbax)
    assert len(a) == len(b) > 0
    assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
    prompts = [list(p) for p in np.random.default_rng(0).integers(3, VOCAB, (3, 12))]
    params = [SamplingParams(temperature=0.0, max_tokens=16)] + [
        SamplingParams(temperature=1.5, top_p=0.9, seed=s, max_tokens=16) for s in (1, 2)
    ]
    outs = [
        [o.output_token_ids for o in _engine(m).generate(prompts, params)]
        for m in (from_hf, from_orbax)
    ]
    assert outs[0] == outs[1]
    assert outs[0][1] != outs[0][2]  # the sampled ones sample


def test_text_prompts_give_text_and_match_transformers(hf_model, hf_dir):
    tok = Tokenizer.from_dir(hf_dir)
    assert tok.eos_token_ids == (2,)  # from config.json
    engine = _engine(load_pretrained(hf_dir), tok)
    text = "the lazy fox jumps"
    ids = tok.encode(text)
    assert ids[0] == 1 and len(ids) > 2  # BOS from the tokenizer's template
    (out,) = engine.generate([text], SamplingParams(temperature=0.0, max_tokens=24))
    assert list(out.prompt_token_ids) == ids
    assert out.text == tok.decode(out.output_token_ids)
    ref = hf_greedy(torch, hf_model, np.array([ids]), len(out.output_token_ids))[0]
    assert list(out.output_token_ids) == ref
    streamed = "".join(engine.stream_text(text, SamplingParams(temperature=0.0, max_tokens=24)))
    assert streamed == out.text


def test_text_stream_pieces_join_to_the_full_decode(hf_dir):
    from jenga_jax.engine.text import TextStream

    tok = Tokenizer.from_dir(hf_dir)
    rng = np.random.default_rng(4)
    texts = ["héllo wörld 日本語 the lazy fox", "  spaces\tand\nnewlines ünïcode"]
    for i, ids in enumerate([tok.encode(t)[1:] for t in texts] + [rng.integers(3, VOCAB, 40)]):
        stream = TextStream(tok)
        pieces = [stream.push(int(t)) for t in ids] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids)
        assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # held back until whole
        if i < len(texts):  # real text: given out as it grows, not all at the end
            assert sum(bool(p) for p in pieces[:-1]) >= 5 and "\ufffd" not in "".join(pieces)


def test_requests_stop_at_end_of_sequence(hf_dir):
    model = load_pretrained(hf_dir)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    (free,) = _engine(model).generate([[1, 50, 60, 70]], greedy)
    eos = free.output_token_ids[5]  # make the 6th greedy token the end-of-sequence id
    cut = free.output_token_ids.index(eos) + 1
    tok = Tokenizer(Tokenizer.from_dir(hf_dir)._tokenizer, eos_token_ids=(eos,))
    (out,) = _engine(model, tok).generate([[1, 50, 60, 70]], greedy)
    assert out.output_token_ids == free.output_token_ids[:cut]
    assert out.finish_reason == "stop"


def test_text_without_tokenizer_and_wrong_dtype_are_refused(hf_dir, orbax_dir):
    with pytest.raises(RequestError, match="needs a tokenizer"):
        _engine(load_pretrained(orbax_dir)).add_request("hello")
    with pytest.raises(CheckpointError, match="stores float32.*--dtype bfloat16"):
        load_pretrained(orbax_dir, dtype="bfloat16")
    model = load_pretrained(hf_dir, dtype="bfloat16")
    assert {x.dtype for x in _params(model)} == {np.dtype(jax.numpy.bfloat16)}


def test_bfloat16_conversion(hf_dir, tmp_path):
    convert_main([str(hf_dir), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    a = _params(load_pretrained(tmp_path / "bf16"))
    b = _params(load_pretrained(hf_dir, dtype="bfloat16"))
    assert all(x.dtype == jax.numpy.bfloat16 and np.array_equal(x, y) for x, y in zip(a, b))
    assert (tmp_path / "bf16" / "tokenizer.json").is_file()


SHARDED = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from models.pretrained import load_pretrained
    assert jax.device_count() == 2
    mesh = Mesh(np.array(jax.devices()), ("model",))
    def place(path, shape):  # embeddings and MLP kernels split in two, the rest copied
        split = path == "embed" or (path.endswith("kernel") and "/mlp/" in path)
        return NamedSharding(mesh, P("model") if split else P())
    ids = np.random.default_rng(0).integers(0, 320, (2, 24))
    for path in sys.argv[1:]:
        plain = np.asarray(load_pretrained(path).forward_dense(ids))
        model = load_pretrained(path, sharding=place)
        assert model.embed[...].sharding.spec == P("model"), model.embed[...].sharding
        up = model.blocks[0].mlp.up.kernel[...]
        assert len(up.addressable_shards) == 2 and up.addressable_shards[0].data.shape[0] == 32
        got = np.asarray(model.forward_dense(ids))
        np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)
    print("sharded ok")
""")


def test_sharded_placement_on_two_devices(hf_dir, orbax_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", SHARDED, str(hf_dir), str(orbax_dir)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded ok" in result.stdout


def test_memory_report_reads_the_config(hf_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "memory_report.py"), "--config", str(hf_dir),
         "--workload", "sharegpt", "--num-requests", "20", "--kv-budget-gib", "0.0005"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    layout = load_pretrained(hf_dir).cfg.layout(kv_dtype="bfloat16", checkpoint_interval=512)
    assert result.stdout.startswith(layout.describe())
    assert "jenga runs" in result.stdout


def test_serve_example_reads_the_directory(hf_dir, orbax_dir):
    for path in (hf_dir, orbax_dir):
        result = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "serve.py"), "--model", str(path),
             "--interactive", "--max-tokens", "6", "--temperature", "0.0001",
             "--max-model-len", "64", "--max-num-seqs", "2", "--max-num-batched-tokens", "32"],
            input="the lazy dog\n", capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip(), "no reply"
    assert json.loads((orbax_dir / "jenga_jax.json").read_text())["dtype"] == "float32"
