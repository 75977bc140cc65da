"""KV eviction (issue 17): a per-layer KV cache that keeps at most a budget of token slots per
sequence and KV head, chosen by a policy, with scores from our own attention (no flash kernel
hides them):

* ``streaming`` (StreamingLLM): the first ``sinks`` tokens and the most recent ones.
* ``h2o`` (heavy hitters): sinks, a recent window, and the keys with the most attention mass
  accumulated over every query so far (summed over the query heads of a KV head).
* ``snapkv``: sinks, a recent window, and the keys the last ``observe`` queries of a prompt
  forward attend to most (max-pooled over neighbouring keys so spans survive together); decode
  queries add their attention mass to those scores (as h2o) when later evictions choose.

Knobs (``EvictionPolicy``): the recent window as a share of the budget (H2O's half), h2o's mass
normalised per query that saw a key or decayed by query age, and per-layer budgets
(``NAME:pyramid``). Measured on Gemma 3 270M at 50% (docs/benchmarks.md) none of the scored
variants comes near ``streaming``; ``streaming:pyramid`` is best, so the defaults stay as before.
``kv/evict_codec.py`` stores the kept slots encoded (``--kv-codec`` with ``--kv-evict``).

Kept keys keep the positions RoPE gave them. Eviction runs after a forward once the kept slots
exceed the budget by ``slack`` (a gather per layer every few steps, not every step). A forward
attends over the kept slots plus its own; a prompt scored in chunks (``prefill_chunk``) thus
sees the evictions of earlier chunks, which is how ``ollm eval`` measures a policy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ollm.layers.attention import AttentionMask

POLICIES = ("streaming", "h2o", "snapkv")
# ``NAME:pyramid``: the first full-attention layer keeps 1.5x the share, the last 0.5x (best of
# 0.3 / 0.5 / 0.6 / 0.8 / 1.0 for streaming on Gemma 3 270M at 2k, docs/benchmarks.md)
PYRAMID = 0.5
ROW_BLOCK = 256  # query rows per score block (scores [B, KVH, G * rows, keys] in float32)


@dataclass(frozen=True)
class EvictionPolicy:
    """Which slots a layer keeps: ``keep`` (a share of the context in (0, 1], or a token count),
    always the first ``sinks`` and the last ``window`` tokens."""

    name: str
    keep: float
    sinks: int = 4
    window: int = 64
    observe: int = 32
    recent_share: float = 0.0  # h2o / snapkv: the recent window is this share of the budget
    normalise: bool = False  # h2o: mean mass per query that saw a key, not the sum
    decay: float = 1.0  # h2o: each query's mass weighted decay ** (its age in tokens)
    pool: int = 7  # snapkv: max-pool width over neighbouring keys
    pyramid: float = 0.0  # per-layer budgets: the first full layer keeps 1 + pyramid times
    # ``keep``, the last 1 - pyramid times, linear between (the mean stays ``keep``)

    def for_layer(self, j: int, layers: int) -> EvictionPolicy:
        """The policy of the ``j``-th of ``layers`` full-attention layers (PyramidKV-like
        budgets when ``pyramid`` is set)."""
        if not self.pyramid or layers < 2:
            return self
        keep = self.keep * (1 + self.pyramid * (1 - 2 * j / (layers - 1)))
        keep = min(1.0, keep) if self.keep <= 1 else max(1.0, round(keep))
        return replace(self, keep=keep, pyramid=0.0)

    def budget(self, context: int) -> int:
        """Slots kept per sequence and KV head for a request of ``context`` tokens."""
        n = int(self.keep * context) if self.keep <= 1 else int(self.keep)
        return max(n, self.sinks + self.window + 1)

    def recent(self, budget: int) -> int:
        """The recent window always kept for a ``budget`` (at least ``window``, at most the
        budget less the sinks and one scored slot)."""
        share = 0 if self.name == "streaming" else int(self.recent_share * budget)
        return max(self.window, min(share, budget - self.sinks - 1))


def parse_eviction(name: str | None, keep: str | float | None) -> EvictionPolicy | None:
    """``("h2o", "25%")`` -> a policy keeping a quarter (``"streaming:pyramid"``: per-layer
    budgets, ``PYRAMID``); ``name`` none/None -> None. ValueError
    with one line on an unknown name or a bad share."""
    if name is None or str(name).strip().lower() in ("none", "off", ""):
        return None
    name, _, extra = str(name).strip().lower().partition(":")
    if name not in POLICIES or extra not in ("", "pyramid"):
        raise ValueError(
            f"kv_evict must be one of none, {', '.join(POLICIES)} (optionally NAME:pyramid), "
            f"not {name + (':' + extra if extra else '')!r}"
        )
    text = str(keep if keep is not None else "50%").strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(
            f"kv_keep must be a share like 25% or a token count, not {keep!r}"
        ) from None
    if share <= 0 or (share > 1 and share != int(share)):
        raise ValueError(f"kv_keep must be in (0%, 100%] or a whole token count, not {keep!r}")
    return EvictionPolicy(name, share, pyramid=PYRAMID if extra else 0.0)


class EvictingKVCache:
    """LayerKVCache protocol (``attend``, ``length``, ``trim``, ``nbytes``, ``flush``, ``close``)
    over kept slots [B, KVH, budget + slack + one forward, D] with their positions and scores,
    for a full-attention layer."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype,
                 device, policy: EvictionPolicy, forward: int, min_window: int = 0) -> None:  # fmt: skip
        self.policy, self.capacity = policy, capacity
        budget = min(capacity, policy.budget(capacity))
        self.window = max(policy.recent(budget), min_window)
        self.budget = min(capacity, max(budget, policy.sinks + self.window + 1))
        self.slack = max(1, self.budget // 16)
        slots = min(capacity, self.budget + self.slack + forward)
        shape = (batch, kv_heads, slots, head_dim)
        self._alloc(shape, dtype, device, forward)
        self.pos = torch.zeros(shape[:3], dtype=torch.long, device=device)
        self.score = torch.zeros(shape[:3], dtype=torch.float32, device=device)
        self.kept = 0  # slots [0, kept) hold kept tokens
        self.length = 0  # tokens seen (positions)

    def _alloc(self, shape: tuple[int, int, int, int], dtype, device, forward: int) -> None:
        """The slots' storage: exact keys and values."""
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    def attend(self, q, k, v, mask: AttentionMask, scale: float, dense_mask=None):
        """Append this forward's keys/values, attend over the kept slots, then evict."""
        t = k.shape[2]
        start, end = self.length, self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        if mask.window is not None:
            raise RuntimeError("evicting KV caches hold full-attention layers only")
        n = self.kept + t
        if n > self.pos.shape[2]:
            self._grow(n)
        self._append(k, v, n)
        self.pos[:, :, self.kept : n] = torch.arange(start, end, device=self.pos.device)
        self.score[:, :, self.kept : n] = 0
        self.kept, self.length = n, end
        out, mass, last = self._attention(q, mask, scale)
        if self.policy.decay != 1.0:
            self.score[:, :, :n] *= self.policy.decay**t
        self.score[:, :, :n] += mass
        self._settle()
        if self.kept > self.budget + self.slack or (t > 1 and self.kept > self.budget):
            self._evict(last if self.policy.name == "snapkv" and t > 1 else None)
        return out

    def _append(self, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Store this forward's keys/values in slots [kept, n)."""
        self.k[:, :, self.kept : n] = k
        self.v[:, :, self.kept : n] = v

    def _settle(self) -> None:
        """After a forward's attention (before eviction): nothing to do for exact slots."""

    def _keys(self, dtype) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """(K, V) of the kept slots [0, kept) as attention reads them, and None (no slot is
        read differently by different rows of a forward)."""
        n = self.kept
        return self.k[:, :, :n], self.v[:, :, :n], None

    def _grow(self, n: int) -> None:
        """A forward larger than planned: make room (rare: prefill chunks are planned)."""
        extra = n - self.pos.shape[2]
        pad = lambda x: F.pad(x, (0, 0, 0, extra) if x.dim() == 4 else (0, extra))  # noqa: E731
        self.k, self.v, self.pos, self.score = (
            pad(x) for x in (self.k, self.v, self.pos, self.score)
        )

    def _attention(self, q, mask: AttentionMask, scale: float):
        """Attention of q over the kept slots in blocks of query rows, with the mass each key
        gets (summed over rows and query heads of its KV head) and the last ``observe`` rows'
        max-pooled probabilities (SnapKV's scores)."""
        b, h, t, d = q.shape
        kvh, n = self.pos.shape[1], self.kept
        g = h // kvh
        k, v, alt = self._keys(q.dtype)
        pos = self.pos[:, :, :n]
        keep = None
        if mask.key_keep is not None:
            keys = mask.key_keep.to(q.device)[:, None, :].expand(b, kvh, -1)
            keep = torch.gather(keys, 2, pos)  # [B, KVH, n]
        out = torch.empty_like(q)
        mass = torch.zeros(b, kvh, n, device=q.device)
        observe = torch.zeros(b, kvh, n, device=q.device)
        obs_from = t - min(t, self.policy.observe)
        for r0 in range(0, t, ROW_BLOCK):
            r1 = min(t, r0 + ROW_BLOCK)
            qg = q[:, :, r0:r1].reshape(b, kvh, g, r1 - r0, d).reshape(b, kvh, g * (r1 - r0), d)
            s = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale)
            qpos = torch.arange(mask.q_start + r0, mask.q_start + r1, device=q.device)
            use = None if alt is None else self._alt_scores(s, qg, qpos, alt, g, scale)
            allowed = pos[:, :, None, :] <= qpos[None, None, :, None]  # [B, KVH, rows, n]
            if keep is not None:
                allowed = allowed & keep[:, :, None, :] | (pos[:, :, None, :] == qpos[:, None])
            allowed = allowed[:, :, None].expand(b, kvh, g, r1 - r0, n).reshape(b, kvh, -1, n)
            p = torch.softmax(s.masked_fill_(~allowed, float("-inf")), -1).nan_to_num_(0.0)
            if use is None:
                o = torch.matmul(p.to(v.dtype), v)
            else:  # the rows that read slots [a0, n) decoded weight the decoded values
                a0, vq = alt[0], alt[2]
                pa = p[..., a0:]
                o = torch.matmul(torch.cat([p[..., :a0], pa * ~use], -1).to(v.dtype), v)
                o += torch.matmul((pa * use).to(vq.dtype), vq)
            out[:, :, r0:r1] = o.reshape(b, kvh, g, r1 - r0, d).reshape(b, h, r1 - r0, d)
            if self.policy.decay == 1.0:
                mass += p.sum(2)
            else:  # weights decay ** (end - 1 - row), rows fastest in the (g, rows) layout
                age = (mask.q_start + t - 1 - qpos).to(p.dtype)
                w = torch.pow(self.policy.decay, age).repeat(g)
                mass += torch.matmul(w, p)  # [B, KVH, n]
            if r1 > obs_from:
                rows = p.reshape(b, kvh, g, r1 - r0, n)[:, :, :, max(0, obs_from - r0) :]
                observe += rows.sum((2, 3))
        if mask.sinks is not None:
            raise RuntimeError("evicting KV caches do not support attention sinks (gpt-oss)")
        w = self.policy.pool
        pooled = observe if w <= 1 else F.max_pool1d(observe.reshape(b * kvh, 1, n), w, 1, w // 2)
        pooled = pooled.reshape(b, kvh, n)
        return out, mass, pooled

    def _alt_scores(self, s, qg, qpos, alt, g: int, scale: float) -> torch.Tensor:
        """Rows that read slots [a0, n) decoded (key position < ``bound(row)``, as a decode
        step at that row would): their scores in ``s`` replaced; the choice
        [B, KVH, g * rows, n - a0] returned."""
        a0, kq, _, bound = alt
        b, kvh = s.shape[:2]
        pa = self.pos[:, :, a0 : self.kept]
        m = pa.shape[2]
        use = pa[:, :, None, :] < bound(qpos)[None, None, :, None]
        use = use[:, :, None].expand(b, kvh, g, len(qpos), m).reshape(b, kvh, -1, m)
        sq = torch.matmul(qg, kq.transpose(-1, -2)).float().mul_(scale)
        s[..., a0:] = torch.where(use, sq, s[..., a0:])
        return use

    def _evict(self, snap: torch.Tensor | None) -> None:
        """Keep ``budget`` slots per sequence and head: sinks, the recent window, then the best
        scored (``streaming``: the most recent), in position order."""
        p, n, keep = self.policy, self.kept, self.budget
        pos = self.pos[:, :, :n]
        if p.name == "streaming":
            rank = pos.float()
        elif snap is not None:
            rank = snap.clone()
        elif p.normalise:  # mean (decayed) mass per query that saw the key (all kept ones did)
            seen = (self.length - pos).clamp_min(1).float()
            if p.decay != 1.0:
                seen = (1 - p.decay**seen) / (1 - p.decay)
            rank = self.score[:, :, :n] / seen
        else:
            rank = self.score[:, :, :n].clone()
        forced = (pos < p.sinks) | (pos >= self.length - self.window)
        rank = rank.masked_fill(forced, float("inf"))
        idx = rank.topk(keep, dim=-1).indices
        idx = idx.gather(-1, pos.gather(-1, idx).argsort(-1))  # position order
        self._compact(idx)
        self.pos[:, :, :keep] = pos.gather(2, idx)
        self.score[:, :, :keep] = self.score[:, :, :n].gather(2, idx)
        self.kept = keep

    def _compact(self, idx: torch.Tensor) -> None:
        """Move the kept slots ``idx`` [B, KVH, keep] (position order) to the front."""
        n, keep = self.kept, idx.shape[-1]
        gi = idx[..., None].expand(-1, -1, -1, self.k.shape[-1])
        self.k[:, :, :keep] = self.k[:, :, :n].gather(2, gi)
        self.v[:, :, :keep] = self.v[:, :, :n].gather(2, gi)

    def trim(self, length: int) -> None:
        """Forget tokens from ``length`` on (kept slots past it go; evicted ones stay gone)."""
        length = min(self.length, max(0, length))
        alive = self.pos[:, :, : self.kept] < length
        if not bool(alive.all()):
            # tokens are appended in order, so the trimmed ones are the newest in every head
            self.kept = int(alive.sum(-1).min())
        self.length = length

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def flush(self) -> bool:
        return False

    def close(self) -> None:
        """Device memory is freed with the tensors."""

    def __len__(self) -> int:
        return self.length
