"""Host memory while loading a checkpoint: is the model ever held twice?

Llama-shaped checkpoints of each --sizes MiB are written (random float32 tensors, one
safetensors shard per layer, ~64 MiB, with an index; no torch), then loaded in a fresh
process, from the Hugging Face directory and from its orbax conversion. Reported: the
parameters' size and the peak resident memory the load added over the process before
it (VmHWM, Linux). On CPU the model's arrays live in host memory, so the peak is
at least 1.0x the parameters; the excess over them is the transient. Loading shard by
shard keeps the excess about constant as the model grows (a shard and a few tensors);
holding the checkpoint twice would make it grow with the model (2.0x).

glibc keeps freed buffers below its (dynamic) mmap threshold mapped, which RSS would
count as live; the loads run with MALLOC_MMAP_THRESHOLD_=1048576 so that freed tensors
go back to the system and the peak measures memory in use.

    python benchmarks/load_memory.py --sizes 256 1024 --json load_memory.jsonl
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

MEASURE = """
import json, sys
import jax, numpy as np
from flax import nnx
from models.pretrained import load_pretrained

def peak_mib():  # this process's RSS high-water mark (ru_maxrss would carry the parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024

before = peak_mib()
model = load_pretrained(sys.argv[1])
nbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(json.dumps({"params_mib": nbytes / 2**20, "added_peak_mib": peak_mib() - before}))
"""


def write_checkpoint(path: pathlib.Path, size_mib: float, d_model: int = 1024) -> None:
    """A Llama config with enough layers for ~size_mib of float32 parameters."""
    from safetensors.numpy import save_file

    vocab, mlp = 8192, 4 * d_model
    per_layer = 4 * d_model * d_model + 3 * d_model * mlp + 2 * d_model
    layers = max(1, int((size_mib * 2**20 / 4 - 2 * vocab * d_model) // per_layer))
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab,
        hidden_size=d_model, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=d_model // 64, num_key_value_heads=d_model // 64,
        max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)

    def tensor(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    weight_map = {}
    shard = {"model.embed_tokens.weight": tensor(vocab, d_model)}
    shard["model.norm.weight"] = tensor(d_model)
    shard["lm_head.weight"] = tensor(vocab, d_model)
    shards = [shard]
    for i in range(layers):
        p, shard = f"model.layers.{i}.", {}
        for name in ("q", "k", "v", "o"):
            shard[f"{p}self_attn.{name}_proj.weight"] = tensor(d_model, d_model)
        shard[f"{p}mlp.gate_proj.weight"] = tensor(mlp, d_model)
        shard[f"{p}mlp.up_proj.weight"] = tensor(mlp, d_model)
        shard[f"{p}mlp.down_proj.weight"] = tensor(d_model, mlp)
        shard[f"{p}input_layernorm.weight"] = tensor(d_model)
        shard[f"{p}post_attention_layernorm.weight"] = tensor(d_model)
        shards.append(shard)
    for n, tensors in enumerate(shards):
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(path / file))
        weight_map.update({name: file for name in tensors})
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def measure(path: pathlib.Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": "1048576"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[256, 1024], help="MiB")
    p.add_argument("--json", help="write one JSON line per directory kind here")
    args = p.parse_args(argv)
    from models.hf.convert import convert

    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            hf = pathlib.Path(tmp) / "hf"
            hf.mkdir()
            write_checkpoint(hf, size)
            orbax = convert(hf, pathlib.Path(tmp) / "orbax")
            for kind, path in (("huggingface", hf), ("orbax", orbax)):
                row = {"directory": kind, "size_mib": size, **measure(path)}
                row["excess_mib"] = row["added_peak_mib"] - row["params_mib"]
                row["ratio"] = row["added_peak_mib"] / row["params_mib"]
                rows.append(row)
    header = ("directory", "params MiB", "added peak MiB", "excess MiB", "ratio")
    print("{:<12} {:>11} {:>15} {:>11} {:>6}".format(*header))
    for r in rows:
        print(
            f"{r['directory']:<12} {r['params_mib']:>11.1f} {r['added_peak_mib']:>15.1f} "
            f"{r['excess_mib']:>11.1f} {r['ratio']:>5.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
