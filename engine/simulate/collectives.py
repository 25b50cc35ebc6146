"""What one all-reduce costs, per algorithm, and the algorithm NCCL would pick for it.

n bytes over p = g*m ranks (g per node, m nodes); each link level an alpha (seconds per
message step) and a bandwidth B (bytes/s; between nodes: a node's total, all of its NICs);
inside one node (m = 1) alpha_i and B_i, else the slowest level: alpha = alpha_e,
B = min(B_i, B_e). Every collective also pays a fixed `fixed_s` (launch, the framework's
hook, the protocol's set-up), counted with the latency.

    ring          2(p-1) alpha x plateau + 2 (p-1)/p n / B
    tree          2 ((g-1) alpha_i + ceil(log2 m) alpha_e) + 2 n / (B x 0.92 x tree_factor(n))
                  (NCCL's double binary tree: a chain inside each node, two binary trees
                  over nodes each carrying half, pipelined: reduce up, broadcast down)
    hierarchical  2 ((g-1) alpha_i + (g-1)/g n / B_i)            reduce-scatter + all-gather in the node
                  + 2(m-1) alpha_e + 2 (m-1)/m n / B_e          g rings of n/g bytes across nodes
                                                                sharing the node's B_e
    auto          the cheaper of ring and tree for this n and p, as NCCL's tuner chooses

The refinements are NCCL 2.18.1's (src/graph/tuning.cc, ncclTopoTuneModel and
ncclTopoGetAlgoTime, Simple protocol, the one large gradient buckets travel on): the tree's
bus bandwidth is 0.92 of the links', times a correction per size for medium messages that
trees pipeline poorly (`TREE_FACTOR`); a ring across nodes pays its latency 1.9x (compute
capability < 8.0) or 1.4x once each channel carries >= 64 bytes per rank ("plateau effect
of ring"). NCCL has no hierarchical algorithm (CollNet needs switch support), so auto never
picks it; ring, tree and hier stay selectable for what-if studies and old NCCL (2.0 had
only the ring; 2.4 added the tree).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from engine.simulate.systems import Link

ALGOS = ("auto", "ring", "tree", "hier")
# NCCL 2.18.1 treeCorrectionFactor[Simple]: bandwidth factor per power of two of bytes/64 (64 B .. 256 MB)
TREE_FACTOR = (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9)
TREE_BUS = 0.92


class Cost(NamedTuple):
    algo: str               # the algorithm that ran (auto resolved)
    latency_s: float        # message steps and the fixed cost
    bandwidth_s: float      # bytes on the wire


def tree_factor(nbytes: float) -> float:
    log_size = int(math.log2(max(1.0, nbytes / 64)))
    return TREE_FACTOR[log_size] if log_size < len(TREE_FACTOR) else 1.0


def _nodes(ranks: int, per_node: int) -> tuple[int, int]:
    if ranks < 1 or per_node < 1 or (ranks > per_node and ranks % per_node):
        raise ValueError(f"{ranks} ranks do not fill nodes of {per_node} devices")
    return min(ranks, per_node), max(1, ranks // per_node)


def allreduce_s(nbytes: float, ranks: int, per_node: int, intra: Link, inter: Link, algo: str = "auto", *,
                fixed_s: float = 0.0, channels: int = 1, cc: int = 80) -> Cost:
    """The cost of one all-reduce of `nbytes` (module docstring). Ranks fill nodes of
    `per_node` devices; `channels` (NCCL's, one SM each) and `cc` (compute capability x 10)
    set the ring's plateau."""
    if algo not in ALGOS:
        raise ValueError(f"unknown all-reduce algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    g, m = _nodes(ranks, per_node)
    p = ranks
    if p == 1:
        return Cost("none", 0.0, 0.0)
    if algo == "auto":
        costs = [allreduce_s(nbytes, ranks, per_node, intra, inter, a, fixed_s=fixed_s, channels=channels, cc=cc)
                 for a in ("ring", "tree")]
        return min(costs, key=lambda c: c.latency_s + c.bandwidth_s)
    alpha, bw = (intra.alpha_s, intra.bandwidth) if m == 1 else (inter.alpha_s, min(intra.bandwidth, inter.bandwidth))
    if algo == "ring" or (algo == "hier" and m == 1):
        plateau = (1.9 if cc < 80 else 1.4) if m > 1 and nbytes / (max(1, channels) * p) >= 64 else 1.0
        return Cost("ring", fixed_s + 2 * (p - 1) * alpha * plateau, 2 * (p - 1) / p * nbytes / bw)
    if algo == "tree":
        lat = 2 * ((g - 1) * intra.alpha_s + math.ceil(math.log2(m)) * inter.alpha_s)
        return Cost("tree", fixed_s + lat, 2 * nbytes / (bw * TREE_BUS * tree_factor(nbytes)))
    lat = 2 * (g - 1) * intra.alpha_s + 2 * (m - 1) * inter.alpha_s
    return Cost("hier", fixed_s + lat,
                2 * (g - 1) / g * nbytes / intra.bandwidth + 2 * (m - 1) / m * nbytes / inter.bandwidth)


def ring_link_from_fit(a: float, b: float, ranks: int) -> Link:
    """The link of a one-node ring whose all-reduce of n bytes takes a + b n seconds, as
    fitted by bench/overlap.py --predict: 2(p-1) alpha = a, 2(p-1)/p / B = b."""
    if ranks < 2 or b <= 0:
        raise ValueError(f"a ring fit needs >= 2 ranks and a positive slope, got {ranks} ranks, b={b}")
    return Link(max(0.0, a) / (2 * (ranks - 1)), 2 * (ranks - 1) / ranks / b)
