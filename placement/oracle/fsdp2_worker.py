"""FSDP2 `fully_shard` oracle cases (kind `fsdp2`), one rank per process.

Run by generate_cases.py as `python3 fsdp2_worker.py W R SEED`: joins a fake process group
(`dist.init_process_group("fake", rank=R, world_size=W)`), builds the same list of layouts and
parameters on every rank (the choices depend on W and SEED only), applies torch 2.15's own
`fully_shard` to each one-parameter module and prints, for this rank, the parameter's mesh,
placements, local shape and the global indices its local data holds along every dim.

Layouts (all on a CPU mesh of W ranks): plain FSDP (`dp = W`), HSDP (`replicate x dp`), FSDP on
top of TP (`dp x tp`, the parameter a DTensor on the tp mesh before `fully_shard`), and on top of
2-D EP+TP (`dp x ep x tp`); `shard_placement_fn` gives `Shard(d)` for d = 0, 1 or -1 or None
(the default `Shard(0)`). A layout FSDP refuses (uneven sharding on a dim other than 0) is a case
with `error: true`.
"""

import json
import random
import sys


def layouts(w):
    """(name, mesh_shape, dim_names, fsdp_dims, tp_dims) for world size w."""
    out = [("fsdp", (w,), ("dp",), ("dp",), ())]
    if w >= 4:
        out.append(("hsdp", (2, w // 2), ("rep", "dp"), ("rep", "dp"), ()))
    for tp in [2, 4]:
        if w % tp == 0 and w // tp >= 2:
            out.append((f"fsdp_tp{tp}", (w // tp, tp), ("dp", "tp"), ("dp",), ("tp",)))
    if w == 8:
        out.append(("fsdp_ep2_tp2", (2, 2, 2), ("dp", "ep", "tp"), ("dp",), ("ep", "tp")))
    return out


SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16]


def main():
    w, rank, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    dist.init_process_group("fake", rank=rank, world_size=w)
    rng = random.Random(5000 + w + 100003 * seed)
    cases = []
    for name, shape, names, fsdp_dims, tp_dims in layouts(w):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        coord = list(mesh.get_coordinate())
        per = 40 if not tp_dims else 30
        for i in range(per):
            ndim = rng.choice([1, 2, 2, 3, 3])
            g = [rng.choice(SIZES) for _ in range(ndim)]
            shard_dim = rng.choice([None, 0, 1, -1])
            if shard_dim is not None and not -ndim <= shard_dim < ndim:
                shard_dim = None
            tp = [rng.choice(["S", "S", "R"]) for _ in tp_dims]
            tp_pl = [Shard(rng.randrange(ndim)) if k == "S" else Replicate() for k in tp]
            case = {
                "id": f"fsdp2/w{w}/{name}/{i}/r{rank}",
                "kind": "fsdp2",
                "global_shape": g,
                "fsdp_mesh_shape": [shape[names.index(d)] for d in fsdp_dims],
                "hsdp": name == "hsdp",
                "shard_dim": shard_dim,
                "tp": None
                if not tp_dims
                else {
                    "mesh_shape": [shape[names.index(d)] for d in tp_dims],
                    "placements": [str(p) for p in tp_pl],
                },
                "coordinate": coord,
            }
            numel = 1
            for s in g:
                numel *= s
            full = torch.arange(numel, dtype=torch.float64).reshape(g)
            m = nn.Module()
            if tp_dims:
                sub = mesh[tp_dims] if len(tp_dims) > 1 else mesh[tp_dims[0]]
                m.p = nn.Parameter(distribute_tensor(full, sub, tp_pl, src_data_rank=None))
            else:
                m.p = nn.Parameter(full.clone())
            fmesh = mesh[fsdp_dims] if len(fsdp_dims) > 1 else mesh[fsdp_dims[0]]
            fn = (lambda p: None) if shard_dim is None else (lambda p, d=shard_dim: Shard(d))
            try:
                fully_shard(m, mesh=fmesh, shard_placement_fn=fn)
            except Exception as e:  # noqa: BLE001
                case["error"] = True
                case["message"] = " ".join(str(e).split())[:160]
                cases.append(case)
                continue
            p = m.p
            local = p.to_local()
            case["mesh_shape"] = list(p.device_mesh.shape)
            case["placements"] = [str(q) for q in p.placements]
            case["local_shape"] = list(local.shape)
            if list(p.shape) != g:
                raise AssertionError(f"fully_shard changed the global shape {g} -> {list(p.shape)}")
            # Global indices along every dim: the local values are flat global indices.
            if local.numel() > 0:
                idx = []
                stride = 1
                strides = []
                for s in reversed(g):
                    strides.append(stride)
                    stride *= s
                strides.reverse()
                for d in range(ndim):
                    line = local
                    for dd in range(ndim - 1, -1, -1):
                        if dd != d:
                            line = line.select(dd, 0)
                    vals = line.to(torch.int64).tolist()
                    idx.append([(v // strides[d]) % g[d] for v in vals])
                case["indices"] = idx
            else:
                case["indices"] = None
            # What DTensor's own placement semantics say this rank holds: where the data
            # fully_shard gave differs (uneven _StridedShard), torch disagrees with itself.
            ls, off = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            starts = None if case["indices"] is None else [ix[0] if ix else 0 for ix in case["indices"]]
            if list(ls) != case["local_shape"] or (starts is not None and list(off) != starts):
                if local.numel() == 0:
                    why = (
                        "an empty TP-local tensor: FSDP2's shard of it is empty on the FSDP dim too; this "
                        "crate gives the placements' shape"
                    )
                else:
                    why = "uneven _StridedShard over a TP shard (issue 168134); this crate follows _split_tensor"
                case["excluded"] = (
                    f"fully_shard's local data (shape {case['local_shape']}, first indices {starts}) differs from "
                    f"what its placements give by compute_local_shape_and_global_offset (shape {list(ls)}, "
                    f"offset {list(off)}): {why}"
                )
            cases.append(case)
    json.dump(cases, sys.stdout)


if __name__ == "__main__":
    main()
