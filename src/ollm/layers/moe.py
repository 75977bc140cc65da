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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ollm.layers.mlp import ACTIVATIONS, gated_mlp

Weights = Mapping[str, torch.Tensor]

# gpt-oss's clamped SwiGLU: gate * sigmoid(alpha * gate) * (up + 1), both halves clamped.
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


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
    if moe.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    if moe.weights_in_act_dtype:
        top = top.to(logits.dtype)
    return top, idx


def expert_forward(x: torch.Tensor, ew: Weights, moe: MoeSpec, act: str) -> torch.Tensor:
    """One expert applied to the rows ``x`` [n, H] routed to it; ``ew`` holds the expert's
    tensors by short name (``gate_proj.weight`` ..., ``gate_up_proj`` [2I, H] for fused gated
    experts, or gpt-oss's ``gate_up_proj`` [H, 2I], ``down_proj`` [I, H] and their biases)."""
    if moe.expert_kind == "gpt_oss":
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


# Where one expert runs: None = where the rows are (the layer's device), else that device.
ExpertRun = tuple[int, Weights, "torch.device | None"]


class ExpertSource(Protocol):
    """Gives a sparse layer's experts, one at a time, where they are computed."""

    def run(self, used: list[int], counts: list[int]) -> Iterator[ExpertRun]:
        """Yield (expert, its weights, device) for every expert in ``used`` (``counts``: rows
        routed to each expert), in the order they are ready; an expert's weights stay valid
        until the next one is asked for (its buffer may then be reused)."""
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
        self.prefix, self.shorts = p, shorts

    def weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert ``e``'s tensors by short name (views, no copy)."""
        if self.fused is not None:
            return {s: t[e] for s, t in self.fused.items()}
        return {s: self.w[f"{self.prefix}.{e}.{s}"] for s in self.shorts}

    def run(self, used: list[int], counts: list[int]) -> Iterator[ExpertRun]:
        for e in used:
            yield e, self.weights(e), None


def _moe_rows(
    x: torch.Tensor, w: Weights, moe: MoeSpec, act: str, source: ExpertSource
) -> torch.Tensor:
    """The MoE over rows ``x`` [T, H]: group the (token, slot) pairs by expert, run each expert
    that got tokens once over its rows, write its weighted outputs to their slots, sum the slots.

    Summing the [T, top_k] slots (in the product's dtype, then rounding) matches transformers'
    default ``grouped_mm`` experts, and is deterministic, unlike an atomic scatter-add on CUDA.
    The source picks the order and the device of each expert (an expert in host memory may run
    on the CPU: its rows go there and its weighted outputs come back)."""
    weights, experts = route(x, w, moe)
    t, k = experts.shape
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
    for e, ew, dev in source.run(used, counts):
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
        slots[order[a:b]] = y.to(x.device, non_blocking=True)
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
    if moe.expert_kind == "gpt_oss":
        return need + [
            f"{p}.{n}" for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
        ]
    if f"{p}.gate_up_proj" in names:
        return need + [f"{p}.gate_up_proj", f"{p}.down_proj"]
    return need + [f"{p}.{e}.{n}.weight" for e in range(moe.num_experts) for n in moe.expert_names]
