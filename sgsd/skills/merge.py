"""Hierarchical merging of candidate collections (paper Alg. 3, Tables 9-10).

    layer = 0, stagnant = 0
    repeat:
        partition C into groups of at most H items (list order, or by similarity: see below)
        each group with > 1 item -> merge prompt -> parsed items; a group whose output cannot be
            parsed is kept as it was
        C' = concatenation; stagnant = 0 if |C'| < |C| else stagnant + 1; C = C'; layer += 1
    until that layer had a single group or stagnant >= P
    remove exact duplicates (case- and whitespace-insensitive on every field), re-index

All groups of one layer go to the generator together. Merge outputs are not capped at 3 items
(the prompt says "do not force a fixed final count").

Similarity grouping (`group_embedder` given): greedy clustering. Take the first unassigned item
as a seed, add the H-1 unassigned items most cosine-similar to it, repeat. Near-duplicates then
meet in one merge call even when the list order scatters them; groups are still at most H.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from sgsd.skills.bank import CommonMistake, GeneralSkill, make_mistake, make_skill
from sgsd.skills.llm import SKILL, Kind, complete, prompt_set
from sgsd.skills.parse import ParseStats, parse_items


@dataclass
class MergeResult:
    items: list[dict[str, str]]  # merged items, fields only, deduplicated
    layers: list[dict] = field(default_factory=list)  # per layer: groups, items_in, items_out, kept_groups
    duplicates_removed: int = 0

    def metadata(self) -> dict:
        return {
            "layers": self.layers,
            "items_in": self.layers[0]["items_in"] if self.layers else len(self.items),
            "items_out": len(self.items),
            "duplicates_removed": self.duplicates_removed,
        }


def content_key(item: dict, fields: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(" ".join(item[f].lower().split()) for f in fields)


def dedupe(items: list[dict], fields: tuple[str, ...]) -> list[dict]:
    """Drop exact duplicates (after lower-casing and collapsing whitespace), keeping the first."""
    seen, out = set(), []
    for item in items:
        key = content_key(item, fields)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def assign_ids(
    items: list[dict], kind: Kind, prefix: str, start: int = 1
) -> list[GeneralSkill | CommonMistake]:
    """Bank entries `{prefix}_001`, `{prefix}_002`, ... in list order."""
    make = make_skill if kind is SKILL else make_mistake
    return [make(f"{prefix}_{start + i:03d}", item) for i, item in enumerate(items)]


def entry_text(item: dict, kind: Kind) -> str:
    return ". ".join(item[f] for f in kind.fields)


def partition(items: list[dict], size: int, kind: Kind, group_embedder=None) -> list[list[dict]]:
    if group_embedder is None or len(items) <= size:
        return [items[i : i + size] for i in range(0, len(items), size)]
    vectors = group_embedder.encode_documents([entry_text(it, kind) for it in items])  # [N, D]
    sims = vectors @ vectors.T  # [N, N]
    left = list(range(len(items)))
    groups = []
    while left:
        seed, rest = left[0], np.array(left[1:], dtype=int)
        order = rest[np.argsort(-sims[seed, rest], kind="stable")][: size - 1] if len(rest) else rest
        members = [seed, *(int(i) for i in order)]
        groups.append([items[i] for i in members])
        chosen = set(members)
        left = [i for i in left if i not in chosen]
    return groups


def hierarchical_merge(
    items: list[dict],
    kind: Kind,
    generator,
    params,
    *,
    group_size: int = 32,
    patience: int = 3,
    stats: ParseStats | None = None,
    prompts=None,
    enable_thinking: bool = False,
    group_embedder=None,
    batch_size: int = 8,
    progress: bool = False,
) -> MergeResult:
    """Alg. 3 over `items` (dicts holding `kind.fields`); see the module docstring."""
    stats = stats if stats is not None else ParseStats()
    render = kind.merge_prompt(prompt_set(prompts))
    current = [{f: it[f] for f in kind.fields} for it in items]
    layers: list[dict] = []
    stagnant = 0
    while len(current) > 1:
        groups = partition(current, group_size, kind, group_embedder)
        to_merge = [i for i, g in enumerate(groups) if len(g) > 1]
        texts = complete(
            generator,
            [render(json.dumps({kind.key: groups[i]}, indent=2, ensure_ascii=False)) for i in to_merge],
            params,
            enable_thinking,
            batch_size,
            f"merge {kind.key} layer {len(layers)}" if progress else None,
        )
        merged = {i: g for i, g in enumerate(groups)}
        kept = 0
        for i, text in zip(to_merge, texts, strict=True):
            result = stats.add(parse_items(text, kind.key, kind.fields, max_items=None))
            if result.ok:
                merged[i] = result.items
            else:
                kept += 1
        nxt = [it for i in range(len(groups)) for it in merged[i]]
        layers.append(
            {
                "layer": len(layers),
                "groups": len(groups),
                "items_in": len(current),
                "items_out": len(nxt),
                "kept_groups": kept,
            }
        )
        stagnant = 0 if len(nxt) < len(current) else stagnant + 1
        current = nxt
        if len(groups) == 1 or stagnant >= patience:
            break
    unique = dedupe(current, kind.fields)
    return MergeResult(unique, layers, len(current) - len(unique))
