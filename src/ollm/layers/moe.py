"""Mixture-of-experts MLP: a router picks ``top_k`` experts per token, only the experts that got
tokens run, each over the rows routed to it, and the weighted outputs are summed per token.

Weights are passed in by HF name, as for the dense block. Three layouts are read:

| layout | names (relative to ``model.layers.N.``) | shapes |
| --- | --- | --- |
| per expert (HF checkpoints: Qwen3-MoE, Mixtral) | ``{prefix}.experts.{e}.{gate,up,down}.weight`` | [I, H], [I, H], [H, I] |
| fused (transformers v5 modules) | ``{prefix}.experts.gate_up_proj``, ``.down_proj`` | [E, 2I, H] (gate rows, then up), [E, H, I] |
| fused, transposed and interleaved (gpt-oss) | ``mlp.experts.gate_up_proj(_bias)``, ``.down_proj(_bias)`` | [E, H, 2I] (gate = even columns), [E, I, H] |
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ollm.layers.mlp import ACTIVATIONS, gated_mlp
from ollm.layers.moe_batched import (
    GPT_OSS_ALPHA,
    GPT_OSS_LIMIT,
    direct_pairs,
    forward_stacked,
    gather_experts,
    pairs_forward,
    stack_experts,
    stack_step,
    stacks_step,
)
from ollm.layers.moe_batched import experts_forward as experts_forward  # re-exported
from ollm.layers.moe_mxfp4 import coded_forward, decode_weights, is_coded
from ollm.runtime.expert_stacks import stacked_batch
from ollm.runtime.uva import to_device

Weights = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class MoeSpec:
    """How a family routes tokens and names its experts (plain data, built by the family module)."""

    num_experts: int  # experts per sparse layer
    top_k: int  # experts each token is sent to
    intermediate_size: int  # hidden width of one expert
    sparse_layers: frozenset[int]  # layer indices whose MLP is the MoE (the rest are dense)
    routing: str = "softmax_topk"  # softmax over all experts then top-k; "topk_softmax": gpt-oss
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to 1
    weights_in_act_dtype: bool = False  # round routing weights to the activations' dtype (Qwen3)
    prefix: str = "mlp"  # module holding the router and experts ("block_sparse_moe": Mixtral)
    router: str = "gate"  # router module name under ``prefix`` ("router": gpt-oss)
    router_bias: bool = False  # the router has a bias (gpt-oss)
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert layout
    expert_kind: str = "gated"  # "gated": act(gate) * up; "gpt_oss": clamped SwiGLU with biases
    shared_expert_size: int = 0  # width of a shared expert every token runs (Qwen3-Next); 0: none

    @property
    def router_key(self) -> str:
        """HF name of the router weight; its presence in a layer's weights marks a sparse layer."""
        return f"{self.prefix}.{self.router}.weight"

    def expert_param_count(self, hidden_size: int) -> int:
        """Weights of one expert (three projections)."""
        return 3 * hidden_size * self.intermediate_size


def route(x: torch.Tensor, w: Weights, moe: MoeSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights and expert indices, both [T, top_k], for the rows ``x`` [T, H], in the
    order and precision each family's transformers code uses (so ties and roundings agree)."""
    logits = F.linear(x, w[moe.router_key], w.get(f"{moe.prefix}.{moe.router}.bias"))
    if moe.routing == "topk_softmax":  # gpt-oss: top-k logits, softmax over those only
        top, idx = torch.topk(logits, moe.top_k, dim=-1)
        return torch.softmax(top, dim=-1, dtype=top.dtype), idx
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top, idx = torch.topk(probs, moe.top_k, dim=-1)
    if moe.norm_topk_prob and moe.weights_in_act_dtype:  # rounded by the division's kernel
        return torch.div(top, top.sum(dim=-1, keepdim=True), out=_like(top, logits.dtype)), idx
    if moe.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    if moe.weights_in_act_dtype:
        top = top.to(logits.dtype)
    return top, idx


def _like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output for an op over ``t`` rounding to ``dtype`` as it stores (``torch.div(...,
    out=)`` computes in float32 and casts as ``to`` does: bit-equal, one kernel fewer)."""
    return t if t.dtype == dtype else torch.empty_like(t, dtype=dtype)


def predict(x: torch.Tensor, w: Weights, moe: MoeSpec) -> torch.Tensor:
    """The experts ``w``'s router would pick for the rows ``x`` [T, H] (indices [T, top_k]):
    ``route``'s choice without its weights (top-k of the logits, which softmax keeps in order),
    for lookahead, where another layer's input stands in for the rows."""
    logits = F.linear(x, w[moe.router_key], w.get(f"{moe.prefix}.{moe.router}.bias"))
    return torch.topk(logits, moe.top_k, dim=-1).indices


def expert_forward(x: torch.Tensor, ew: Weights, moe: MoeSpec, act: str) -> torch.Tensor:
    """One expert applied to the rows ``x`` [n, H] routed to it; ``ew`` holds the expert's
    tensors by short name (``gate_proj.weight`` ..., ``gate_up_proj`` [2I, H] for fused gated
    experts, or gpt-oss's ``gate_up_proj`` [H, 2I], ``down_proj`` [I, H] and their biases, or
    its stored MXFP4 tensors, decoded here: prefill decodes an expert once per row group)."""
    if moe.expert_kind == "gpt_oss":
        if is_coded(ew):
            ew = decode_weights(ew)
        gate_up = x @ ew["gate_up_proj"] + ew["gate_up_proj_bias"]
        gate = gate_up[..., ::2].clamp(max=GPT_OSS_LIMIT)
        up = gate_up[..., 1::2].clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
        h = (up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))
        return h @ ew["down_proj"] + ew["down_proj_bias"]
    fn = ACTIVATIONS[act]
    fused = ew.get("gate_up_proj")
    if fused is not None:
        gate, up = F.linear(x, fused).chunk(2, dim=-1)
        return F.linear(fn(gate) * up, ew["down_proj"])
    g, u, d = (ew[f"{name}.weight"] for name in moe.expert_names)
    return F.linear(fn(F.linear(x, g)) * F.linear(x, u), d)


# Experts that run together: (None = where the rows are (the layer's device), else that device,
# [(expert, its weights), ...]).
ExpertBatch = tuple["torch.device | None", list[tuple[int, Weights]]]

# Pairs (rows x top_k) up to which routing is planned on the host from one read of the expert
# ids (decode, small batches, drafts) and a batch of experts runs as batched matmuls.
SMALL_PAIRS = 256


class ExpertSource(Protocol):
    """Gives a sparse layer's experts, in batches, where they are computed. Optional attributes
    read with ``getattr``: ``batched`` (device batches run as batched matmuls even when the rows
    are on the CPU: an accelerator played by the CPU), ``host_rows`` (CPU batches may come: the
    rows are read to the host together with the expert ids, in one sync), ``next_weights`` and
    ``prefetch(experts)`` (lookahead: the next sparse layer's weights, or None; its predicted
    experts handed back to be copied early). A device batch may be a ``StackedBatch``
    (``runtime/expert_stacks.py``): its weights gathered from stacked views. ``id_stacks``:
    every expert resident as [E, ...] stacks at its id (a decode row's experts gathered by
    the router's ids on the device: no host read, ``run`` not called)."""

    def run(self, used: list[int], counts: list[int]) -> Iterator[ExpertBatch]:
        """Yield batches covering every expert in ``used`` once (``counts``: rows routed to each
        expert), in the order they are ready; a batch's weights stay valid until the next batch
        is asked for (their buffers may then be reused)."""
        ...


class SparseWeights(dict):
    """A sparse layer's weights (dense part: attention, norms, router) plus ``experts``, the
    source its experts come from (an expert cache) instead of being tensors of the mapping."""

    experts: ExpertSource
    group_rows: int | None = None  # rows routed at once (each expert fetched once per group)


def sparse_weights(w: Weights, experts: ExpertSource, group_rows: int | None) -> SparseWeights:
    """``w`` (a sparse layer's dense weights) with the source of its experts attached."""
    sw = SparseWeights(w)
    sw.experts = experts
    sw.group_rows = group_rows
    return sw


class ResidentExperts:
    """The experts of a whole layer's weights mapping, in any of the three layouts."""

    def __init__(self, w: Weights, moe: MoeSpec) -> None:
        p = f"{moe.prefix}.experts"
        self.w, self.fused = w, None
        if moe.expert_kind == "gpt_oss":
            shorts: tuple[str, ...] = (
                "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"
            )  # fmt: skip
        elif f"{p}.gate_up_proj" in w or f"{p}.0.gate_up_proj" in w:
            shorts = ("gate_up_proj", "down_proj")
        else:
            shorts = tuple(f"{n}.weight" for n in moe.expert_names)
        if f"{p}.{shorts[0]}" in w:  # fused [E, ...] tensors
            self.fused = {s: w[f"{p}.{s}"] for s in shorts}
        self.id_stacks = self.fused  # expert e at row e (``ExpertSource``)
        self.prefix, self.shorts = p, shorts
        # MXFP4 experts (a gpt-oss store streamed as whole layers): decoded when first used
        self.coded = f"{p}.0.gate_up_proj_blocks" in w
        self._decoded: dict[int, dict[str, torch.Tensor]] = {}

    def weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s tensors by short name (views, no copy; MXFP4 ones decoded)."""
        if self.fused is not None:
            return {s: t[e] for s, t in self.fused.items()}
        if self.coded:
            return self._decode(e)
        return {s: self.w[f"{self.prefix}.{e}.{s}"] for s in self.shorts}

    def _decode(self, e: int) -> dict[str, torch.Tensor]:
        out = self._decoded.get(e)
        if out is None:
            from ollm.storage.mxfp4 import dequantize_rows

            p = f"{self.prefix}.{e}."
            out = {s: self.w[p + s] for s in self.shorts if s.endswith("_bias")}
            dtype = out["gate_up_proj_bias"].dtype
            for s in ("gate_up_proj", "down_proj"):
                blocks, scales = self.w[f"{p}{s}_blocks"], self.w[f"{p}{s}_scales"]
                out[s] = dequantize_rows(blocks, scales, dtype)  # a transposed view
            self._decoded[e] = out
        return out

    def run(self, used: list[int], counts: list[int]) -> Iterator[ExpertBatch]:
        batch = [(e, self.weights(e)) for e in used]
        yield None, batch if self.fused is None else stacked_batch(batch, self.fused, used)


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as an int64 tensor on ``device`` without a sync (built from an int64 array: a
    fraction of ``torch.tensor``'s time for a Python list)."""
    t = torch.frombuffer(array("q", values), dtype=torch.int64)
    # on CUDA a kernel's read of pinned memory (``runtime/uva.to_device``): a batch's index
    # or the CPU's outputs do not queue behind the misses' expert copies on the copy engine
    return t if device.type == "cpu" else to_device(t, device, non_blocking=True)


def _to_host(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """``ts`` on the host after one sync of their stream (pinned copies queued, then waited on
    together): the only host sync of a small MoE call."""
    if ts[0].device.type == "cpu":
        return ts
    out = [t.to("cpu", non_blocking=True) for t in ts]  # non-blocking D2H lands in pinned RAM
    torch.cuda.current_stream(ts[0].device).synchronize()
    return out


def _sub_batches(batch: list[tuple[int, Weights]]) -> Iterator[list]:
    """``batch`` in pieces whose stacked weights stay under ``STACK_BYTES`` (the planner's
    reserve; at least one expert each: large experts, Mixtral's, run one by one)."""
    step = stack_step(batch)
    if step >= len(batch):
        yield batch
        return
    stacks = getattr(batch, "stacks", None)
    for a in range(0, len(batch), step):
        part = batch[a : a + step]
        yield part if stacks is None else stacked_batch(part, stacks, batch.rows[a : a + step])


def _few_rows(x, weights, experts, moe: MoeSpec, act: str, source) -> torch.Tensor:
    """The MoE over few rows (decode): the expert ids read to the host once (with the rows when
    the source may compute on the CPU: the same sync), the (token, slot) pairs grouped by
    expert there; each device batch of experts runs as padded batched matmuls
    (``_run_batch``) or, with the rows on the CPU, expert by expert. The experts' outputs land
    in their pairs' slots unweighted; one multiply by the routing weights and the slot sum per
    call (the same products and sum as weighting each expert's output). One token whose
    experts all come in one stacked batch (all hits) runs them in pair order, its outputs the
    slots themselves (``_run_pairs``). With lookahead (the source's ``next_weights``) the next
    sparse layer's router runs on these rows too, its choice read in the same sync and
    prefetched after this layer's compute is queued."""
    t, k = experts.shape
    dev0 = x.device
    batched = dev0.type != "cpu" or getattr(source, "batched", False)
    nxt = getattr(source, "next_weights", None)  # lookahead: the next sparse layer's router
    one = t == 1 and batched and nxt is None and not getattr(source, "host_rows", False)
    by_id = getattr(source, "id_stacks", None) if one else None
    if by_id and k <= stacks_step(by_id):
        out = pairs_forward(x, by_id, experts.reshape(-1), moe, act)  # no host read
    else:  # no host read either
        out = direct_pairs(x, experts, source, moe, act) if one else None
    if out is not None:
        return (out.view(t, k, -1) * weights.reshape(t, k, 1)).sum(dim=1).to(x.dtype)
    host_rows = getattr(source, "host_rows", False) or dev0.type == "cpu"
    ahead = [predict(x, nxt, moe).reshape(-1)] if nxt is not None else []
    host = _to_host([experts.reshape(-1)] + ahead + ([x] if host_rows else []))
    ids = host[0].tolist()
    rows: dict[int, list[int]] = {}  # expert -> its pairs in pair order (= a stable sort)
    for p, e in enumerate(ids):
        r = rows.get(e)
        if r is None:
            rows[e] = [p]
        else:
            r.append(p)
    used = sorted(rows)
    counts = [0] * moe.num_experts
    for e in used:
        counts[e] = len(rows[e])
    batches = source.run(used, counts)
    first = next(batches, None)
    if t == 1 and batched and first is not None and _whole(first, len(used)):
        out = _run_pairs(x, first[1], ids, moe, act)
        if next(batches, None) is not None:
            raise RuntimeError("the expert source handed out more experts than were routed")
    else:
        slots = torch.empty(t * k + 1, x.shape[-1], dtype=x.dtype, device=dev0)  # +1: padding
        hx = host[-1] if host_rows else None
        for dev, batch in itertools.chain([first] if first is not None else [], batches):
            _run_any(x, hx, slots, dev, batch, rows, k, batched, moe, act)
        out = slots[: t * k]
    if ahead:  # the next layer's predicted experts copied in behind this layer's compute
        source.prefetch(sorted(set(host[1].tolist())))
    return (out.view(t, k, -1) * weights.reshape(t, k, 1)).sum(dim=1).to(x.dtype)


def _whole(first: ExpertBatch, n_used: int) -> bool:
    """Whether ``first``, a source's first batch, is every routed expert on the device with
    stacked weights that fit one gather."""
    dev, batch = first
    if dev is not None or len(batch) != n_used or getattr(batch, "stacks", None) is None:
        return False
    return len(batch) <= stack_step(batch)


def _run_pairs(x, batch, ids: list[int], moe: MoeSpec, act: str) -> torch.Tensor:
    """The experts of one row ``x`` [1, H], ``batch`` holding each of ``ids`` once, run in the
    order of ``ids`` (the row's pairs): [k, H], the slots the batches would fill."""
    at = {e: j for j, (e, _) in enumerate(batch)}
    idx = _index([batch.rows[at[e]] for e in ids], x.device)
    return pairs_forward(x, batch.stacks, idx, moe, act)


def _forward(moe: MoeSpec, act: str):
    """``forward_stacked`` over (rows, decoded weights), for the decode-then-matmul path."""
    return lambda x, w: forward_stacked(x, w, moe, act)


def _hand_back(ys: list[torch.Tensor], dst: list[int], device: torch.device) -> tuple:
    """``index_put_``'s arguments for the CPU's outputs ``ys`` (one row per pair) and their
    slots ``dst`` on ``device``, in one transfer: one host buffer holding the slots' int64
    index, then the outputs; on CUDA one ``to_device`` (a kernel's read of pinned memory: not
    behind the expert copies, no host sync), seen as the two tensors again."""
    n, h, dtype = len(dst), ys[0].shape[-1], ys[0].dtype
    buf = torch.empty(8 * n + n * h * dtype.itemsize, dtype=torch.uint8)
    buf[: 8 * n].view(torch.int64).copy_(torch.frombuffer(array("q", dst), dtype=torch.int64))
    torch.cat(ys, out=buf[8 * n :].view(dtype).view(n, h))
    if device.type != "cpu":
        buf = to_device(buf, device, non_blocking=True)
    return (buf[: 8 * n].view(torch.int64),), buf[8 * n :].view(dtype).view(n, h)


def _run_any(x, hx, slots, dev, batch, rows, k: int, batched: bool, moe, act) -> None:
    """One batch of experts into their pairs' slots: on the host (``dev``; rows ``hx`` already
    there, else copied) with the outputs copied back, as batched matmuls, or (the CPU device)
    expert by expert."""
    dev0 = x.device
    if dev is not None:  # the host computes; the outputs come back to their slots
        hx = x.to(dev) if hx is None else hx
        ys, dst = [], []
        for e, ew in batch:
            r = rows[e]
            ys.append(expert_forward(hx[[p // k for p in r]], ew, moe, act))
            dst += r
        slots.index_put_(*_hand_back(ys, dst, dev0))
    elif batched:
        for part in _sub_batches(batch):
            _run_batch(x, slots, part, rows, k, moe, act)
    else:
        for e, ew in batch:
            pairs = _index(rows[e], dev0)
            y = expert_forward(x.index_select(0, pairs // k), ew, moe, act)
            slots.index_put_((pairs,), y)


def _run_batch(x, slots, batch, rows, k: int, moe: MoeSpec, act: str) -> None:
    """g experts of ``batch`` over their rows, padded to the most rows any of them has (padding
    reads row 0 and lands in the spare last slot): one index copy (the stacked rows first, so
    their slice starts the tensor: aligned for the MXFP4 kernel, no copy), the rows gathered
    (a view for a single row), the weights gathered from their stacks (or stacked), the
    batched matmuls, one scatter."""
    g, m, n = len(batch), max(len(rows[e]) for e, _ in batch), slots.shape[0] - 1
    one = x.shape[0] == 1  # one row (a decode token): every expert has it, no gather
    stacks = getattr(batch, "stacks", None)
    at = g if stacks is not None else 0  # the stacked rows' slice: [0, at)
    dst: list[int] = list(batch.rows) if stacks is not None else []
    src: list[int] = []
    for e, _ in batch:
        r = rows[e]
        dst += r
        if m > len(r):
            dst += [n] * (m - len(r))
        if not one:
            src += [p // k for p in r] + [0] * (m - len(r))
    idx = _index(dst + src, x.device)
    gm, h = g * m, x.shape[-1]
    xs = x.expand(g, 1, h) if one else x.index_select(0, idx[at + gm : at + 2 * gm]).view(g, m, h)
    if is_coded(batch[0][1]):  # MXFP4: computed from the codes in their slots
        if stacks is None:  # the stored bytes stacked (a few MB per expert)
            stacks = stack_experts([ew for _, ew in batch], moe)
            y = coded_forward(xs, stacks, torch.arange(g, device=x.device), _forward(moe, act))
        else:
            y = coded_forward(xs, stacks, idx[:g], _forward(moe, act))
    elif stacks is not None:
        y = forward_stacked(xs, gather_experts(stacks, idx[:g], moe), moe, act)
    else:
        y = forward_stacked(xs, stack_experts([ew for _, ew in batch], moe), moe, act)
    slots.index_put_((idx[at : at + gm],), y.view(gm, h))


def _moe_rows(
    x: torch.Tensor, w: Weights, moe: MoeSpec, act: str, source: ExpertSource
) -> torch.Tensor:
    """The MoE over rows ``x`` [T, H]: group the (token, slot) pairs by expert, run each expert
    that got tokens once over its rows, write its weighted outputs to their slots, sum the slots.

    Summing the [T, top_k] slots (in the product's dtype, then rounding) matches transformers'
    default ``grouped_mm`` experts, and is deterministic, unlike an atomic scatter-add on CUDA.
    The source picks the order, the batches and the device of each expert (an expert in host
    memory may run on the CPU: its rows go there and its weighted outputs come back). Few rows
    go through ``_few_rows``; many (prefill) are sorted by expert on the device, each expert a
    GEMM over its rows."""
    weights, experts = route(x, w, moe)
    t, k = experts.shape
    if t * k <= SMALL_PAIRS:
        return _few_rows(x, weights, experts, moe, act, source)
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pair p = token p // k, slot p % k
    counts = torch.bincount(flat, minlength=moe.num_experts).tolist()  # one host sync per chunk
    dtype = torch.promote_types(x.dtype, weights.dtype)
    slots = torch.empty(t * k, x.shape[-1], dtype=dtype, device=x.device)
    pair_w = weights.reshape(-1)
    starts = [0] * len(counts)
    for e in range(1, len(counts)):
        starts[e] = starts[e - 1] + counts[e - 1]
    used = [e for e, n in enumerate(counts) if n]
    host: dict[torch.device, tuple[torch.Tensor, ...]] = {}  # x, order, pair_w copied once
    for dev, batch in source.run(used, counts):
        for e, ew in batch:
            a, b = starts[e], starts[e] + counts[e]
            if dev is None:
                pairs = order[a:b]
                slots[pairs] = expert_forward(x[pairs // k], ew, moe, act) * pair_w[pairs, None]
                continue
            if dev not in host:
                host[dev] = (x.to(dev), order.to(dev), pair_w.to(dev))
            hx, ho, hw = host[dev]
            pairs = ho[a:b]
            y = expert_forward(hx[pairs // k], ew, moe, act) * hw[pairs, None]
            slots[order[a:b]] = to_device(y, x.device, non_blocking=True)
    return slots.view(t, k, -1).sum(dim=1).to(x.dtype)


def moe_mlp(
    x: torch.Tensor,
    w: Weights,
    moe: MoeSpec,
    act: str,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """The sparse MLP of ``x`` [B, T, H]. Rows are processed ``chunk_tokens // top_k`` at a time:
    the planner sizes ``chunk_tokens`` for one dense MLP row, a routed row runs ``top_k`` experts.
    With ``SparseWeights`` (experts cached one by one) rows go ``group_rows`` at a time, so
    each expert a group needs is fetched once for the whole group (prefill)."""
    h = x.shape[-1]
    flat = x.reshape(-1, h)
    rows = flat.shape[0]
    source = getattr(w, "experts", None)
    if source is None:
        source = ResidentExperts(w, moe)
        step = rows if chunk_tokens is None else max(1, chunk_tokens // moe.top_k)
    else:
        step = getattr(w, "group_rows", None) or rows
    if rows <= step:
        return _moe_rows(flat, w, moe, act, source).view(x.shape)
    out = torch.empty_like(flat)
    for s in range(0, rows, step):
        out[s : s + step] = _moe_rows(flat[s : s + step], w, moe, act, source)
    return out.view(x.shape)


def shared_expert(
    x: torch.Tensor, w: Weights, moe: MoeSpec, act: str, chunk_tokens: int | None = None
) -> torch.Tensor:
    """The shared expert's output (Qwen3-Next), gated per token: ``sigmoid(x @ gate) * mlp(x)``
    with ``{prefix}.shared_expert.{gate,up,down}_proj`` and ``{prefix}.shared_expert_gate``."""
    p = f"{moe.prefix}.shared_expert"
    out = gated_mlp(
        x, w[f"{p}.gate_proj.weight"], w[f"{p}.up_proj.weight"], w[f"{p}.down_proj.weight"],
        act, chunk_tokens,
    )  # fmt: skip
    return torch.sigmoid(F.linear(x, w[f"{p}_gate.weight"])) * out


def moe_weight_names(moe: MoeSpec, names: set[str]) -> list[str]:
    """The tensors (relative to ``model.layers.N.``) a sparse layer needs, in the layout ``names``
    holds: per-expert weights, or the fused 3-D tensors (and the shared expert's, if any)."""
    p = f"{moe.prefix}.experts"
    need = [moe.router_key]
    if moe.shared_expert_size:
        s = f"{moe.prefix}.shared_expert"
        need += [f"{s}.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")]
        need.append(f"{s}_gate.weight")
    if moe.router_bias:
        need.append(f"{moe.prefix}.{moe.router}.bias")
    if moe.expert_kind == "gpt_oss":  # MXFP4 checkpoints: each matrix as _blocks + _scales
        coded = ("_blocks", "_scales") if f"{p}.gate_up_proj_blocks" in names else ("",)
        mats = ("gate_up_proj", "down_proj")
        return need + [f"{p}.{n}{c}" for n in mats for c in coded] + [f"{p}.{n}_bias" for n in mats]
    if f"{p}.gate_up_proj" in names:
        return need + [f"{p}.gate_up_proj", f"{p}.down_proj"]
    return need + [f"{p}.{e}.{n}.weight" for e in range(moe.num_experts) for n in moe.expert_names]
