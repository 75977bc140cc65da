"""Speculative trees (SpecExec / Sequoia style): many candidate continuations, one target pass.

A tree's nodes are draft tokens in topological order (parents first); node i hangs off
``parents[i]`` (-1: the sequence's last token). All nodes are query rows of one weight pass under
a tree attention mask (`ollm.layers.tree_mask`: each sees the prefix and its ancestors, at
position = length + depth); the longest accepted root path is kept, its KV rows moved to the
slots right after the prefix (`compact_path`) and the rest trimmed by the scheduler.

Verification stays lossless:

* greedy: walk from the root; at each node the target's argmax moves to the child holding that
  token, else it is the step's last token (exactly plain greedy decoding's tokens);
* sampling: recursive rejection sampling over a node's children in order (SpecInfer's
  multi-draft scheme; without replacement as in Jeon et al. 2024, "Recursive Speculative
  Decoding"): child x_r, drawn from proposal q_r, is accepted with probability
  min(1, p_r(x_r) / q_r(x_r)); on rejection p_{r+1} = norm(max(0, p_r - q_r)); when every child
  is rejected the token is drawn from the last residual. Each step is plain rejection sampling
  of p_r against q_r, so the token leaving a node is distributed as p whatever the proposals.
  A node with a draft distribution ``dist`` had its children drawn from it without replacement,
  so q_r = dist without the earlier children, renormalised; other children (prompt lookup,
  top-k picks) are deterministic, q_r = one-hot(x_r).

`TreePolicy` chooses each tree's shape from the measured acceptance per depth (the first-ranked
child) and per sibling rank and from the cost of a pass with n query tokens: the tree of n nodes
expected to yield the most tokens is the n nodes of highest probability of being reached and
accepted (that probability only falls along a path), and n maximises tokens per second.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ollm.engine.sampling import Sampler, probabilities

if TYPE_CHECKING:
    from ollm.engine.kvpools import EnginePools
    from ollm.engine.stepplan import SeqStep

MAX_NODES = 64  # most tree nodes per sequence and step
MAX_WIDTH = 4  # most children of one node


def children_of(parents: Sequence[int]) -> dict[int, list[int]]:
    """Children of each node (-1: the root) in their order."""
    kids: dict[int, list[int]] = {}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
    return kids


@dataclass
class TreeVerdict:
    """What verifying one tree gave: the tokens (accepted drafts, then one from the target),
    the accepted nodes, and each sibling trial as (depth, rank, accepted) for the policy."""

    tokens: list[int]
    path: list[int]
    trials: list[tuple[int, int, bool]] = field(default_factory=list)
    depth: int = 0  # the tree's depth (its longest path)


def verify_tree(
    sampler: Sampler,
    logits: torch.Tensor,
    tokens: Sequence[int],
    parents: Sequence[int],
    dists: Mapping[int, torch.Tensor] | None = None,
) -> TreeVerdict:
    """Verify a tree from target ``logits`` [1 + n, V] (row 0: after the root, row 1 + i: after
    node i); ``dists[node]`` is the draft distribution that node's children were drawn from."""
    kids, dists = children_of(parents), dists or {}
    depths: list[int] = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    out = TreeVerdict([], [], depth=max(depths, default=0))
    node, depth = -1, 0
    greedy = sampler.params.greedy
    picks = torch.argmax(logits, dim=-1).tolist() if greedy else None
    probs = None if greedy else probabilities(sampler.params, logits)
    while True:
        nxt, last = None, None
        if picks is not None:
            last = picks[node + 1]
            for r, c in enumerate(kids.get(node, ())):
                ok = tokens[c] == last
                out.trials.append((depth, r, ok))
                if ok:
                    nxt = c
                    break
        else:
            here = (tokens, kids.get(node, ()), dists.get(node), depth)
            nxt, p = _sample_children(sampler, probs[node + 1], here, out.trials)
            if nxt is None:
                last = int(sampler.draw(p[None])[0])
        if nxt is None:
            out.tokens.append(int(last))
            return out
        out.tokens.append(int(tokens[nxt]))
        out.path.append(nxt)
        node, depth = nxt, depth + 1


def _sample_children(sampler, p, here, trials):
    """Recursive rejection over a node's children (``here``: the tree's tokens, the children,
    their draft distribution, the depth): (accepted child or None, the last residual)."""
    tokens, children, dist, depth = here
    tried: list[int] = []
    for r, c in enumerate(children):
        x = int(tokens[c])
        q = None
        if dist is not None:  # drawn from dist without the earlier children
            q = dist.to(p.device, torch.float32).clone()
            q[tried] = 0.0
            q = q / q.sum().clamp_min(1e-30)
        px, qx = float(p[x]), 1.0 if q is None else float(q[x])
        # Accept with probability min(1, p(x) / q(x)): u q < p.
        ok = sampler.uniform() * qx < px
        trials.append((depth, r, ok))
        if ok:
            return c, p
        if q is None:
            resid = p.clone()
            resid[x] = 0.0
        else:
            resid = (p - q).clamp_min(0.0)
        total = float(resid.sum())
        p = resid / total if total > 0 else p  # total 0 only by rounding when p == q
        tried.append(x)
    return None, p


def compact_path(pools: EnginePools, st: SeqStep, path: Sequence[int]) -> None:
    """Move the KV rows of the accepted ``path`` (draft indices) to the slots right after the
    uncomputed tokens, in every layer of every KV group and home (device, pinned RAM, mapped
    files alike: one indexed copy per pool), so trimming the rest leaves the path's KV."""
    base = st.start + len(st.token_ids) - st.num_draft  # slot of draft 0
    pairs = [(base + i, base + j) for j, i in enumerate(path) if i != j]
    if not pairs:
        return
    for group, stores in pools.stores.items():
        table = st.block_tables[group]
        first = next(iter(stores.values()))
        bt = first.block_tokens
        cols = [[], [], [], []]  # source block, offset, target block, offset
        for s, d in pairs:
            for j, pos in ((0, s), (2, d)):
                ref = table[pos // bt]
                cols[j].append(ref.block)
                cols[j + 1].append(pos % bt)
        tier = table[pairs[0][0] // bt].tier  # a running sequence's blocks: allocation tier
        for store in stores.values():
            pool = store.pools[tier]  # [layers, 2, kv_heads, blocks, block_tokens, head_dim]
            sb, so, db, do = (torch.tensor(c, dtype=torch.long, device=pool.device) for c in cols)
            rows = pool[:, :, :, sb, so]  # gathered first: sources and targets may overlap
            pool[:, :, :, db, do] = rows


def lookup_tree(
    tokens: Sequence[int], nodes: int, depth: int, ngram: int = 3, max_matches: int = 16
) -> tuple[list[int], list[int]]:
    """Prompt lookup as a tree: the continuations (up to ``depth`` tokens) of the latest
    ``max_matches`` earlier occurrences of the context's last n-gram (longest n first), merged
    into a trie; the ``nodes`` nodes followed by the most matches (longer n-grams weigh more,
    the most recent wins ties) as (tokens, parents)."""
    toks = list(tokens)
    trie: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    weight: list[float] = []
    node_tok: list[int] = []
    node_par: list[int] = []
    seen = 0
    for n in range(min(ngram, len(toks) - 1), 0, -1):
        tail = toks[-n:]
        for i in range(len(toks) - n - 1, -1, -1):
            if seen >= max_matches:
                break
            if toks[i : i + n] != tail:
                continue
            seen += 1
            node = -1
            for t in toks[i + n : i + n + depth]:
                key = (node, t)
                if key not in trie:
                    trie[key] = len(weight)
                    weight.append(0.0)
                    node_tok.append(t)
                    node_par.append(node)
                node = trie[key]
                weight[node] += n
    best = sorted(range(len(weight)), key=lambda j: (-weight[j], j))[:nodes]
    keep = sorted(best)  # creation order is topological; a node weighs >= its children
    new = {old: k for k, old in enumerate(keep)}
    return [node_tok[j] for j in keep], [new.get(node_par[j], -1) for j in keep]


def chain_with_siblings(
    chain: Sequence[int], alternatives: Sequence[Sequence[int]]
) -> tuple[list[int], list[int], list[int]]:
    """A draft model's tree: its chain, and at each depth the ``alternatives[d]`` (other
    likely tokens after the same prefix) as leaf siblings of chain token d, after it. Returns
    (tokens, parents, the parent node of each depth: -1, then the chain's nodes)."""
    toks: list[int] = []
    parents: list[int] = []
    prev, chain_parents = -1, []
    for d, t in enumerate(chain):
        here = len(toks)
        chain_parents.append(prev)
        toks.append(int(t))
        parents.append(prev)
        for alt in alternatives[d] if d < len(alternatives) else ():
            toks.append(int(alt))
            parents.append(prev)
        prev = here
    return toks, parents, chain_parents


def alternatives(
    row: torch.Tensor, chain_token: int, n: int, greedy: bool, gen: torch.Generator | None
) -> list[int]:
    """``n`` more children beside ``chain_token`` from a draft distribution (or logits when
    greedy) ``row`` [V]: the next-likeliest tokens, or when sampling draws without replacement
    (Gumbel top-n of log q), which is what the rejection scheme above assumes."""
    if n <= 0:
        return []
    x = row.float().clone()
    if greedy:
        x[chain_token] = float("-inf")
    else:
        x = x.log()
        x[chain_token] = float("-inf")
        u = torch.rand(x.shape, generator=gen).to(x.device).clamp_(1e-20, 1.0)
        x = x - torch.log(-torch.log(u))  # + Gumbel noise
    top = torch.topk(x, min(n, x.numel() - 1))
    return [int(t) for t, v in zip(top.indices, top.values, strict=True) if v > float("-inf")]


class TreePolicy:
    """Tree shapes from measured acceptance and pass costs (see the module docstring).

    ``depth_rate[d]``: how often the first-ranked child at depth d (the chain) is accepted once
    reached; ``rank_rate[r]``: how often the child of rank r >= 1 is accepted once those before
    it were rejected. Both exponential averages from a prior; a depth never reached yet takes
    the mean of the prior and the deepest measured rate (so a drafter right 16 deep is tried
    deeper, and the cost model, not a fixed cap, bounds the depth). ``shape`` returns the children of each chain
    node (``widths[d]``: 1 + siblings at depth d); its node count n maximises expected tokens /
    (drafting ``draft_s`` per chain token + pass cost ``c0 / B + c1 n``)."""

    def __init__(
        self, max_nodes: int = MAX_NODES, max_depth: int = MAX_NODES, max_width: int = MAX_WIDTH,
        depth_prior: float = 0.6, rank_prior: float = 0.2, decay: float = 0.9,
    ) -> None:  # fmt: skip
        self.max_nodes, self.max_depth, self.max_width = max_nodes, max_depth, max_width
        self.depth_rate = [depth_prior] * max_depth
        self.seen = [False] * max_depth  # depths whose rate was measured
        self.prior = depth_prior
        self.rank_rate = [rank_prior] * max_width
        self.decay = decay

    def observe(self, trials: Sequence[tuple[int, int, bool]]) -> None:
        """Fold one verification's sibling trials into the rates."""
        for depth, rank, ok in trials:
            if rank == 0 and depth < self.max_depth:
                if not self.seen[depth]:  # start from the rate it was shaped with
                    self.depth_rate[depth], self.seen[depth] = self._rates(depth + 1)[-1], True
                self.depth_rate[depth] = self.decay * self.depth_rate[depth] + (1 - self.decay) * ok
            elif 0 < rank < self.max_width:
                self.rank_rate[rank] = self.decay * self.rank_rate[rank] + (1 - self.decay) * ok

    def _rates(self, depth: int) -> list[float]:
        """The chain's acceptance rate at depths 0 .. ``depth`` - 1 (see the class docstring)."""
        out, last = [], self.depth_rate[0]
        for d in range(depth):
            if self.seen[d] or d == 0:
                last = self.depth_rate[d]
                out.append(last)
            else:  # half-trusted: deeper than measured, pulled toward the prior
                out.append((last + self.prior) / 2)
        return out

    def gains(self, limit: int, max_depth: int | None = None) -> list[tuple[float, int, int]]:
        """The ``limit`` likeliest nodes (at most ``max_depth`` deep) as (probability reached
        and accepted, depth, rank), best first (a chain-with-siblings tree: only rank-0 nodes
        have children)."""
        deepest = self.max_depth if max_depth is None else min(self.max_depth, max_depth)
        rate = self._rates(deepest)
        heap = [(-rate[0], 0, 0), (-(1 - rate[0]) * self.rank_rate[1], 0, 1)]
        out: list[tuple[float, int, int]] = []
        while heap and len(out) < limit:
            g, d, r = heapq.heappop(heap)
            out.append((-g, d, r))
            if r == 0 and d + 1 < deepest:  # its first child, and its next sibling
                reach = -g
                heapq.heappush(heap, (-reach * rate[d + 1], d + 1, 0))
                heapq.heappush(heap, (-reach * (1 - rate[d + 1]) * self.rank_rate[1], d + 1, 1))
            if 0 < r < self.max_width - 1:
                miss = (1 - self.rank_rate[r]) / max(self.rank_rate[r], 1e-9)
                heapq.heappush(heap, (g * miss * self.rank_rate[r + 1], d, r + 1))
        return out

    def shape(
        self,
        cost: tuple[float, float],
        draft_s: float,
        batch: int = 1,
        room: int | None = None,
        max_nodes: int | None = None,
    ) -> list[int]:
        """Children per chain depth of the best tree of at most ``max_nodes`` nodes (default
        ``self.max_nodes``) and ``room`` deep (empty: do not draft)."""
        c0, c1 = cost
        if room is not None and room < 1:
            return []
        limit = self.max_nodes if max_nodes is None else min(self.max_nodes, max_nodes)
        nodes = self.gains(limit, room)  # room: most tokens worth drafting (depth)
        best_n, best, expect, depth = 0, 1.0 / (c0 / batch + c1), 1.0, 0
        for n, (g, d, _) in enumerate(nodes, start=1):
            expect += g
            depth = max(depth, d + 1)
            rate = expect / (draft_s * depth + c0 / batch + c1 * (n + 1))
            if rate > best:
                best_n, best = n, rate
        widths: list[int] = []
        for _, d, _ in nodes[:best_n]:
            widths += [0] * (d + 1 - len(widths))
            widths[d] += 1
        return widths
