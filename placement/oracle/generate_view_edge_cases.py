"""Targeted view cases for the strict view rule's `_StridedShard` paths, from torch's own rule.

Writes oracle/view_edge_cases.json (format placement-cases/1, kind `view`) with the answer of
`torch.distributed.tensor._ops._view_ops.propagate_shape_and_sharding(..., strict_view=True)`:
the output placements, or `"error": true` where torch raises. Where torch's rule crashes
(KeyError on an input dim it never mapped) the case is a refusal too, as in cases.json, but it is
checked here, not excluded. Covers what the random cases of generate_cases.py rarely reach:
unflattening `_S` inputs where the matched split is not the last output dim, `_S` on the first
dim of a flattened group (the split factor search over the trailing dims), `_S` then `S` of dims
of one group on 2-D and 3-D meshes.

    ../torch-venv/bin/python placement/oracle/generate_view_edge_cases.py
"""

import json
import os

import torch
from torch.distributed.tensor._ops._view_ops import propagate_shape_and_sharding, view_groups
from torch.distributed.tensor.placement_types import Shard as S
from torch.distributed.tensor.placement_types import _StridedShard as SS

CASES = [
    # _S unflattened where the matched split is not the last output dim.
    ((24,), (2, 3, 4), (2,), [SS(0, split_factor=2)]),
    ((24,), (2, 4, 3), (2,), [SS(0, split_factor=2)]),
    ((48,), (2, 6, 4), (4,), [SS(0, split_factor=2)]),
    ((48,), (2, 8, 3), (4,), [SS(0, split_factor=2)]),
    ((48,), (2, 8, 3), (2, 2), [SS(0, split_factor=2), S(0)]),
    ((48,), (2, 8, 3), (2, 2), [S(0), SS(0, split_factor=2)]),
    ((24,), (2, 3, 4), (2, 2), [SS(0, split_factor=2), S(0)]),
    ((24,), (2, 4, 3), (2, 2), [SS(0, split_factor=2), S(0)]),
    ((24,), (2, 4, 3), (2, 2), [SS(0, split_factor=8), S(0)]),
    ((72,), (2, 6, 6), (2, 3), [SS(0, split_factor=2), S(0)]),
    ((72,), (2, 6, 6), (3, 2), [SS(0, split_factor=2), S(0)]),
    ((72,), (2, 6, 6), (2, 3), [S(0), SS(0, split_factor=2)]),
    ((12,), (3, 4), (2, 2), [SS(0, split_factor=3), S(0)]),
    ((12,), (3, 4), (2, 2), [S(0), SS(0, split_factor=3)]),
    # Flatten with _S then S of dims of one group.
    ((4, 6), (24,), (2, 2), [SS(0, split_factor=2), S(1)]),
    ((4, 6), (24,), (2, 2), [SS(1, split_factor=2), S(1)]),
    ((4, 6), (24,), (2, 2), [SS(0, split_factor=2), S(0)]),
    ((4, 6, 2), (48,), (2, 2), [SS(1, split_factor=3), S(2)]),
    ((2, 4, 3), (4, 6), (2,), [SS(1, split_factor=2)]),
    ((2, 4, 3), (4, 6), (2,), [SS(0, split_factor=2)]),
    # _S of a later dim of a flattened group, then S of that dim or a later one: the local sizes
    # after the _S set the later split factors and the evenness check.
    ((4, 6), (24,), (2, 2, 2), [SS(1, split_factor=2), S(1), S(1)]),
    ((4, 12), (48,), (2, 2, 2), [SS(1, split_factor=2), S(1), S(1)]),
    ((4, 6), (24,), (2, 3), [SS(1, split_factor=2), S(1)]),
    ((4, 6, 2), (48,), (2, 3), [SS(1, split_factor=2), S(1)]),
    ((4, 6, 2), (48,), (2, 3, 2), [SS(1, split_factor=2), S(1), S(2)]),
    ((4, 6, 2), (48,), (2, 2, 2), [SS(1, split_factor=2), S(1), S(2)]),
]
# _S on the first dim of a flattened group that is split again.
for g, tgt in [((4, 3), (2, 6)), ((8, 3), (4, 6)), ((8, 3), (2, 12)), ((8, 5), (4, 10)),
               ((8, 3, 2), (4, 12)), ((12, 2), (4, 6)), ((16, 3), (8, 6)), ((8, 6), (16, 3))]:
    for sf in (2, 3, 4):
        for mesh in ((2,), (4,)):
            CASES.append((g, tgt, mesh, [SS(0, split_factor=sf)]))


def main():
    cases = []
    for i, (g, tgt, mesh, pl) in enumerate(CASES):
        case = {
            "id": f"view-edge/{i}",
            "kind": "view",
            "op": "view",
            "args": list(tgt),
            "global_shape": list(g),
            "mesh_shape": list(mesh),
            "placements": [str(p) for p in pl],
        }
        try:
            _, out = propagate_shape_and_sharding(pl, g, view_groups(g, tgt), mesh, strict_view=True)
            case["output_placements"] = [str(p) for p in out]
        except Exception as e:  # noqa: BLE001 (RuntimeError: refused; KeyError: crashes)
            case["error"] = True
            case["torch_raises"] = f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
        cases.append(case)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "view_edge_cases.json")
    doc = {"format": "placement-cases/1", "torch_version": torch.__version__, "cases": cases}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
