"""Placement planning under memory budgets (pure arithmetic over a store's sizes, no GPU needed)
and size parsing."""

from __future__ import annotations

import pytest

from ollm.errors import BudgetError, OllmError, SizeParseError
from ollm.models.registry import STORE_FAMILIES, build_spec
from ollm.planning.placement import Workload, plan_placement
from ollm.sizes import parse_size
from ollm.storage.convert import convert
from ollm.storage.store import LayerStore

WORK = Workload(batch=1, context=256, prefill_tokens=256)
GPU = "cuda:0"


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def model(request, hf_models, tmp_path_factory):
    """(spec, store) of a converted tiny model: llama has an untied head, gemma3 a tied one."""
    _, src = hf_models(request.param)
    store = LayerStore(
        convert(
            src, tmp_path_factory.mktemp("placement") / "s", progress=False, families=STORE_FAMILIES
        )
    )
    yield build_spec(store.hf_config()), store
    store.close()


def plan(model, device=GPU, gpu=None, cpu=None, offload="auto", work=WORK):
    spec, store = model
    return plan_placement(spec, store, device, gpu, cpu, offload, work, 4)


def minimum(model, device=GPU) -> int:
    """The smallest budget the planner accepts: fixed reservations plus two stream buffers; on a
    GPU the KV of every layer may go to pinned RAM but one layer's (the prefill scratch)."""
    p = plan(model, device)  # no budget: everything resident
    fixed = sum(v for k, v in p.reserved.items() if k in ("globals", "activations"))
    kv = p.reserved["kv cache"]
    fixed += kv // len(p.layers) if device == GPU else kv
    return fixed + 2 * p.layer_bytes


def tiers(p) -> list[str]:
    return [lp.tier for lp in p.layers]


@pytest.mark.parametrize("device", [GPU, "cpu"])
def test_budget_below_minimum(model, device):
    low = minimum(model, device)
    what = "gpu_memory" if device == GPU else "cpu_memory"
    kw = {"gpu": low - 1} if device == GPU else {"cpu": low - 1}
    with pytest.raises(BudgetError, match="at least") as exc:
        plan(model, device, **kw)
    assert what in str(exc.value)
    kw = {"gpu": low} if device == GPU else {"cpu": low}
    p = plan(model, device, **kw)
    assert p.peak_device_bytes <= low
    assert p.ring_slots >= 1


def test_gpu_layers_grow_with_budget(model):
    spec, store = model
    n = spec.num_layers
    low, layer = minimum(model), store.max_layer_nbytes
    counts = []
    for k in range(0, 2 * n + 4):
        budget = low + k * layer // 2
        p = plan(model, gpu=budget)
        counts.append(p.count("gpu"))
        assert p.peak_device_bytes <= budget, (k, p.reserved)
        assert p.budget == budget
        assert p.count("gpu") + p.count("cpu") + p.count("disk") == n
        # resident layers come first; the rest stream through the ring
        assert tiers(p) == ["gpu"] * p.count("gpu") + [t for t in tiers(p) if t != "gpu"]
        assert p.streamed == list(range(p.count("gpu"), n))
        if p.streamed:
            assert 1 <= p.ring_slots <= 3
        else:
            assert p.ring_slots == 0
    assert counts == sorted(counts)
    assert counts[0] == 0 and counts[-1] == n
    big = plan(model, gpu=low + (n + 2) * layer)
    assert big.count("gpu") == n and big.streamed == [] and big.staging_slots == 0


def test_offload_disk_streams_every_layer(model):
    spec, store = model
    p = plan(model, gpu=minimum(model) + 100 * store.max_layer_nbytes, offload="disk")
    assert tiers(p) == ["disk"] * spec.num_layers
    assert p.streamed == list(range(spec.num_layers))
    assert p.staging_slots >= 1 and p.ring_slots >= 2
    p = plan(model, device="cpu", offload="disk")
    assert tiers(p) == ["disk"] * spec.num_layers


def test_offload_cpu_keeps_non_resident_in_ram(model):
    spec, store = model
    p = plan(model, gpu=minimum(model) + store.max_layer_nbytes, offload="cpu")
    non_resident = [t for t in tiers(p) if t != "gpu"]
    assert non_resident and set(non_resident) == {"cpu"}
    assert p.staging_slots == 0  # nothing read from disk per pass
    assert p.streamed == [i for i, t in enumerate(tiers(p)) if t == "cpu"]
    with pytest.raises(BudgetError, match="offload='cpu'"):
        plan(model, gpu=minimum(model), cpu=store.max_layer_nbytes, offload="cpu")


def test_auto_with_small_cpu_memory_spills_to_disk(model):
    spec, store = model
    layer = store.max_layer_nbytes
    gtable = store.files["globals.bin"].tensors
    embed = gtable["embed_tokens.weight"].nbytes
    p = plan(model, gpu=minimum(model), cpu=embed + 2 * layer)
    assert p.count("gpu") == 0
    assert p.count("disk") > 0
    assert 1 <= p.count("cpu") <= 2
    assert tiers(p) == ["cpu"] * p.count("cpu") + ["disk"] * p.count("disk")
    assert p.staging_slots >= 1
    roomy = plan(model, gpu=minimum(model), cpu=embed + 10 * layer)
    assert tiers(roomy) == ["cpu"] * spec.num_layers


def test_cpu_memory_counts_untied_embedding_in_ram(model):
    spec, store = model
    layer = store.max_layer_nbytes
    embed = store.files["globals.bin"].tensors["embed_tokens.weight"].nbytes
    p = plan(model, gpu=minimum(model), cpu=2 * layer)
    if spec.tie_word_embeddings:
        assert p.embed_device == GPU  # the tied table is the head, on the GPU: RAM holds 2 layers
        assert p.count("cpu") == 2
    else:
        assert p.embed_device == "cpu"  # the untied table stays in RAM and takes part of it
        assert p.count("cpu") == (2 * layer - embed) // layer


def test_cpu_device_streams_layers_beyond_budget(model):
    spec, store = model
    n, layer = spec.num_layers, store.max_layer_nbytes
    low = minimum(model, "cpu")
    p = plan(model, device="cpu", cpu=low)
    assert p.count("gpu") == 0
    assert p.count("disk") > 0
    assert p.streamed == [i for i, t in enumerate(tiers(p)) if t == "disk"]
    assert p.embed_device == p.head_device == "cpu"
    assert all(lp.exec_device == "cpu" for lp in p.layers)
    counts = []
    for k in range(0, 2 * n + 4):
        budget = low + k * layer // 2
        p = plan(model, device="cpu", cpu=budget)
        assert p.peak_device_bytes <= budget
        assert set(tiers(p)) <= {"cpu", "disk"}
        assert p.streamed == [i for i, t in enumerate(tiers(p)) if t == "disk"]
        counts.append(p.count("cpu"))
    assert counts == sorted(counts) and counts[-1] == n
    unlimited = plan(model, device="cpu")
    assert tiers(unlimited) == ["cpu"] * n and unlimited.streamed == []
    assert unlimited.budget is None


def test_larger_workload_needs_more(model):
    big = Workload(batch=4, context=2048, prefill_tokens=2048)
    small_kv = plan(model).reserved["kv cache"]
    assert plan(model, work=big).reserved["kv cache"] == small_kv * 4 * 2048 // 256
    with pytest.raises(BudgetError, match="at least"):
        plan(model, gpu=minimum(model), work=big)


def test_unknown_offload(model):
    with pytest.raises(OllmError, match="offload"):
        plan(model, offload="gpu")


def test_describe_rows(model):
    spec, _ = model
    p = plan(model, gpu=minimum(model), offload="disk")
    rows = dict(p.describe())
    assert rows["layers"] == f"0 on GPU, 0 in RAM, {spec.num_layers} on disk"
    assert rows["device"] == GPU


# -- sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        ("8GiB", 8 * 1024**3),
        ("8gib", 8 * 1024**3),
        ("512MB", 512 * 1000**2),
        ("512MiB", 512 * 1024**2),
        ("1.5G", 1_500_000_000),
        (" 4 KiB ", 4096),
        ("100", 100),
        ("0", 0),
        (1024, 1024),
        (0, 0),
        (2.5, 2),
        (None, None),
    ],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["8XB", "abc", "-1", "", "   ", "1.2.3G", "GiB", -1, True])
def test_parse_size_malformed(value):
    with pytest.raises(SizeParseError) as exc:
        parse_size(value)
    assert isinstance(exc.value, ValueError)
    assert repr(value) in str(exc.value)


def test_kv_goes_to_pinned_ram_when_it_cannot_fit(model):
    spec, store = model
    p = plan(model, GPU)
    kv = p.reserved["kv cache"]
    kv_layer = kv // spec.num_layers
    full = minimum(model, GPU) - kv_layer + kv  # minimum with every layer's KV on the GPU
    roomy = plan(model, GPU, gpu=full)
    assert all(lp.kv_tier == "device" for lp in roomy.layers)
    tight = plan(model, GPU, gpu=full - 2 * kv_layer)
    off = [i for i, lp in enumerate(tight.layers) if lp.kv_tier == "cpu"]
    assert off and off == list(range(spec.num_layers - len(off), spec.num_layers))
    assert tight.peak_device_bytes <= full - 2 * kv_layer
