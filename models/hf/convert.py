"""Convert a Hugging Face checkpoint directory to an orbax one.

    python -m models.hf.convert HF_DIR OUT_DIR [--dtype bfloat16]

OUT_DIR gets the orbax parameters (``orbax_params/``), config.json (the architecture),
the tokenizer and generation files when present, and jenga_jax.json (dtype, source).
``models.pretrained.load_pretrained`` and ``examples/serve.py --model`` read either kind.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

from models.checkpoint import save_params
from models.hf.loader import load_hf_checkpoint

CARRIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def convert(hf_dir: str | pathlib.Path, out_dir: str | pathlib.Path, dtype: str = "float32"):
    """Write OUT_DIR (a new directory) from the HF checkpoint in HF_DIR; returns its path."""
    from models.pretrained import CONVERTED_INFO, ORBAX_PARAMS

    hf_dir, out_dir = pathlib.Path(hf_dir), pathlib.Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; the converter writes a new directory")
    model = load_hf_checkpoint(hf_dir, dtype=dtype)
    out_dir.mkdir(parents=True)
    save_params(model, out_dir / ORBAX_PARAMS)
    for name in CARRIED_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, out_dir / name)
    info = {"dtype": dtype, "source": str(hf_dir.resolve())}
    (out_dir / CONVERTED_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", help="config.json + *.safetensors (+ tokenizer.json)")
    p.add_argument("out_dir", help="new directory for the orbax checkpoint")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    try:
        out = convert(args.hf_dir, args.out_dir, args.dtype)
    except (FileExistsError, ValueError) as e:  # CheckpointError is a ValueError
        p.exit(1, f"{p.prog}: error: {e}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
