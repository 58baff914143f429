"""Rollout stage, embedded CPU engine: a radix-tree prefix cache of attention keys and values.

Consumes token sequences with their per-layer KV (`insert`) and token sequences to look up
(`match`); produces the longest cached prefix and its KV, so a prompt that shares a prefix
with an earlier sequence (a GRPO group's samples, a multi-turn continuation, a teacher
scoring the same prompt again) prefills only the rest. This is SGLang's RadixCache in
miniature: each edge of the tree holds a run of tokens and, for every layer, the keys and
values those tokens produced (`KV`), and, when the engine records routes, the experts each
token was routed to (`local_routes.py`: a cached token keeps the route it was computed with,
as in SGLang); shared prefixes are stored once.
When more than `capacity` tokens are held, least recently used leaves are dropped.

The KV depends on the weights: the engine flushes the cache when the weights change (as
SGLang does on /flush_cache and after a weight update with flush_cache=true).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

KV = torch.Tensor
"""Keys and values of a run of tokens: [layers, 2 (keys, values), heads, tokens, head_dim]."""


Routes = torch.Tensor
"""Routed experts of a run of tokens: [tokens, layers, top_k]."""


def _slice(kv: KV, start: int, stop: int | None) -> KV:
    return kv[:, :, :, start:stop]


def _cut(routes: Routes | None, start: int, stop: int | None) -> Routes | None:
    return None if routes is None else routes[start:stop]


class _Node:
    def __init__(self, tokens: tuple[int, ...], kv: KV, parent: _Node | None,
                 routes: Routes | None = None):
        self.tokens, self.kv, self.parent, self.routes = tokens, kv, parent, routes
        self.children: dict[int, _Node] = {}
        self.last_used = 0


class PrefixCache:
    """Longest-prefix lookup of cached KV over token ids, with LRU eviction.

    Args:
        capacity: Most tokens held (SGLang's max_total_num_tokens for this engine).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._clock = itertools.count(1)
        self.clear()

    def clear(self) -> None:
        """Drop everything (SGLang's /flush_cache)."""
        self.root = _Node((), torch.empty(0), None)
        self.size = 0

    def match(self, tokens: Sequence[int], limit: int) -> tuple[int, KV | None, Routes | None]:
        """The longest cached prefix of `tokens[:limit]`.

        Returns:
            Its length, its KV and its routes (None when nothing matched or no routes kept).
        """
        node, pos, chunks, routes, now = self.root, 0, [], [], next(self._clock)
        while pos < limit and (child := node.children.get(tokens[pos])) is not None:
            n = 0
            while n < len(child.tokens) and pos + n < limit and child.tokens[n] == tokens[pos + n]:
                n += 1
            child.last_used = now
            chunks.append(_slice(child.kv, 0, n))
            routes.append(_cut(child.routes, 0, n))
            pos += n
            if n < len(child.tokens):
                break
            node = child
        if not chunks:
            return 0, None, None
        kept = None if any(r is None for r in routes) else torch.cat(routes)
        return pos, torch.cat(chunks, dim=3), kept

    def insert(self, tokens: Sequence[int], kv: KV, routes: Routes | None = None) -> None:
        """Cache `kv` and `routes` (covering tokens[0:len(tokens)]), sharing what is cached."""
        node, pos, now = self.root, 0, next(self._clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                rest, rest_routes = _slice(kv, pos, None).clone(), _cut(routes, pos, None)
                node.children[tokens[pos]] = new = _Node(
                    tuple(tokens[pos:]), rest, node,
                    None if rest_routes is None else rest_routes.clone())
                new.last_used = now
                self.size += len(tokens) - pos
                break
            n = 0
            while n < len(child.tokens) and pos + n < len(tokens) and \
                    child.tokens[n] == tokens[pos + n]:
                n += 1
            if n < len(child.tokens):
                child = self._split(child, n)
            child.last_used = now
            node, pos = child, pos + n
        self._evict()

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut `child`'s edge after n tokens; return the new upper node."""
        upper = _Node(child.tokens[:n], _slice(child.kv, 0, n), child.parent,
                      _cut(child.routes, 0, n))
        upper.last_used = child.last_used
        child.parent.children[child.tokens[0]] = upper
        child.tokens, child.kv, child.parent = child.tokens[n:], _slice(child.kv, n, None), upper
        child.routes = _cut(child.routes, n, None)
        upper.children[child.tokens[0]] = child
        return upper

    def _evict(self) -> None:
        while self.size > self.capacity:
            leaves, stack = [], [self.root]
            while stack:
                node = stack.pop()
                stack.extend(node.children.values())
                if not node.children and node is not self.root:
                    leaves.append(node)
            for leaf in sorted(leaves, key=lambda x: x.last_used):
                if self.size <= self.capacity:
                    return
                del leaf.parent.children[leaf.tokens[0]]
                self.size -= len(leaf.tokens)
