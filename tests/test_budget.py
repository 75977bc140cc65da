"""The GPU budget as a promise (issue 11): every attention path the runner takes on CUDA is
O(rows) in memory, and the planner's accounting matches what the code allocates. Allocations are
counted on the CPU by a dispatch mode that sees every tensor the code creates (the kernels'
outputs; the CUDA allocator's own peak is checked on the device by scripts/gpu/budget.py)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ollm.errors import BudgetError
from ollm.kv.cache import LayerKVCache
from ollm.layers import attention as attn
from ollm.layers.attention import (
    AttentionMask,
    attend_parts,
    attention_path,
    blocked_attention,
)
from ollm.layers.rope import rope_cos_sin
from ollm.models.decoder import decoder_block
from ollm.models.registry import build_spec
from ollm.planning import footprint
from ollm.planning.accounting import activation_parts, device_kv_bytes, kv_scratch_bytes
from ollm.planning.placement import Workload, plan_placement
from test_attention import reference


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage created inside the mode and still alive: ``peak`` and ``largest``
    (one storage). Views share their base's storage and count once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._sizes: dict[int, int] = {}
        self._outside: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:  # made outside: their views are not new
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self._sizes:
                self._outside.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in self._sizes or key in self._outside:
                continue
            self._sizes[key] = n
            self.live += n
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, n)
            weakref.finalize(st, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def masks(t: int, s: int, batch: int) -> list[AttentionMask]:
    keep = torch.ones(batch, s, dtype=torch.bool)
    keep[0, : s // 5] = False  # the first sequence is left-padded
    return [
        AttentionMask(0, s, s),  # a whole prompt
        AttentionMask(s - t, t, s),  # a later prefill chunk
        AttentionMask(s - 1, 1, s),  # decode
        AttentionMask(s - t, t, s, window=t // 2),  # a sliding-window layer
        AttentionMask(s - t, t, s, keep),  # padding
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_cuda_path_is_bounded(dtype):
    """On CUDA no mask kind or dtype reaches SDPA's fallback (it builds [heads, q, kv] scores
    and repeats K/V per query head); float32 always takes the blocked kernel."""
    for mask in masks(64, 512, 2):
        path = attention_path("cuda", dtype, 64, mask)
        assert path in ("flash", "chunk", "blocked"), (mask, path)
        if dtype == torch.float32 or not mask.is_plain_causal():
            assert path == "blocked"
    assert attention_path("cuda", torch.bfloat16, 80, AttentionMask(0, 64, 64)) == "flash"
    assert attention_path("cuda", torch.bfloat16, 320, AttentionMask(0, 64, 64)) == "blocked"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_attention_exact_and_within_its_block(monkeypatch, dtype):
    """Grouped heads (8 query, 2 KV): exact against a float64 reference, and the live bytes
    beside the output stay within ``score_block_bytes`` (never [heads, q, kv] scores)."""
    monkeypatch.setattr(footprint, "SCORE_BLOCK_BYTES", 256 << 10)
    torch.manual_seed(0)
    b, h, kvh, d, t, s = 2, 8, 2, 32, 96, 384
    k, v = (torch.randn(b, kvh, s, d, dtype=dtype) for _ in range(2))
    e = k.element_size()
    for mask in masks(t, s, b):
        q = torch.randn(b, h, mask.q_len, d, dtype=dtype)
        with LiveBytes() as live:
            out = blocked_attention(q, k, v, mask, 0.17)
        ref = reference(q, k, v, mask, 0.17)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        scores = b * h * mask.q_len * s * 4
        bound = footprint.score_block_bytes(b, h, s, e) + 2 * q.numel() * e
        assert live.peak - out.nbytes <= bound, (mask, live.peak, bound)
        if mask.q_len > 1:
            assert live.largest < scores / 4, (mask, live.largest, scores)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_cache_attends_each_part_where_it_sits(dtype):
    """A KV cache split between tiers (three parts) under padding, window and several-query
    masks: exact, and no copy of the whole KV is made (the parts used to be gathered)."""
    torch.manual_seed(1)
    b, h, kvh, d, s = 2, 8, 2, 32, 300
    k, v = (torch.randn(b, kvh, s, d, dtype=dtype) for _ in range(2))
    cuts = [(0, 64), (64, 192), (192, s)]  # the first part is all padding for sequence 0
    parts = [(k[:, :, a:z].clone(), v[:, :, a:z].clone()) for a, z in cuts]
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[0, :80] = False
    for mask in (
        AttentionMask(s - 1, 1, s, keep),
        AttentionMask(s - 4, 4, s),
        AttentionMask(s - 4, 4, s, keep, window=150),
        AttentionMask(s - 1, 1, s, None, window=40),
    ):
        q = torch.randn(b, h, mask.q_len, d, dtype=dtype)
        with LiveBytes() as live:
            out = attend_parts(q, parts, mask, 0.2)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, reference(q, k, v, mask, 0.2), atol=tol, rtol=tol)
        assert live.largest < k.nbytes, (mask, live.largest)


def _spec(window: int | None = None):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
    )
    spec = build_spec(cfg)
    if window:
        from dataclasses import replace

        spec = replace(spec, layers=tuple(replace(x, window=window) for x in spec.layers))
    return spec


def _weights(spec, dtype) -> dict[str, torch.Tensor]:
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    shapes = {
        "self_attn.q_proj.weight": (spec.num_heads * d, h),
        "self_attn.k_proj.weight": (spec.num_kv_heads * d, h),
        "self_attn.v_proj.weight": (spec.num_kv_heads * d, h),
        "self_attn.o_proj.weight": (h, spec.num_heads * d),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    return {n: (torch.randn(shape) * 0.05).to(dtype) for n, shape in shapes.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,window", [(1, None), (2, None), (1, 64)])
def test_chunk_temporaries_within_the_model(monkeypatch, dtype, batch, window):
    """A chunked prefill through real decoder blocks (the CUDA paths: blocked attention for
    float32, padding and windows) allocates no more than the planner's per-chunk parts."""
    monkeypatch.setattr(footprint, "SCORE_BLOCK_BYTES", 256 << 10)
    real_path = attn.attention_path
    monkeypatch.setattr(attn, "attention_path", lambda _dev, *a: real_path("cuda", *a))
    monkeypatch.setattr(attn, "_flash_with_lse", _cpu_flash)
    spec = _spec(window)
    t, chunk, mlp_chunk = 512, 128, 64
    e = torch.finfo(dtype).bits // 8
    w = _weights(spec, dtype)
    h = torch.randn(batch, t, spec.hidden_size, dtype=dtype)
    kv = LayerKVCache(batch, spec.num_kv_heads, spec.head_dim, t, dtype, "cpu")
    keep = None
    if batch > 1:
        keep = torch.ones(batch, t, dtype=torch.bool)
        keep[0, :100] = False
    pos = torch.arange(t)[None].expand(batch, t)
    cos, sin = rope_cos_sin(spec.layers[0].rope, pos, dtype)
    with LiveBytes() as live:
        for c0 in range(0, t, chunk):
            c1 = c0 + chunk
            m = AttentionMask(c0, chunk, c1, keep, window)
            out = decoder_block(
                spec, h[:, c0:c1], w, kv, cos[:, c0:c1], sin[:, c0:c1], m, None, mlp_chunk
            )
            h[:, c0:c1] = out
            del out
    parts = activation_parts(spec, Workload(batch, t, t), e, mlp_chunk, chunk, on_gpu=True)
    planned = sum(parts[k] for k in ("chunk temporaries", "mlp", "attention", "masks"))
    assert live.peak <= planned, (live.peak, parts)
    assert live.peak >= planned // 4  # the model is an estimate, not a blanket


def _cpu_flash(q, k, v, causal, scale):
    """Stand-in for the CUDA flash kernel (same outputs: out and log-sum-exp)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, scale=scale
    )


def test_device_kv_is_what_the_runner_allocates(store, tmp_path):
    """With the KV of most layers offloaded (disk tier, CPU machine under a RAM budget), the
    planned device KV equals the bytes of the caches, split blocks and the scratch that
    ``Runner.new_kv`` makes; the scratch holds a whole layer per KV head."""
    from ollm import LLM

    spec, s = store
    probe = plan_placement(spec, s, "cpu", None, None, work=Workload(1, 512, 512), dtype_bytes=4)
    kv_all = probe.reserved["kv cache"]
    budget = probe.peak_device_bytes - kv_all + kv_all // 3
    llm = LLM(s.path, device="cpu", cpu_memory=budget, kv_cache="disk", max_context=512,
              cache_dir=tmp_path, progress=False)  # fmt: skip
    plan = llm.plan
    assert any(p.kv_tier == "disk" for p in plan.layers)
    caches, disk = llm._engine._new_kv(1, 512, None)
    try:
        scratch = next(c.scratch for c in caches if hasattr(c, "scratch"))
        work = Workload(1, 512, 512)
        assert scratch.k.nbytes + scratch.v.nbytes == kv_scratch_bytes(spec, work, 4)
        device = scratch.k.nbytes + scratch.v.nbytes
        for c in caches:
            if hasattr(c, "scratch"):
                device += sum(x.nbytes for x in (c.dk, c.dv) if x is not None)
            else:
                device += c.k.nbytes + c.v.nbytes
        assert device == plan.reserved["kv cache"]
        per_token = 2 * spec.num_kv_heads * spec.head_dim * 4
        layer_kv = [per_token * 512] * len(plan.layers)
        assert device_kv_bytes(plan.layers, layer_kv, kv_scratch_bytes(spec, work, 4), 2,
                               per_token) == device  # fmt: skip
    finally:
        llm._engine._release(caches, disk)
        llm.close()


def test_request_beyond_budget_is_refused_naming_minimum(store):
    """The minimum the error names is the one the planner accepts (chunks are shrunk before it
    refuses), and a plan at it reserves no more than the budget."""
    import re

    from ollm.sizes import parse_size

    spec, s = store
    work = Workload(1, 4096, 4096)
    with pytest.raises(BudgetError, match=r"at least .* is needed") as exc:
        plan_placement(spec, s, "cuda:0", 1 << 20, None, work=work, dtype_bytes=4)
    assert "KV cache on the device" in str(exc.value)
    named = parse_size(re.search(r"at least (.+?) is needed", str(exc.value)).group(1))
    with pytest.raises(BudgetError):
        plan_placement(spec, s, "cuda:0", int(named * 0.99), None, work=work, dtype_bytes=4)
    budget = int(named * 1.01)
    plan = plan_placement(spec, s, "cuda:0", budget, None, work=work, dtype_bytes=4)
    assert plan.peak_device_bytes <= budget
    assert 0 < plan.prefill_chunk_tokens < work.prefill_tokens  # shrunk to fit


# Shapes of the CPU dry run of scripts/gpu/budget.py's newer cell kinds (the device run uses the
# presets' real widths): experts large enough that some miss a cache of a few MiB.
TINY = {
    "llama": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512),
    "moe": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                moe_intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=512, num_experts=8, num_experts_per_tok=2),
}  # fmt: skip


def _script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).parents[1] / "scripts" / "gpu"
    sys.path.insert(0, str(folder))  # budget.py imports its sibling budget_kinds
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_budget_script_new_kinds_dry_run_on_the_cpu(tmp_path):
    """scripts/gpu/budget.py's compressed-KV, paged-batch, MoE expert-cache and decode-resident
    cells, planned and run on the CPU (the budget is RAM there, no CUDA peak): just below the
    planner's minimum refused with one line naming it, from the path's minimum up each cell
    generates on its path (codec held, paged engine, experts through the cache, the opt-in
    decode_resident reaching the engine); one cell runs in a child process exactly as the
    device run spawns it."""
    budget, kinds = _script("budget"), _script("budget_kinds")
    new = ("codec", "batch", "moe", "resident")
    stores = kinds.make_kind_stores(tmp_path, new, True, TINY)
    cells = kinds.kind_cells(new, stores, False, "cpu", str(tmp_path / "cache"), prompt=64)
    heads = {(c["kind"], c.get("codec"), c["batch"], c.get("lookahead_on")) for c in cells}
    assert heads == {("codec", "int4", 1, None), ("codec", "int8", 1, None),
                     ("codec", "auto", 1, None), ("batch", "none", 8, None),
                     ("batch", "int4", 8, None), ("batch", "none", 4, None),
                     ("batch", "int4", 4, None), ("batch", "none", 32, None),
                     ("moe", None, 1, True), ("moe", None, 1, False),
                     ("resident", None, 1, None)}  # fmt: skip
    rows = [budget.judge(budget.run_cell(c)) for c in cells]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    for head in heads:
        mine = [
            r
            for r in rows
            if (r["kind"], r.get("codec"), r["batch"], r.get("lookahead_on")) == head
        ]
        assert [r["refused"] for r in mine] == [True, False, False], head
        assert mine[0]["budget"] < mine[0]["minimum"] <= mine[1]["budget"] < mine[2]["budget"]
        assert "at least" in mine[0]["error"]
        assert mine[1]["planned_path"] and mine[2]["planned_path"]
    quick = kinds.kind_cells(("moe",), stores, True, "cpu", str(tmp_path / "cache"), prompt=64)
    for ahead in (True, False):
        q = [c["budget"] for c in quick if c["lookahead_on"] is ahead]
        assert q == [c["budget"] for c in cells if c.get("lookahead_on") is ahead][:2]
    # The resident kind keeps its cell above the path's minimum under --quick too.
    held = kinds.kind_cells(("resident",), stores, True, "cpu", str(tmp_path / "cache"), prompt=64)
    assert [c["budget"] for c in held] == [c["budget"] for c in cells if c["kind"] == "resident"]
    assert kinds.options(held[0])["decode_resident"] is True
    for r in rows:
        if r["refused"]:
            continue
        assert r["tokens"] == budget.NEW_TOKENS and r["path_ok"] and r["planned"] <= r["budget"]
        if r["kind"] == "codec" and r["codec"] != "auto":
            assert r["kv_codec_held"] == r["codec"]
        if r["kind"] == "codec" and r["codec"] == "auto":
            assert r["kv_codecs_auto"]  # the plan's choice per tier is reported
        if r["kind"] == "batch":
            assert r["paged"] and r["kv_codec_held"] == r["codec"]
            assert r["engine_sized"] == (r["codec"] == "none")
        if r["kind"] == "moe":
            assert r["experts"]["disk"] > 0 and r["cache_slots"] >= 2
        if r["kind"] == "resident":  # the option reaches the engine; the CPU holds no layer
            assert r["decode_resident_option"] is True and r["decode_rows"] == 0
    moe = next(c for c in cells if c["kind"] == "moe" and c["budget"] >= c["path_minimum"])
    child = budget.judge(budget._spawn(moe))
    assert child["ok"] and not child["refused"] and child["path_ok"], child
    with pytest.raises(SystemExit, match="unknown kinds"):
        budget.run(tmp_path / "out", kinds=("exact", "bogus"))


def test_budget_script_shared_kind_dry_run_on_the_cpu(tmp_path):
    """scripts/gpu/budget.py's shared kind (8 prompts sharing 7/8 of their tokens on a
    ``shared_prefix`` plan), planned and run on the CPU under ``--quick``: just below the
    minimum refused naming it; at the path's minimum the plan holds the prefix's blocks once,
    the later prompts hit the cached prefix, decode attends it once for the batch, and each
    prompt gets its tokens."""
    budget, kinds = _script("budget"), _script("budget_kinds")
    stores = kinds.make_kind_stores(tmp_path, ("shared",), True, TINY)
    cells = kinds.kind_cells(("shared",), stores, True, "cpu", str(tmp_path / "cache"), prompt=64)
    assert [(c["kind"], c["batch"], c["shared"]) for c in cells] == [("shared", 8, 56)] * 2
    assert kinds.options(cells[0])["shared_prefix"] == 56
    low, run = (budget.judge(budget.run_cell(c)) for c in cells)
    assert low["refused"] and "at least" in low["error"] and low["ok"], low
    assert low["budget"] < low["minimum"] <= run["budget"] == run["path_minimum"]
    assert run["ok"] and not run["refused"] and run["planned_path"] and run["path_ok"], run
    assert run["shared_prefix"] == 56 and run["planned"] <= run["budget"]
    # 3 whole 16-token blocks of the prefix held once: 7 x 3 fewer than 8 x ceil(80 / 16)
    assert run["kv_pool_blocks"]["full"] == run["unshared_pool_blocks"] - 7 * 3 == 19
    assert run["prefix_hits"] >= 7 and run["prefix_saved_tokens"] >= 7 * 48
    assert run["calls"] > 0 and run["most_seqs"] >= 7 and set(run["pools"]) == {"cpu"}
    assert run["tokens"] == budget.NEW_TOKENS and run["preemptions"] == 0
