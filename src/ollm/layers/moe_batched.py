"""Batched matmuls over g experts at once (issue 19, decode): their tensors stacked [g, ...]
(``stack_experts``: one copy of each expert's views; ``gather_experts``: one
``index_select`` per tensor from the stacked views a source hands out,
``runtime/expert_stacks.py``), then a few kernels for the whole batch instead of a chain per
expert (decode is launch-bound, not bandwidth-bound). Used by ``layers/moe.py``."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ollm.layers.mlp import ACTIVATIONS
from ollm.layers.moe_mxfp4 import coded_forward, is_coded
from ollm.planning.experts import STACK_BYTES

if TYPE_CHECKING:
    from ollm.layers.moe import MoeSpec, Weights

# id(stacks) -> (a weak reference to its first tensor, one expert's bytes in it)
_BYTES: dict[int, tuple[weakref.ref, int]] = {}


def stack_step(batch: list[tuple[int, Weights]]) -> int:
    """Experts of ``batch`` whose stacked weights fit ``STACK_BYTES`` (at least one)."""
    stacks = getattr(batch, "stacks", None)
    if stacks:
        return stacks_step(stacks)
    nbytes = sum(t.numel() * t.element_size() for t in batch[0][1].values())
    return max(1, STACK_BYTES // max(1, nbytes))


def stacks_step(stacks: Mapping[str, torch.Tensor]) -> int:
    """``stack_step`` of experts gathered from ``stacks`` ([N, ...] per tensor; ``"a+b"``: two
    of them seen as one), one expert's bytes counted once per stacks (a cache's slot stacks
    live as long as the cache; held weakly, so a closed cache's buffers are not kept)."""
    first = next(iter(stacks.values()))
    memo = _BYTES.get(id(stacks))
    if memo is not None and memo[0]() is first:
        nbytes = memo[1]
    else:
        nbytes = sum(t[0].numel() * t.element_size() for n, t in stacks.items() if "+" not in n)
        if len(_BYTES) > 64:  # caches come and go (tests): never many at once
            _BYTES.clear()
        _BYTES[id(stacks)] = (weakref.ref(first), nbytes)
    return max(1, STACK_BYTES // max(1, nbytes))


# gpt-oss's clamped SwiGLU: gate * sigmoid(alpha * gate) * (up + 1), both halves clamped.
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


def _gated_names(moe: MoeSpec) -> tuple[str, str, str]:
    """The per-expert layout's (gate, up, down) tensor names."""
    return _weight_names(moe.expert_names)


@functools.cache
def _weight_names(names: tuple[str, str, str]) -> tuple[str, str, str]:
    return tuple(f"{n}.weight" for n in names)  # type: ignore[return-value]


def stack_experts(ews: list[Weights], moe: MoeSpec) -> dict[str, torch.Tensor]:
    """The experts' tensors stacked [g, ...] (one copy each), as ``forward_stacked`` reads
    them; per-expert gate and up side by side ([g, 2I, H], one matmul as the fused layout)."""
    if moe.expert_kind == "gpt_oss" or "gate_up_proj" in ews[0]:
        return {name: torch.stack([ew[name] for ew in ews]) for name in ews[0]}
    g_name, u_name, d_name = _gated_names(moe)
    gu = torch.stack([t for ew in ews for t in (ew[g_name], ew[u_name])])
    return {
        "gate_up_proj": gu.view(len(ews), -1, gu.shape[-1]),
        d_name: torch.stack([ew[d_name] for ew in ews]),
    }


def gather_experts(
    stacks: Mapping[str, torch.Tensor], idx: torch.Tensor | None, moe: MoeSpec
) -> dict:
    """The rows ``idx`` of ``stacks`` (one ``index_select`` per tensor; None: all of them, as
    views), as ``stack_experts`` gives them; per-expert gate and up read as one [g, 2I, H] when
    they lie side by side."""

    def sel(t: torch.Tensor) -> torch.Tensor:
        return t if idx is None else t.index_select(0, idx)

    if moe.expert_kind == "gpt_oss" or "gate_up_proj" in stacks:
        return {name: sel(t) for name, t in stacks.items() if "+" not in name}
    g_name, u_name, d_name = _gated_names(moe)
    out = {d_name: sel(stacks[d_name])}
    gu = stacks.get(f"{g_name}+{u_name}")
    if gu is not None:
        out["gate_up_proj"] = sel(gu)
    else:
        out[g_name], out[u_name] = (sel(stacks[n]) for n in (g_name, u_name))
    return out


def forward_stacked(x: torch.Tensor, w: Mapping, moe: MoeSpec, act: str) -> torch.Tensor:
    """``expert_forward`` of g experts at once: ``x`` [g, m, H] (expert j's rows in ``x[j]``),
    ``w`` their tensors stacked [g, ...] (``stack_experts`` / ``gather_experts``) -> [g, m, H]."""
    if moe.expert_kind == "gpt_oss":
        gate_up = torch.bmm(x, w["gate_up_proj"]) + w["gate_up_proj_bias"].unsqueeze(1)
        gate = gate_up[..., ::2].clamp(max=GPT_OSS_LIMIT)
        up = gate_up[..., 1::2].clamp(-GPT_OSS_LIMIT, GPT_OSS_LIMIT)
        h = (up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))
        return torch.bmm(h, w["down_proj"]) + w["down_proj_bias"].unsqueeze(1)
    fn = ACTIVATIONS[act]
    g_name, u_name, d_name = _gated_names(moe)
    gu = w.get("gate_up_proj")
    if gu is not None:
        gate_up = torch.bmm(x, gu.transpose(1, 2))
        half = gate_up.shape[-1] // 2
        gate, up = gate_up.narrow(-1, 0, half), gate_up.narrow(-1, half, half)
    else:
        gate = torch.bmm(x, w[g_name].transpose(1, 2))
        up = torch.bmm(x, w[u_name].transpose(1, 2))
    down = w.get("down_proj")
    down = w[d_name] if down is None else down
    return torch.bmm(fn(gate) * up, down.transpose(1, 2))


def experts_forward(x: torch.Tensor, ews: list[Weights], moe: MoeSpec, act: str) -> torch.Tensor:
    """``expert_forward`` of g experts at once: ``x`` [g, m, H] (expert j's rows in ``x[j]``) ->
    [g, m, H], their tensors stacked (one copy each) for batched matmuls: a few kernels for the
    whole batch instead of a chain per expert (decode is launch-bound, not bandwidth-bound)."""
    return forward_stacked(x, stack_experts(ews, moe), moe, act)


def direct_pairs(x: torch.Tensor, experts: torch.Tensor, source, moe: MoeSpec, act: str):
    """One row ``x`` [1, H] through its ``experts`` [k] (device ids) by the source's direct
    decode (``runtime/expert_direct.py``: planned, cached and gathered on the device, no host
    sync): [k, H] in pair order; None when the source has none or the stacks would not fit."""
    direct = getattr(source, "direct", None)
    k = experts.numel()
    if direct is None or k * direct.nbytes > max(direct.nbytes, STACK_BYTES):
        return None
    stacks = direct.experts(source.i, experts.reshape(-1))
    h = x.shape[-1]
    xs = x.expand(k, 1, h)
    if is_coded(stacks):
        idx = torch.arange(k, device=x.device)
        y = coded_forward(xs, stacks, idx, lambda a, w: forward_stacked(a, w, moe, act))
    else:
        y = forward_stacked(xs, gather_experts(stacks, None, moe), moe, act)
    return y.view(k, h)


def pairs_forward(
    x: torch.Tensor, stacks: Mapping, idx: torch.Tensor, moe: MoeSpec, act: str
) -> torch.Tensor:
    """The experts at rows ``idx`` [k] (a device int64 tensor) of ``stacks`` over one row ``x``
    [1, H], in ``idx``'s order: [k, H] (MXFP4 stacks computed from their codes)."""
    k, h = idx.shape[0], x.shape[-1]
    xs = x.expand(k, 1, h)
    if is_coded(stacks):
        y = coded_forward(xs, stacks, idx, lambda a, w: forward_stacked(a, w, moe, act))
    else:
        y = forward_stacked(xs, gather_experts(stacks, idx, moe), moe, act)
    return y.view(k, h)
