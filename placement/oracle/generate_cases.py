#!/usr/bin/env python3
"""Oracle generator: placement cases from PyTorch DTensor's own code (torch 2.15, CPU).

Writes placement/oracle/cases.json in the placement-cases/1 format (read by placement::cases):
kinds `local`, `global_from_local`, `view`, `redistribute`, `redistribute_merge`, and `fsdp2` (fsdp2_worker.py: torch's
own `fully_shard`, one fake-process-group process per rank).

Set-up: one subprocess per world size W runs
`dist.init_process_group("fake", rank=0, world_size=W)` and `init_device_mesh("cpu", shape)`;
per-rank truth comes from setting `mesh._coordinate_on_dim` and running
`distribute_tensor(..., src_data_rank=None)` (no communication), clearing the sharding
propagation caches between ranks.

Deterministic: every random choice comes from `random.Random(seed)` with a fixed seed per world
size; the output is sorted by id.

Usage: python3 placement/oracle/generate_cases.py [--out PATH]
       [--only-fsdp2 | --only-strided-redistribute | --only-merged-redistribute]
"""

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import time
import traceback

WORLD_SIZES = [1, 2, 3, 4, 6, 8]
FSDP2_WORLD_SIZES = [2, 4, 8]
SIZES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 15, 16, 18, 24]


def mesh_shapes(w):
    """Mesh shapes with product w: 1-D, 2-D, 3-D (size-1 dims included, a few of them)."""
    out = [(w,)]
    for a in range(1, w + 1):
        if w % a == 0:
            out.append((a, w // a))
    for a in range(1, w + 1):
        for b in range(1, w + 1):
            if w % (a * b) == 0:
                out.append((a, b, w // (a * b)))
    seen, res = set(), []
    for s in out:
        if s in seen:
            continue
        # keep meshes with at most one size-1 dim unless w == 1
        if w > 1 and sum(1 for x in s if x == 1) > 1:
            continue
        seen.add(s)
        res.append(s)
    return res


def worker(w, seed=0, only=None):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor._redistribute import _gen_transform_infos_non_cached
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.placement_types import _StridedShard

    dist.init_process_group("fake", rank=0, world_size=w)
    rng = random.Random(1000 + w + 100003 * seed)
    cases = []
    meshes = {s: init_device_mesh("cpu", s) for s in mesh_shapes(w)}

    def clear_caches():
        torch._C._clear_DTensor_sharding_propagator_cache()
        try:
            from torch.distributed.tensor import _redistribute as r

            r._gen_transform_infos.cache_clear()
        except Exception:
            pass

    def set_coord(mesh, coord):
        mesh._coordinate_on_dim = list(coord)
        clear_caches()

    def coords(shape):
        return list(itertools.product(*[range(s) for s in shape]))

    def rand_placements(ndim, n, allow_ss=True, allow_p=True):
        """n placements; all Partials of one list share one reduce op (PyTorch rejects mixing)."""
        pl = [rand_placement(ndim, allow_ss, allow_p) for _ in range(n)]
        op = rng.choice(["sum", "sum", "avg", "max"])
        return [Partial(op) if p.is_partial() else p for p in pl]

    def rand_placement(ndim, allow_ss=True, allow_p=True):
        kinds = ["S", "S", "R"] + (["P"] if allow_p else []) + (["SS"] if allow_ss else [])
        k = rng.choice(kinds)
        if k == "S":
            return Shard(rng.randrange(ndim))
        if k == "R":
            return Replicate()
        if k == "P":
            return Partial(rng.choice(["sum", "sum", "avg", "max"]))
        return _StridedShard(rng.randrange(ndim), split_factor=rng.choice([2, 3, 4]))

    def rand_shape(ndim, small=False):
        pool = SIZES[:10] if small else SIZES
        return [rng.choice(pool) for _ in range(ndim)]

    def ps(pl):
        return [str(p) for p in pl]

    def redistribute_case(shape, g, src, dst, name):
        """A `redistribute` case's inputs. `device_type`: CommDebugMode counts on a CPU mesh,
        where `shard_dim_alltoall` falls back to all_gather + chunk (_collective_utils.py), so
        S(i)->S(j) counts an all_gather."""
        return {
            "id": f"redistribute/w{w}/m{'x'.join(map(str, shape))}/{name}",
            "kind": "redistribute",
            "global_shape": list(g),
            "mesh_shape": list(shape),
            "src": ps(src),
            "dst": ps(dst),
            "device_type": "cpu",
        }

    def planned(mesh, g, src, dst):
        """A DTensor of `g` placed as `src` (rank 0's local shape) and torch's plan to `dst`
        (`_gen_transform_infos_non_cached`) as the case's `steps`."""
        local = distribute_tensor(
            torch.zeros(g), mesh, [Replicate() if p.is_partial() else p for p in src], src_data_rank=None
        ).to_local()
        x = DTensor.from_local(local, mesh, src, run_check=False, shape=torch.Size(g), stride=torch.zeros(g).stride())
        meta = TensorMeta(torch.Size(g), torch.zeros(g).stride(), torch.float32)
        infos = _gen_transform_infos_non_cached(
            DTensorSpec(mesh, tuple(src), tensor_meta=meta),
            DTensorSpec(mesh, tuple(dst), tensor_meta=meta),
        )
        steps = [
            {"mesh_dim": t.mesh_dim, "src": str(t.src_dst_placements[0]), "dst": str(t.src_dst_placements[1])}
            for t in infos
        ]
        return x, steps

    def strided_redistribute_cases():
        """`_S` sources and targets: torch decodes the split factors into shard orders and runs
        its graph planner (Dijkstra over sharding states), or its greedy walk when a split factor
        decodes into no order. Each case gets a fresh planner: torch caches one planner per
        (mesh, tensor meta) whose sets of target `_S` and Partial ops grow with every call.
        Its own random stream, so every other case keeps its id and values."""
        from torch.distributed.tensor._dtensor_spec import ShardOrderEntry
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache

        rs = random.Random(9000 + w + 100003 * seed)
        out = []

        def ordered(ndim, shape, mesh):
            """S / R / P(sum) placements, each tensor dim's mesh dims in a random order, written
            as torch writes an order: `_S(d, sf)` (_convert_shard_order_to_StridedShard)."""
            pl = []
            hot = rs.randrange(ndim)  # most shards on one tensor dim, so that orders arise
            for _ in shape:
                k = rs.choice(["S", "S", "S", "R", "P"])
                d = hot if rs.random() < 0.7 else rs.randrange(ndim)
                pl.append(Shard(d) if k == "S" else Replicate() if k == "R" else Partial("sum"))
            by_dim = {}
            for m, p in enumerate(pl):
                if isinstance(p, Shard):
                    by_dim.setdefault(p.dim, []).append(m)
            entries = []
            for d in sorted(by_dim):
                ms = by_dim[d]
                rs.shuffle(ms)
                if len(ms) > 1 and ms == sorted(ms) and rs.random() < 0.7:
                    ms.reverse()
                entries.append(ShardOrderEntry(tensor_dim=d, mesh_dims=tuple(ms)))
            return list(DTensorSpec._convert_shard_order_to_StridedShard(tuple(entries), tuple(pl), mesh))

        def undecodable(ndim, shape):
            """Placements with a `_S(d, sf)` whose split factor may encode no order."""
            pl = []
            for _ in shape:
                k = rs.choice(["S", "S", "R", "P", "SS"])
                d = rs.randrange(ndim)
                pl.append(
                    Shard(d) if k == "S" else Replicate() if k == "R" else Partial("sum") if k == "P"
                    else _StridedShard(d, split_factor=rs.choice([2, 3, 4, 6]))
                )
            pl[rs.randrange(len(shape))] = _StridedShard(rs.randrange(ndim), split_factor=rs.choice([2, 3, 4, 6]))
            return pl

        for shape, mesh in meshes.items():
            for i in range(max(10, 240 // len(meshes))):
                ndim = rs.choice([1, 2, 2, 3])
                g = [rs.choice(SIZES) for _ in range(ndim)]
                for _ in range(20):
                    src = ordered(ndim, shape, mesh) if len(shape) > 1 and rs.random() < 0.9 else undecodable(ndim, shape)
                    dst = ordered(ndim, shape, mesh) if len(shape) > 1 and rs.random() < 0.9 else undecodable(ndim, shape)
                    if rs.random() < 0.25:
                        dst = [Replicate() if p.is_partial() else p for p in dst]
                    if any(isinstance(p, _StridedShard) for p in src + dst):
                        break
                else:
                    src = undecodable(ndim, shape)
                case = redistribute_case(shape, g, src, dst, f"ss{i}")
                set_coord(mesh, [0] * len(shape))
                clear_redistribute_planner_cache()
                try:
                    x, case["steps"] = planned(mesh, g, src, dst)
                except Exception:  # noqa: BLE001
                    case["error"] = True
                    out.append(case)
                    continue
                # torch's own execution of its plan: the counts, or the error it raises (torch
                # plans these but its local steps refuse the shard sizes; the plan is still the
                # expected answer, and the case records where torch's execution stops).
                clear_redistribute_planner_cache()
                try:
                    with CommDebugMode() as cdm:
                        x.redistribute(mesh, dst)
                    counts = {str(k): int(v) for k, v in cdm.get_comm_counts().items() if v}
                    case["comm_counts"] = dict(sorted(counts.items()))
                except Exception as e:  # noqa: BLE001
                    tb = [f for f in traceback.extract_tb(e.__traceback__) if "torch/distributed" in f.filename]
                    if tb and tb[-1].filename.endswith("tensor/_api.py"):
                        # DTensor.redistribute's own checks refuse it before any planning.
                        del case["steps"]
                        case["error"] = True
                    else:
                        where = tb[-1].name if tb else "?"
                        case["execution_error"] = f"{type(e).__name__} in {where}"
                out.append(case)
        return out

    def merged_redistribute_cases():
        """`redistribute_merge`: which consecutive steps of torch's plan merge into one
        collective on a flattened mesh (`_optimize_transform_infos`) when every flattened mesh
        of two or more dims exists, at every rank's coordinate, and the collectives
        CommDebugMode counts when the plan runs with those meshes. Placements lean towards one
        placement on every mesh dim and dims towards multiples of the mesh size, so that merges
        arise. Its own random stream and its own named meshes."""
        from torch.distributed.tensor._redistribute import (
            _FlattenedTransformInfo,
            _optimize_transform_infos,
            clear_redistribute_planner_cache,
        )

        rm = random.Random(11000 + w + 100003 * seed)
        out = []
        for shape in [s for s in meshes if len(s) > 1]:
            names = tuple(f"m{i}" for i in range(len(shape)))
            mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
            for r in range(2, len(shape) + 1):
                for sub in itertools.combinations(names, r):
                    mesh[sub]._flatten()

            def one(ndim, hot, op):
                if rm.random() < 0.8:
                    return hot
                k = rm.choice(["S", "R", "P"])
                return Shard(rm.randrange(ndim)) if k == "S" else Replicate() if k == "R" else Partial(op)

            for i in range(max(12, 150 // len([s for s in meshes if len(s) > 1]))):
                ndim = rm.choice([1, 2, 2, 3])
                size = 1
                for k in shape:
                    size *= k
                g = [rm.choice(SIZES) if rm.random() < 0.5 else size * rm.choice([1, 2]) for _ in range(ndim)]
                op = rm.choice(["sum", "sum", "sum", "avg", "max"])
                hot_src = rm.choice([Shard(rm.randrange(ndim)), Partial(op)])
                hot_dst = rm.choice([Replicate(), Shard(rm.randrange(ndim))])
                src = [one(ndim, hot_src, op) for _ in shape]
                dst = [one(ndim, hot_dst, "sum") for _ in shape]
                dst = [Replicate() if p.is_partial() else p for p in dst]
                case = redistribute_case(shape, g, src, dst, str(i))
                case["id"] = case["id"].replace("redistribute/", "redistribute_merge/", 1)
                case["kind"] = "redistribute_merge"
                meta = TensorMeta(torch.Size(g), torch.zeros(g).stride(), torch.float32)
                per_rank = []
                try:
                    for c in coords(shape):
                        set_coord(mesh, c)
                        clear_redistribute_planner_cache()
                        infos = _gen_transform_infos_non_cached(
                            DTensorSpec(mesh, tuple(src), tensor_meta=meta),
                            DTensorSpec(mesh, tuple(dst), tensor_meta=meta),
                        )
                        opt = _optimize_transform_infos(infos, mesh, tuple(src), tuple(dst))
                        per_rank.append(
                            [list(t.original_mesh_dims) for t in opt if isinstance(t, _FlattenedTransformInfo)]
                        )
                    set_coord(mesh, [0] * len(shape))
                    clear_redistribute_planner_cache()
                    x, _ = planned(mesh, g, src, dst)
                    with CommDebugMode() as cdm:
                        x.redistribute(mesh, dst)
                except Exception:  # noqa: BLE001
                    continue  # torch refuses the pair: the `redistribute` kind covers errors
                case["merged"] = per_rank[0]
                case["comm_counts"] = dict(
                    sorted((str(k), int(v)) for k, v in cdm.get_comm_counts().items() if v)
                )
                if any(m != per_rank[0] for m in per_rank):
                    case["excluded"] = (
                        "torch decides each merge on each rank's logical shape and the ranks "
                        f"decide differently ({per_rank}); a plan here is one decision for all ranks"
                    )
                out.append(case)
        return out

    if only == "strided":
        json.dump(strided_redistribute_cases(), sys.stdout)
        return
    if only == "merged":
        json.dump(merged_redistribute_cases(), sys.stdout)
        return

    # ---- local ----
    per_mesh_local = max(3, 220 // len(meshes) // max(1, min(w, 8)) + 2)
    # Targeted: FSDP2 + TP layout [_S(d, sf), S(d)] with uneven sizes on 2-D meshes, where
    # PyTorch disagrees with itself (PyTorch issue 168134: [9] on [4, 2]).
    targeted = []
    for shape in meshes:
        if len(shape) == 2 and min(shape) > 1:
            for n in [9, 10, 11, 13, 15]:
                for sf in [2, 3]:
                    targeted.append((shape, [n], [_StridedShard(0, split_factor=sf), Shard(0)]))
    configs = []
    for shape in meshes:
        for i in range(per_mesh_local):
            ndim = rng.choice([1, 1, 2, 2, 3])
            configs.append((shape, rand_shape(ndim), rand_placements(ndim, len(shape))))
    for i, (shape, g, pl) in enumerate(configs + targeted):
        mesh = meshes[shape]
        ndim = len(g)
        for coord in coords(shape):
            set_coord(mesh, coord)
            ls, off = compute_local_shape_and_global_offset(g, mesh, pl)
            indices = []
            for d in range(ndim):
                if not any(p.is_shard() and p.dim == d or isinstance(p, _StridedShard) and p.dim == d for p in pl):
                    indices.append(None)
                    continue
                # Probe: values = index along d; every other dim gets an extent that no
                # rank's split leaves empty (12 * W), and Partial is laid out as Replicate
                # (a Partial rank holds the whole tensor; distribute_tensor would divide
                # the values for P(sum)).
                probe = [12 * w] * ndim
                probe[d] = g[d]
                view = [1] * ndim
                view[d] = g[d]
                t = torch.arange(g[d]).reshape(view).expand(probe).contiguous()
                clear_caches()
                pl_probe = [Replicate() if p.is_partial() else p for p in pl]
                loc = distribute_tensor(t, mesh, pl_probe, src_data_rank=None).to_local()
                if loc.shape[d] != ls[d]:
                    raise AssertionError(f"distribute_tensor gives {list(loc.shape)}, local shape {ls}")
                idx = loc
                for e in range(ndim):
                    if e != d:
                        idx = idx.narrow(e, 0, 1)
                indices.append([int(x) for x in idx.reshape(-1).tolist()])
            case = {
                "id": f"local/w{w}/m{'x'.join(map(str, shape))}/{i}/c{''.join(map(str, coord))}",
                "kind": "local",
                "global_shape": list(g),
                "mesh_shape": list(shape),
                "placements": ps(pl),
                "coordinate": list(coord),
                "local_shape": list(ls),
                "global_offset": list(off),
                "indices": indices,
            }
            # Uneven _StridedShard: redistribute-from-Replicate may disagree with
            # compute_local_shape_and_global_offset (PyTorch issue 168134): keep such cases apart.
            if any(isinstance(p, _StridedShard) for p in pl):
                try:
                    full = distribute_tensor(
                        torch.arange(max(1, int(torch.tensor(g).prod()))).reshape(-1)[: int(torch.tensor(g).prod())].reshape(g),
                        mesh,
                        [Replicate()] * len(shape),
                        src_data_rank=None,
                    )
                    clear_caches()
                    # Partial is kept out: the public API refuses R -> P (not an SS matter).
                    pl_np = [Replicate() if p.is_partial() else p for p in pl]
                    red = full.redistribute(mesh, pl_np).to_local()
                    direct = distribute_tensor(full.to_local(), mesh, pl_np, src_data_rank=None).to_local()
                    if tuple(red.shape) != tuple(direct.shape) or not torch.equal(red, direct):
                        case["excluded"] = (
                            "uneven _StridedShard: redistribute from Replicate gives local "
                            f"{list(red.shape)}, compute_local_shape_and_global_offset / "
                            f"distribute_tensor give {list(direct.shape)} (issue 168134); "
                            "this crate follows _split_tensor"
                        )
                except Exception as e:  # noqa: BLE001
                    msg = " ".join(str(e).split())[:160]
                    case["excluded"] = (
                        f"redistribute from Replicate raises {type(e).__name__} ({msg}) while "
                        "distribute_tensor accepts these placements (issue 168134); this crate "
                        "follows _split_tensor"
                    )
            cases.append(case)

    # ---- global_from_local ----
    set_coord(next(iter(meshes.values())), [0] * len(next(iter(meshes))))
    for shape, mesh in meshes.items():
        set_coord(mesh, [0] * len(shape))
        for i in range(max(4, 60 // len(meshes))):
            ndim = rng.choice([1, 2, 3])
            l = rand_shape(ndim)
            pl = rand_placements(ndim, len(shape))
            dt = DTensor.from_local(torch.zeros(l), mesh, pl, run_check=False)
            cases.append(
                {
                    "id": f"global_from_local/w{w}/m{'x'.join(map(str, shape))}/{i}",
                    "kind": "global_from_local",
                    "local_shape": list(l),
                    "mesh_shape": list(shape),
                    "placements": ps(pl),
                    "global_shape": list(dt.shape),
                }
            )

    # ---- view (transpose, permute) ----
    for shape, mesh in meshes.items():
        for i in range(max(4, 50 // len(meshes))):
            ndim = rng.choice([2, 3, 4])
            g = rand_shape(ndim, small=True)
            pl = rand_placements(ndim, len(shape))
            if rng.random() < 0.5:
                op = "transpose"
                args = [rng.randrange(ndim), rng.randrange(ndim)]
            else:
                op = "permute"
                args = list(range(ndim))
                rng.shuffle(args)
            set_coord(mesh, [0] * len(shape))
            case = {
                "id": f"view/w{w}/m{'x'.join(map(str, shape))}/{op}/{i}",
                "kind": "view",
                "op": op,
                "args": args,
                "global_shape": list(g),
                "mesh_shape": list(shape),
                "placements": ps(pl),
            }
            try:
                dt = distribute_tensor(torch.zeros(g), mesh, [Replicate()] * len(shape), src_data_rank=None)
                dt = DTensor.from_local(dt.to_local(), mesh, [Replicate()] * len(shape), run_check=False)
                # Build the input DTensor with the wanted placements without communication.
                spec_local = distribute_tensor(torch.zeros(g), mesh, [p if not p.is_partial() else Replicate() for p in pl], src_data_rank=None).to_local()
                x = DTensor.from_local(spec_local, mesh, pl, run_check=False, shape=torch.Size(g), stride=torch.zeros(g).stride())
                y = x.transpose(*args) if op == "transpose" else x.permute(*args)
                case["output_placements"] = ps(y.placements)
            except Exception:  # noqa: BLE001
                case["error"] = True
            cases.append(case)

    def apply_view_rule(case, pl, g, tgt, shape, strict):
        """Fills `case` with propagate_shape_and_sharding's answer: output placements (and, for
        the non-strict rule, the input redistribution), or `error` when it raises RuntimeError,
        or `error` and `excluded` when it crashes otherwise."""
        try:
            used, out = propagate_shape_and_sharding(pl, tuple(g), view_groups(tuple(g), tuple(tgt)), tuple(shape), strict_view=strict)
            case["output_placements"] = ps(out)
            if not strict:
                case["input_placements_used"] = [ps(used)]
        except RuntimeError:
            case["error"] = True
        except Exception as e:  # noqa: BLE001
            case["error"] = True
            case["excluded"] = (
                f"PyTorch's {'view' if strict else 'reshape'} rule crashes with {type(e).__name__} ({' '.join(str(e).split())[:120]}); "
                "treated as a refusal here"
            )

    def rank_disagreements(mesh, shape, g, pl, op, want, what):
        """Runs `op` on a DTensor of global shape g with placements pl on every rank (local data
        laid out without communication): the ranks whose output placements differ from `want`
        or whose op raises."""
        fails = []
        for coord in coords(shape):
            set_coord(mesh, coord)
            try:
                local = distribute_tensor(torch.zeros(g), mesh, [p if not p.is_partial() else Replicate() for p in pl], src_data_rank=None).to_local()
                x = DTensor.from_local(local, mesh, pl, run_check=False, shape=torch.Size(g), stride=torch.zeros(g).stride())
                y = op(x)
                if ps(y.placements) != want:
                    fails.append(f"rank coord {list(coord)} gives {ps(y.placements)}")
            except Exception as e:  # noqa: BLE001
                fails.append(f"rank coord {list(coord)}: {what} raises {type(e).__name__}")
        return fails

    # ---- view (Tensor.view: strict view rules) ----
    from torch.distributed.tensor._ops._view_ops import propagate_shape_and_sharding, view_groups

    def divisors(n):
        return [d for d in range(1, n + 1) if n % d == 0]

    def view_targets(g, rng=rng):
        """Flattens of a dim range, unflattens of one dim, and a random refactorisation (drawn
        from `rng`)."""
        out = []
        nd = len(g)
        for a in range(nd):
            for b in range(a + 1, nd):
                out.append(g[:a] + [prod(g[a : b + 1])] + g[b + 1 :])
        for a in range(nd):
            for d in divisors(g[a]) if g[a] > 0 else []:
                if 1 < d < g[a]:
                    out.append(g[:a] + [d, g[a] // d] + g[a + 1 :])
        total = prod(g)
        if total > 0:
            f = []
            rest = total
            for _ in range(rng.choice([1, 2, 3]) - 1):
                d = rng.choice(divisors(rest))
                f.append(d)
                rest //= d
            f.append(rest)
            out.append(f)
        out.append([total])
        return out

    def prod(xs):
        r = 1
        for x in xs:
            r *= x
        return r

    for shape, mesh in meshes.items():
        per = max(6, 260 // len(meshes))
        i = 0
        while i < per:
            ndim = rng.choice([1, 2, 2, 3, 3])
            g = [rng.choice([1, 2, 3, 4, 6, 8, 9, 12]) for _ in range(ndim)]
            tgt = rng.choice(view_targets(g))
            if rng.random() < 0.2 and len(tgt) > 1:
                tgt = list(tgt)
                tgt[rng.randrange(len(tgt))] = -1
            pl = rand_placements(ndim, len(shape))
            case = {
                "id": f"view/w{w}/m{'x'.join(map(str, shape))}/view/{i}",
                "kind": "view",
                "op": "view",
                "args": list(tgt),
                "global_shape": list(g),
                "mesh_shape": list(shape),
                "placements": ps(pl),
            }
            i += 1
            apply_view_rule(case, pl, g, tgt, shape, strict=True)
            # The rule is rank independent; the local op is not: run the view on every rank.
            if "output_placements" in case:
                fails = rank_disagreements(mesh, shape, g, pl, lambda x: x.view(*tgt), case["output_placements"], "local op")
                if fails:
                    case["excluded"] = (
                        "PyTorch's view rule accepts this view but the op disagrees on some ranks ("
                        + "; ".join(fails[:2])
                        + "); the rule's answer is kept as expected"
                    )
            cases.append(case)

    # ---- other shape ops, run as DTensor ops on every rank ----
    def op_call(op, args):
        if op == "unsqueeze":
            return lambda x: x.unsqueeze(*args)
        if op == "squeeze":
            return lambda x: x.squeeze(*args) if args else x.squeeze()
        if op == "flatten":
            return lambda x: x.flatten(*args)
        if op == "unflatten":
            return lambda x: x.unflatten(args[0], tuple(args[1:]))
        if op == "narrow":
            return lambda x: x.narrow(*args)
        if op == "select":
            return lambda x: x.select(*args)
        if op == "cat":
            return lambda x: torch.cat([x, x], args[0])
        return lambda x: torch.stack([x, x], args[0])

    def op_args(op, g):
        nd = len(g)
        if op == "unsqueeze":
            return [rng.randrange(-nd - 1, nd + 1)]
        if op == "squeeze":
            ones = [d for d in range(nd) if g[d] == 1]
            return rng.choice([[], [rng.randrange(nd)]] + ([[rng.choice(ones)]] if ones else []))
        if op == "flatten":
            a = rng.randrange(nd)
            return [a, rng.randrange(a, nd)]
        if op == "unflatten":
            d = rng.randrange(nd)
            divs = [x for x in range(1, g[d] + 1) if g[d] % x == 0]
            a = rng.choice(divs)
            return [d, a, g[d] // a] if rng.random() < 0.8 else [d, a, -1]
        if op == "narrow":
            d = rng.randrange(nd)
            start = rng.randrange(g[d] + 1)
            return [d, start, rng.randrange(g[d] - start + 1)] if rng.random() < 0.8 else [d, 0, g[d]]
        if op == "select":
            d = rng.randrange(nd)
            return [d, rng.randrange(max(1, g[d]))]
        return [rng.randrange(nd)]

    for shape, mesh in meshes.items():
        for i in range(max(10, 300 // len(meshes))):
            # narrow / select / cat are left out: their output comes from PyTorch's cost-based
            # single-dim strategy search, which this crate does not model (see README).
            op = rng.choice(["unsqueeze", "squeeze", "flatten", "unflatten", "stack"])
            ndim = rng.choice([1, 2, 2, 3])
            g = [rng.choice([1, 2, 3, 4, 6, 8]) for _ in range(ndim)]
            args = op_args(op, g)
            pl = rand_placements(ndim, len(shape), allow_ss=True)
            case = {
                "id": f"view/w{w}/m{'x'.join(map(str, shape))}/{op}/{i}",
                "kind": "view",
                "op": op,
                "args": args,
                "global_shape": list(g),
                "mesh_shape": list(shape),
                "placements": ps(pl),
            }
            outs = {}
            for coord in coords(shape):
                set_coord(mesh, coord)
                try:
                    local = distribute_tensor(torch.zeros(g), mesh, [p if not p.is_partial() else Replicate() for p in pl], src_data_rank=None).to_local()
                    x = DTensor.from_local(local, mesh, pl, run_check=False, shape=torch.Size(g), stride=torch.zeros(g).stride())
                    outs[coord] = ps(op_call(op, args)(x).placements)
                except Exception as e:  # noqa: BLE001
                    outs[coord] = f"error {type(e).__name__}"
            vals = sorted(set(map(str, outs.values())))
            first = outs[coords(shape)[0]]
            if len(vals) > 1:
                case["excluded"] = f"PyTorch gives different answers on different ranks: {vals[:3]}"
            if isinstance(first, str):
                case["error"] = True
                if "RuntimeError" not in first and "IndexError" not in first and "ValueError" not in first:
                    case["excluded"] = f"PyTorch crashes with {first[6:]}; treated as a refusal here"
            else:
                case["output_placements"] = first
            if op in ("flatten", "unflatten") and ("excluded" in case or "error" in case):
                # Where the op and the view rule disagree, keep the rule's answer (as for `view`).
                out_shape = list(op_call(op, args)(torch.zeros(g)).shape)
                try:
                    _, rule_out = propagate_shape_and_sharding(pl, tuple(g), view_groups(tuple(g), tuple(out_shape)), tuple(shape), strict_view=True)
                    rule = ps(rule_out)
                except Exception:  # noqa: BLE001
                    rule = None
                if rule is not None:
                    case.pop("error", None)
                    case["output_placements"] = rule
                    case["excluded"] = (
                        "PyTorch's view rule accepts this view but the op fails or disagrees on some ranks "
                        f"({'; '.join(vals[:2])}); the rule's answer is kept as expected"
                    )
            cases.append(case)

    # ---- redistribute (S, R, P: the default greedy planner) ----
    for shape, mesh in meshes.items():
        for i in range(max(6, 160 // len(meshes))):
            ndim = rng.choice([1, 2, 3])
            g = rand_shape(ndim)
            src = [rand_placement(ndim, allow_ss=False) for _ in shape]
            # keep partial ops of src consistent (sum only) so the placements are legal
            src = [Partial("sum") if p.is_partial() else p for p in src]
            dst = [rand_placement(ndim, allow_ss=False) for _ in shape]
            dst = [Partial("sum") if p.is_partial() else p for p in dst]
            case = redistribute_case(shape, g, src, dst, str(i))
            set_coord(mesh, [0] * len(shape))
            try:
                x, steps = planned(mesh, g, src, dst)
                with CommDebugMode() as cdm:
                    x.redistribute(mesh, dst)
                counts = {str(k): int(v) for k, v in cdm.get_comm_counts().items() if v}
                case["steps"] = steps
                case["comm_counts"] = dict(sorted(counts.items()))
            except Exception:  # noqa: BLE001
                case["error"] = True
            cases.append(case)

    # ---- narrow / select / cat / split: ops whose placements come from the single-dim
    # strategy search (_ops/_tensor_ops.py + single_dim_strategy.py + _sharding_prop.py) ----
    # A separate random stream, so that every case above keeps its id and its values.
    rng2 = random.Random(7000 + w + 100003 * seed)
    sp = DTensor._op_dispatcher.sharding_propagator
    seen = []
    orig_prop = sp.propagate_op_sharding_non_cached

    def spy(schema):
        r = orig_prop(schema)
        seen.append(r)
        return r

    sp.propagate_op_sharding_non_cached = spy

    def strat_args(op, g):
        nd = len(g)
        d = rng2.randrange(nd)
        dn = d - nd if rng2.random() < 0.2 else d  # sometimes a negative dim
        n = g[d]
        if op == "narrow":
            if rng2.random() < 0.25:
                return [dn, 0, n]
            start = rng2.randrange(n + 1)
            return [dn, start, rng2.randrange(n - start + 1)]
        if op == "select":
            return [dn, rng2.randrange(-n, n) if n > 0 else 0]
        if op == "cat":
            return [dn]
        # split: [dim, split_size] (torch.split with an int) or [dim, s0, s1, ..] (sizes)
        if n > 0 and rng2.random() < 0.4:
            sizes, rest = [], n
            while rest > 0:
                s = rng2.randrange(0, rest + 1)
                sizes.append(s)
                rest -= s
                if len(sizes) >= 3:
                    sizes.append(rest)
                    break
            return [dn] + sizes
        return [dn, rng2.randrange(1, max(1, n) + 2)]

    def rule_answer(seen, op, pl):
        """(output placements, input placements used) of the OutputSharding PyTorch chose."""
        r = seen[-1]
        o = r.output_spec
        out = [ps(t.placements) for t in o] if isinstance(o, (tuple, list)) else ps(o.placements)
        if r.needs_redistribute and r.redistribute_schema is not None:
            used = [ps(t.placements) for t in r.redistribute_schema.args_spec]
        else:
            used = [ps(pl)] * (2 if op == "cat" else 1)
        return out, used

    def strat_call(op, args):
        if op == "narrow":
            return lambda x: x.narrow(*args)
        if op == "select":
            return lambda x: x.select(*args)
        if op == "cat":
            return lambda x: torch.cat([x, x], args[0])
        if len(args) == 2:
            return lambda x: torch.split(x, args[1], args[0])
        return lambda x: torch.split(x, list(args[1:]), args[0])

    for shape, mesh in meshes.items():
        for i in range(max(12, 320 // len(meshes))):
            op = rng2.choice(["narrow", "select", "cat", "split"])
            ndim = rng2.choice([1, 2, 2, 3])
            g = [rng2.choice([1, 2, 3, 4, 5, 6, 8, 9]) for _ in range(ndim)]
            if rng2.random() < 0.04:
                g = [0] if rng2.random() < 0.5 else [0] + g[1:]
                ndim = len(g)
            args = strat_args(op, g)
            pl = [rand_placement(ndim, True, True) for _ in shape]
            pop = rng2.choice(["sum", "sum", "avg", "max"])
            pl = [Partial(pop) if p.is_partial() else p for p in pl]
            case = {
                "id": f"view/w{w}/m{'x'.join(map(str, shape))}/{op}/{i}",
                "kind": "view",
                "op": op,
                "args": args,
                "global_shape": list(g),
                "mesh_shape": list(shape),
                "placements": ps(pl),
            }
            outs = {}
            for coord in coords(shape):
                set_coord(mesh, coord)
                try:
                    local = distribute_tensor(torch.zeros(g), mesh, [p if not p.is_partial() else Replicate() for p in pl], src_data_rank=None).to_local()
                    x = DTensor.from_local(local, mesh, pl, run_check=False, shape=torch.Size(g), stride=torch.zeros(g).stride())
                    seen.clear()
                    y = strat_call(op, args)(x)
                    out = [ps(t.placements) for t in y] if isinstance(y, (tuple, list)) else ps(y.placements)
                    outs[coord] = (out, rule_answer(seen, op, pl)[1] if seen else None)
                except Exception as e:  # noqa: BLE001
                    if seen:
                        # The strategy was chosen; the op failed afterwards (redistributing the
                        # input or running the local op): keep the strategy's answer apart.
                        out, used = rule_answer(seen, op, pl)
                        msg = " ".join(str(e).split())[:100]
                        outs[coord] = ("fails", out, used, f"{type(e).__name__} ({msg})")
                    else:
                        outs[coord] = f"error {type(e).__name__}"
            vals = sorted(set(json.dumps(v) for v in outs.values()))
            first = outs[coords(shape)[0]]
            if len(vals) > 1:
                case["excluded"] = f"PyTorch gives different answers on different ranks: {vals[:3]}"
            if isinstance(first, str):
                case["error"] = True
                if "RuntimeError" not in first and "IndexError" not in first and "ValueError" not in first:
                    case["excluded"] = f"PyTorch crashes with {first[6:]}; treated as a refusal here"
            elif first[0] == "fails":
                case["output_placements"] = first[1]
                case["input_placements_used"] = first[2]
                case["excluded"] = (
                    f"PyTorch's strategy picks {first[1]} (inputs redistributed to {first[2]}) but the op "
                    f"then raises {first[3]}; the strategy's answer is kept as expected"
                )
            else:
                case["output_placements"] = first[0]
                if first[1] is not None:
                    case["input_placements_used"] = first[1]
            cases.append(case)
    sp.propagate_op_sharding_non_cached = orig_prop

    # ---- reshape: the non-strict view rule (aten.reshape / aten.view_copy), its own random
    # stream after every other case so those keep their ids and values ----
    rr = random.Random(7000 + w + 100003 * seed)

    def rr_placements(g, n):
        pl = []
        for _ in range(n):
            k = rr.choice(["S", "S", "S", "R", "P", "SS"])
            d = rr.randrange(len(g))
            if k == "S":
                pl.append(Shard(d))
            elif k == "R":
                pl.append(Replicate())
            elif k == "P":
                pl.append(Partial("sum"))
            else:
                pl.append(_StridedShard(d, split_factor=rr.choice([2, 3, 4, 6])))
        return pl

    def rr_target(g):
        out = view_targets(g, rr)
        t = list(rr.choice(out))
        if rr.random() < 0.15 and len(t) > 1:
            t[rr.randrange(len(t))] = -1
        return t

    for shape, mesh in meshes.items():
        per = max(8, 150 // len(meshes))
        for i in range(per):
            ndim = rr.choice([1, 2, 2, 3, 3])
            g = [rr.choice([1, 2, 3, 4, 5, 6, 8, 9, 12]) for _ in range(ndim)]
            pl = rr_placements(g, len(shape))
            if rr.random() < 0.3 and ndim >= 2:
                # A reshape back of a flatten: the strict view's _StridedShard output as input.
                try:
                    flat = [prod(g)]
                    _, mid = propagate_shape_and_sharding(pl, tuple(g), view_groups(tuple(g), tuple(flat)), tuple(shape), strict_view=True)
                    pl, tgt, g = list(mid), list(g), flat
                except Exception:  # noqa: BLE001
                    tgt = rr_target(g)
            else:
                tgt = rr_target(g)
            case = {
                "id": f"view/w{w}/m{'x'.join(map(str, shape))}/reshape/{i}",
                "kind": "view",
                "op": "reshape",
                "args": list(tgt),
                "global_shape": list(g),
                "mesh_shape": list(shape),
                "placements": ps(pl),
            }
            clear_caches()
            apply_view_rule(case, pl, g, tgt, shape, strict=False)
            # The op that reaches this rule as a DTensor op (eager x.reshape decomposes to the
            # strict aten.view): aten.view_copy, on every rank.
            if "output_placements" in case:
                fails = rank_disagreements(
                    mesh, shape, g, pl, lambda x: torch.ops.aten.view_copy.default(x, tgt), case["output_placements"], "aten.view_copy"
                )
                if fails:
                    case["excluded"] = (
                        "PyTorch's reshape rule accepts this reshape but aten.view_copy disagrees on some ranks ("
                        + "; ".join(fails[:2])
                        + "); the rule's answer is kept as expected"
                    )
            cases.append(case)

    cases.extend(strided_redistribute_cases())
    cases.extend(merged_redistribute_cases())
    json.dump(cases, sys.stdout)


def fsdp2_cases(seed):
    """The `fsdp2` cases: fsdp2_worker.py once per rank of each world size, two at a time."""
    cases = []
    # FSDP2 fully_shard: one process per rank (fsdp2_worker.py), two at a time.
    here = os.path.dirname(os.path.abspath(__file__))
    jobs = [(w, r) for w in FSDP2_WORLD_SIZES for r in range(w)]
    for i in range(0, len(jobs), 2):
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.join(here, "fsdp2_worker.py"), str(w), str(r), str(seed)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for w, r in jobs[i : i + 2]
        ]
        for (w, r), proc in zip(jobs[i : i + 2], procs):
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"fsdp2_worker.py {w} {r} failed")
            cases.extend(json.loads(out))
    # fully_shard checks only its own rank's TP-local size for evenness: a parameter some ranks
    # accept and others refuse fails the job; this crate refuses it on every rank.
    by_config = {}
    for c in cases:
        if c["kind"] == "fsdp2":
            by_config.setdefault(c["id"].rsplit("/", 1)[0], []).append(c)
    for group in by_config.values():
        if len({bool(c.get("error")) for c in group}) > 1:
            for c in group:
                c["excluded"] = (
                    "fully_shard raises on some ranks and accepts on others (uneven TP-local size on a "
                    "dim > 0: each rank checks its own); this crate refuses on every rank"
                )

    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases.json"))
    ap.add_argument("--worker", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0, help="another seed gives another file of fresh cases")
    ap.add_argument(
        "--only-fsdp2",
        action="store_true",
        help="regenerate the fsdp2 cases only, keeping the other cases of the --out file",
    )
    ap.add_argument(
        "--only-strided-redistribute",
        action="store_true",
        help="regenerate the redistribute cases with _StridedShard only (ids .../ss<i>), keeping the others",
    )
    ap.add_argument(
        "--only-merged-redistribute",
        action="store_true",
        help="regenerate the redistribute_merge cases only, keeping the others",
    )
    a = ap.parse_args()
    only = "strided" if a.only_strided_redistribute else "merged" if a.only_merged_redistribute else None
    if a.worker is not None:
        worker(a.worker, a.seed, only)
        return
    import torch

    t0 = time.time()
    cases = []
    def strided(c):
        return c["kind"] == "redistribute" and c["id"].rsplit("/", 1)[-1].startswith("ss")

    if a.only_fsdp2:
        with open(a.out) as f:
            cases = [c for c in json.load(f)["cases"] if c["kind"] != "fsdp2"]
    if only is not None:
        keep = (lambda c: not strided(c)) if only == "strided" else (lambda c: c["kind"] != "redistribute_merge")
        with open(a.out) as f:
            cases = [c for c in json.load(f)["cases"] if keep(c)]
    extra = {"strided": ["--only-strided-redistribute"], "merged": ["--only-merged-redistribute"]}.get(only, [])
    for w in [] if a.only_fsdp2 else WORLD_SIZES:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", str(w), "--seed", str(a.seed)] + extra,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        got = json.loads(out)
        print(f"world size {w}: {len(got)} cases", file=sys.stderr)
        cases.extend(got)
    if only is None:
        cases.extend(fsdp2_cases(a.seed))
    print(f"fsdp2: {sum(c['kind'] == 'fsdp2' for c in cases)} cases", file=sys.stderr)
    cases.sort(key=lambda c: c["id"])
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate ids"
    doc = {"format": "placement-cases/1", "torch_version": torch.__version__, "cases": cases}
    with open(a.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    kinds = {}
    for c in cases:
        kinds[c["kind"]] = kinds.get(c["kind"], 0) + 1
    print(f"{len(cases)} cases {kinds} in {time.time() - t0:.1f} s -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
