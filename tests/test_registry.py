"""The model registry against the reference facts, literal sizes, and the page plans."""

from __future__ import annotations

import json
import pathlib

import pytest

import jenga_jax.core as core
from jenga_jax.core import (
    ALLOCATORS,
    AttentionType,
    LayerKind,
    ModelLayout,
    UnknownModelError,
    get_config,
    get_layout,
    make_plan,
    model_names,
)
from jenga_jax.core.layer_kinds import CHUNKED, CROSS, FULL, SLIDING, STATE

# The reference facts, read directly (not through the registry under test).
_DATA_FILE = pathlib.Path(core.__file__).with_name("data") / "model_configs.json"
_FACTS = {k: v for k, v in json.loads(_DATA_FILE.read_text()).items() if k != "_about"}

# JSON key holding the layer indices of each attention type (several spellings).
_INDEX_KEYS = {
    "sliding_attention_layers": SLIDING,
    "full_attention_layers": FULL,
    "self_attention_layers": FULL,  # Llama-3.2 Vision: causal self-attention layers
    "attention_layers": FULL,  # Jamba: the attention (non-Mamba) layers
    "cross_attention_layers": CROSS,
    "chunked_attention_layers": CHUNKED,
    "mamba_layers": STATE,
    "linear_attention_layers": STATE,
}
# JSON key holding the count of layers of each attention type.
_COUNT_KEYS = {
    "num_sliding_layers": SLIDING,
    "num_full_layers": FULL,
    "num_self_attention_layers": FULL,
    "num_attention_layers": FULL,
    "num_cross_attention_layers": CROSS,
    "num_chunked_layers": CHUNKED,
    "num_mamba_layers": STATE,
    "num_linear_attention_layers": STATE,
}

EXPECTED_NAMES = (
    "gemma-2-9b",
    "gemma-2-27b",
    "gemma-3-4b",
    "gemma-3-27b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.2-11b-vision",
    "ministral-8b",
    "jamba-1.5-mini",
    "llama-4-scout",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "qwen3-next-80b",
)


def _indices_by_type(layout: ModelLayout) -> dict[AttentionType, list[int]]:
    out: dict[AttentionType, list[int]] = {}
    for i, kind in enumerate(layout.layers):
        out.setdefault(kind.type, []).append(i)
    return out


def _facts_of(name: str) -> dict:
    return _FACTS[get_config(name).hf_id]


# ---------------------------------------------------------------------- layer types


def test_registry_names_are_the_thirteen_models():
    assert model_names() == EXPECTED_NAMES
    # every registry model has its facts in the data file, and nothing is left unused
    assert sorted(get_config(n).hf_id for n in model_names()) == sorted(_FACTS)


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_layer_types_match_reference_facts(name):
    facts = _facts_of(name)
    layout = get_layout(name)
    assert layout.name == name
    assert layout.num_layers == facts["num_hidden_layers"]
    got = _indices_by_type(layout)

    expected_idx: dict[AttentionType, list[int]] = {}
    for key, t in _INDEX_KEYS.items():
        if facts.get(key):
            expected_idx.setdefault(t, []).extend(facts[key])
    expected_idx = {t: sorted(v) for t, v in expected_idx.items()}
    if FULL not in expected_idx:  # Llama-3.1: no list, every layer is full attention
        listed = {i for v in expected_idx.values() for i in v}
        rest = [i for i in range(facts["num_hidden_layers"]) if i not in listed]
        if rest:
            expected_idx[FULL] = rest
    assert got == expected_idx

    expected_counts: dict[AttentionType, int] = {}
    for key, t in _COUNT_KEYS.items():
        if facts.get(key) is not None:
            expected_counts[t] = expected_counts.get(t, 0) + facts[key]
    assert expected_counts, f"{name}: no layer counts in the reference facts"
    assert {t: len(v) for t, v in got.items()} == expected_counts
    assert sum(expected_counts.values()) == facts["num_hidden_layers"]


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_kind_shapes_match_reference_facts(name):
    facts = _facts_of(name)
    for kind in set(get_layout(name).layers):
        assert kind.dtype == "bfloat16"
        if kind.type is STATE:
            elems = facts.get("mamba_state_elems_per_layer_vllm") or facts.get(
                "linear_state_elems_per_layer_vllm"
            )
            assert kind.state_bytes == elems * 2
            continue
        assert kind.num_kv_heads == facts["num_key_value_heads"]
        assert kind.head_dim == facts["head_dim"]
        assert kind.window == (facts["sliding_window"] if kind.type is SLIDING else None)
        assert kind.chunk == (facts["attention_chunk_size"] if kind.type is CHUNKED else None)


def test_literal_layer_indices():
    g27 = _indices_by_type(get_layout("gemma-3-27b"))
    assert g27[FULL] == [5, 11, 17, 23, 29, 35, 41, 47, 53, 59]
    assert len(g27[SLIDING]) == 52 and g27[SLIDING][-2:] == [60, 61]

    vision = _indices_by_type(get_layout("llama-3.2-11b-vision"))
    assert vision[CROSS] == [3, 8, 13, 18, 23, 28, 33, 38]
    assert len(vision[FULL]) == 32

    jamba = _indices_by_type(get_layout("jamba-1.5-mini"))
    assert jamba[FULL] == [4, 12, 20, 28]
    assert len(jamba[STATE]) == 28

    scout = _indices_by_type(get_layout("llama-4-scout"))
    assert scout[FULL] == list(range(3, 48, 4))
    assert len(scout[CHUNKED]) == 36

    qwen = _indices_by_type(get_layout("qwen3-next-80b"))
    assert qwen[FULL] == list(range(3, 48, 4))
    assert len(qwen[STATE]) == 36

    ministral = _indices_by_type(get_layout("ministral-8b"))
    assert ministral[FULL] == list(range(0, 36, 4))

    assert _indices_by_type(get_layout("gemma-2-9b"))[SLIDING] == list(range(0, 42, 2))
    assert _indices_by_type(get_layout("gpt-oss-120b"))[FULL] == list(range(1, 36, 2))
    assert _indices_by_type(get_layout("llama-3.1-70b")) == {FULL: list(range(80))}


# ---------------------------------------------------------------------- literal sizes


def test_literal_byte_sizes():
    (llama_group,) = get_layout("llama-3.1-8b").groups
    assert llama_group.kind.type is FULL
    assert llama_group.kind.bytes_per_token == 2 * 8 * 128 * 2 == 4096
    assert llama_group.bytes_per_token == 32 * 4096

    jamba = {g.kind.type: g for g in get_layout("jamba-1.5-mini").groups}
    assert jamba[STATE].kind.state_bytes == 155648 * 2 == 311296
    assert jamba[STATE].kind.bytes_per_token == 0
    assert jamba[STATE].state_bytes == 28 * 311296
    assert jamba[FULL].kind.bytes_per_token == 4096

    oss = {g.kind.type: g.kind for g in get_layout("gpt-oss-20b").groups}
    assert oss[SLIDING].window == 128
    assert oss[SLIDING].head_dim == 64 and oss[FULL].head_dim == 64
    assert oss[SLIDING].bytes_per_token == 2 * 8 * 64 * 2 == 2048

    scout = {g.kind.type: g.kind for g in get_layout("llama-4-scout").groups}
    assert scout[CHUNKED].chunk == 8192

    qwen = {g.kind.type: g.kind for g in get_layout("qwen3-next-80b").groups}
    assert qwen[STATE].state_bytes == 548864 * 2 == 1097728
    assert qwen[FULL].bytes_per_token == 2 * 2 * 256 * 2 == 2048

    assert {g.kind.window for g in get_layout("gemma-2-27b").groups} == {4096, None}
    assert {g.kind.window for g in get_layout("gemma-3-4b").groups} == {1024, None}


def test_dtype_options_change_bytes():
    fp8 = get_layout("llama-3.1-8b", kv_dtype="float8_e4m3fn")
    assert fp8.layers[0].bytes_per_token == 2 * 8 * 128 * 1 == 2048
    f32 = get_layout("jamba-1.5-mini", state_dtype="float32")
    state_kind = next(k for k in f32.layers if k.type is STATE)
    assert state_kind.state_bytes == 155648 * 4
    ckpt = get_layout("jamba-1.5-mini", state_checkpoint_interval=512)
    assert {k.checkpoint_interval for k in ckpt.layers if k.type is STATE} == {512}


# ---------------------------------------------------------------------- name resolution


@pytest.mark.parametrize(
    "alias",
    [
        "google/gemma-3-27b-it",
        "GEMMA-3-27B",
        "Gemma-3-27b",
        "GOOGLE/GEMMA-3-27B-IT",
        "gemma-3-27b-it",
    ],
)
def test_names_resolve_from_hf_id_and_any_case(alias):
    assert get_layout(alias).name == "gemma-3-27b"
    assert get_layout(alias).layers == get_layout("gemma-3-27b").layers
    assert get_config(alias).hf_id == "google/gemma-3-27b-it"


def test_hf_ids_resolve_for_every_model():
    for name in model_names():
        hf_id = get_config(name).hf_id
        assert get_config(hf_id).name == name
        assert get_config(hf_id.upper()).name == name


# Regression: the "-it" suffix rule used to be case-sensitive.
def test_instruct_suffix_resolves_case_insensitively():
    assert get_layout("Gemma-3-27B-IT").name == "gemma-3-27b"


def test_unknown_model_lists_registry_names():
    with pytest.raises(UnknownModelError) as info:
        get_layout("gpt-5-mega")
    message = str(info.value)
    assert "'gpt-5-mega'" in message
    for name in EXPECTED_NAMES:
        assert name in message
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownModelError, match="llama-3.1-8"):
        get_config("llama-3.1-8")  # a prefix is not a name


# ---------------------------------------------------------------------- layouts


def _paper_kinds():
    attn = {"num_kv_heads": 1, "head_dim": 32, "dtype": "float16"}
    return LayerKind(CROSS, **attn), LayerKind(FULL, **attn)


def test_paper_worked_example_page_sizes():
    cross, full = _paper_kinds()
    assert cross.bytes_per_token == full.bytes_per_token == 2 * 1 * 32 * 2 == 128
    layout = ModelLayout("paper", (cross, cross, full, full, full))
    plan = make_plan(layout, "jenga", tokens_per_page=1, fixed_tokens_per_page=True)
    by_type = {k.type: k for k in plan.kinds}
    assert set(by_type) == {CROSS, FULL}
    assert by_type[CROSS].page_bytes == 256
    assert by_type[FULL].page_bytes == 384
    assert by_type[CROSS].tokens_per_page == by_type[FULL].tokens_per_page == 1
    assert by_type[CROSS].layer_indices == (0, 1)
    assert by_type[FULL].layer_indices == (2, 3, 4)
    assert plan.large_page_bytes == 768
    assert plan.block_size == 1


def test_groups_order_and_grouping():
    cross, full = _paper_kinds()
    layout = ModelLayout("mixed", (full, cross, full, cross, full))
    groups = layout.groups
    assert [g.kind for g in groups] == [full, cross]  # order of first appearance
    assert [g.layer_indices for g in groups] == [(0, 2, 4), (1, 3)]
    assert [g.num_layers for g in groups] == [3, 2]
    assert [g.bytes_per_token for g in groups] == [384, 256]
    assert layout.has(CROSS) and layout.has(FULL) and not layout.has(STATE)

    slid = LayerKind(SLIDING, 1, 32, "float16", window=4)
    slid8 = LayerKind(SLIDING, 1, 32, "float16", window=8)
    two_windows = ModelLayout("w", (slid, slid8, slid, full))
    assert [g.layer_indices for g in two_windows.groups] == [(0, 2), (1,), (3,)]


def test_concat_with_tagged_draft_keeps_kinds_distinct():
    cross, full = _paper_kinds()
    target = ModelLayout("paper", (cross, cross, full, full, full))
    merged = target.concat(target)
    assert len(merged.groups) == 2  # identical kinds share pages
    assert [g.layer_indices for g in merged.groups] == [(0, 1, 5, 6), (2, 3, 4, 7, 8, 9)]

    draft = target.tagged("draft")
    assert draft.name == "draft:paper"
    assert {k.tag for k in draft.layers} == {"draft"}
    both = target.concat(draft)
    assert both.name == "paper+draft:paper"
    assert both.num_layers == 10
    assert len(both.groups) == 4
    assert [g.layer_indices for g in both.groups] == [(0, 1), (2, 3, 4), (5, 6), (7, 8, 9)]
    assert [g.kind.tag for g in both.groups] == ["", "", "draft", "draft"]
    plan = make_plan(both, "jenga", tokens_per_page=1, fixed_tokens_per_page=True)
    assert [k.page_bytes for k in plan.kinds] == [256, 384, 256, 384]
    assert plan.large_page_bytes == 768


def test_describe_mentions_the_kinds():
    cross, full = _paper_kinds()
    text = ModelLayout("paper", (cross, cross, full, full, full)).describe()
    assert text == "paper: 2x cross-1x32-float16, 3x full-1x32-float16"
    tagged = ModelLayout("t", (full,)).tagged("draft").describe()
    assert tagged == "draft:t: 1x draft:full-1x32-float16"
    jamba = get_layout("jamba-1.5-mini").describe()
    assert "28x state311296B" in jamba and "4x full-8x128-bfloat16" in jamba
    assert "36x chunked8192-8x128-bfloat16" in get_layout("llama-4-scout").describe()


# ---------------------------------------------------------------------- page plans


@pytest.mark.parametrize("allocator", ALLOCATORS)
@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_every_model_plans_with_every_allocator(name, allocator):
    layout = get_layout(name)
    plan = make_plan(layout, allocator)
    assert plan.allocator == allocator
    assert plan.layout is layout
    assert plan.large_page_bytes > 0
    for k in plan.kinds:
        assert k.page_bytes > 0
        assert plan.large_page_bytes % k.page_bytes == 0, (name, allocator, k)
        if k.is_token_kind:
            assert k.tokens_per_page > 0 and k.tokens_per_page % plan.block_size == 0
        else:
            assert k.tokens_per_page == 0 or k.type is CROSS
    # every real layer is stored by exactly one planned kind
    stored = sorted(i for k in plan.kinds for i in k.layer_indices)
    assert stored == list(range(layout.num_layers))


def test_paged_plan_of_vision_model_stores_images_in_every_layer():
    plan = make_plan(get_layout("llama-3.2-11b-vision"), "paged")
    token_kinds = [k for k in plan.kinds if k.is_token_kind]
    assert len(plan.kinds) == 1 and len(token_kinds) == 1
    (kind,) = token_kinds
    assert kind.num_layers == 40
    assert kind.layer_indices == tuple(range(40))
    assert kind.page_bytes == 16 * 40 * 4096
    assert plan.images_inline is True
    assert make_plan(get_layout("llama-3.2-11b-vision"), "jenga").images_inline is False


def test_uniform_plan_of_gemma3_pads_sliding_groups():
    plan = make_plan(get_layout("gemma-3-27b"), "uniform")
    assert len(plan.kinds) == 7
    assert [k.num_layers for k in plan.kinds] == [10] * 7
    sliding = [k for k in plan.kinds if k.type is SLIDING]
    full_kinds = [k for k in plan.kinds if k.type is FULL]
    assert len(sliding) == 6 and len(full_kinds) == 1
    real = sum(len(k.layer_indices) for k in sliding)
    assert real == 52
    assert 6 * 10 - real == 8  # padding layers
    assert sliding[-1].layer_indices == (60, 61)
    assert full_kinds[0].layer_indices == (5, 11, 17, 23, 29, 35, 41, 47, 53, 59)
    assert {k.page_bytes for k in plan.kinds} == {16 * 10 * 8192}
    assert plan.large_page_bytes == 16 * 10 * 8192


def test_uniform_plan_of_jamba_pads_the_state_page():
    plan = make_plan(get_layout("jamba-1.5-mini"), "uniform")
    states = [k for k in plan.kinds if k.type is STATE]
    assert len(states) == 7 and [k.num_layers for k in states] == [4] * 7
    assert len({k.page_bytes for k in plan.kinds}) == 1
    assert states[0].page_bytes > 4 * 311296
    (full_kind,) = [k for k in plan.kinds if k.type is FULL]
    assert full_kind.page_bytes == states[0].page_bytes
    assert full_kind.page_bytes == full_kind.tokens_per_page * 4 * 4096


def test_jenga_plan_literals():
    llama = make_plan(get_layout("llama-3.1-8b"), "jenga")
    assert [k.page_bytes for k in llama.kinds] == [16 * 32 * 4096]
    assert llama.large_page_bytes == 2097152

    jamba = make_plan(get_layout("jamba-1.5-mini"), "jenga")
    state_kind = next(k for k in jamba.kinds if k.type is STATE)
    # one state of 28 layers may span several pages, but always holds all 28 layers
    assert state_kind.num_layers == 28
    assert state_kind.page_bytes * state_kind.pages_per_state == 28 * 311296

    fixed = make_plan(get_layout("gemma-3-27b"), "jenga", fixed_tokens_per_page=True)
    pages = {k.type: k.page_bytes for k in fixed.kinds}
    assert pages == {SLIDING: 16 * 52 * 8192, FULL: 16 * 10 * 8192}
    assert fixed.large_page_bytes == 16 * 8192 * 260  # lcm(52, 10) = 260
