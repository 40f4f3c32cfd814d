"""The model's jitted steps lower for GPU and TPU on a CPU-only machine.

`jax.export` of the prefill and decode steps of every tiny family with the Triton
(platforms=["cuda"]) or Mosaic (["tpu"]) attention kernels: the exported module must
contain the kernel's custom call (layers with equal kernels share one function). Only
the Pallas lowerings run here; the device compilers (PTX, libtpu's layouts) are not
exercised.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from jax import export

from jenga_jax.engine.model_runner import Image, ModelRunner, Work
from models import FAMILIES
from paged_scenario import random_model

TRITON_CALL = "__gpu$xla.gpu.triton"  # jax 0.10.2's name of the Triton custom call
TARGETS = {"triton": ("cuda", TRITON_CALL), "mosaic": ("tpu", "tpu_custom_call")}


@pytest.mark.parametrize("backend", sorted(TARGETS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_steps_export_with_kernels(family, backend):
    platform, call = TARGETS[backend]
    runner = ModelRunner(random_model(family), num_large_pages=32, attention_backend=backend)
    cfg = runner.cfg
    images = [Image("img", np.ones((20, cfg.vision_dim), np.float32))] if cfg.vision_dim else []
    runner.add_request("a", list(range(1, 30)), images=images, max_new_tokens=4)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if backend == "triton" else []
    for decode, work in ((False, Work("a", 29)), (True, Work("a", 1, (3,)))):
        rows, _ = runner.allocate([work])
        step = runner.prepare(rows, decode=decode)
        exported = export.export(step.fn, platforms=[platform], disabled_checks=checks)(
            runner.params, runner.pool, step.table, step.inputs
        )
        text = exported.mlir_module()
        assert re.search(rf"custom_call @{re.escape(call)}\b", text), (family, backend, decode)
        assert exported.out_avals[1].shape == runner.layout.shape  # the pool comes back
