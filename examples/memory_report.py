"""Memory report: how Jenga packs a real model's KV cache against uniform paging.

python examples/memory_report.py                       # Llama-3.2-11B-Vision, MMMU-like
python examples/memory_report.py --model gemma-3-27b --workload sharegpt
python examples/memory_report.py --config /path/to/checkpoint   # its config.json

The same as ``jenga-jax report`` (``jenga_jax.memory_report``). The workload defaults to
MMMU-like for models with cross attention to images, ShareGPT-like for the others.
"""

from jenga_jax.memory_report import main

if __name__ == "__main__":
    main()
