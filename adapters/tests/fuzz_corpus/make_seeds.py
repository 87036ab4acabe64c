#!/usr/bin/env python3
"""Writes the seed corpus of adapters/tests/fuzz_targets.rs (committed; rerun only to change the
seeds): per parser a directory of inputs the fuzz targets mutate.

- safetensors/: small hand-made files (the format is 8-byte LE header length + JSON header +
  data), one per header feature: two tensors of two dtypes, `__metadata__`, a zero-size tensor,
  a header padded with spaces.
- index/: the index.json of the sharded fixture (the target reads it with that fixture's shards).
- config/: the config.json of one fixture per config style (`<fixture>.json`).
- dcp_metadata/: torch 2.15's `.metadata` of three DCP fixtures (`<fixture>.metadata`).
Run: python3 adapters/tests/fuzz_corpus/make_seeds.py (standard library only).
"""

import json
import shutil
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIX = HERE.parents[2] / "conformance" / "fixtures"


def st(header: dict, data: bytes, pad: int = 0) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    return struct.pack("<Q", len(h)) + h + data


def main() -> None:
    for d in ["safetensors", "index", "config", "dcp_metadata"]:
        shutil.rmtree(HERE / d, ignore_errors=True)
        (HERE / d).mkdir()
    s = HERE / "safetensors"
    (s / "two_tensors.safetensors").write_bytes(st({
        "model.layers.0.mlp.gate.weight": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
        "model.layers.0.mlp.experts.0.up_proj.weight": {"dtype": "F32", "shape": [1, 3], "data_offsets": [12, 24]},
    }, bytes(range(24))))
    (s / "metadata.safetensors").write_bytes(st({
        "__metadata__": {"format": "pt"},
        "lm_head.weight": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]},
    }, b"\x00\x3c" * 4))
    (s / "zero_size.safetensors").write_bytes(st({
        "a": {"dtype": "U8", "shape": [0, 5], "data_offsets": [0, 0]},
        "b": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
    }, struct.pack("<q", -1)))
    (s / "padded.safetensors").write_bytes(st({
        "x": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]},
    }, struct.pack("<d", 1.5), pad=7))
    i = HERE / "index"
    shutil.copy(FIX / "qwen3_moe_tiny_sharded" / "model.safetensors.index.json", i / "sharded.json")
    for f in ["qwen3_moe_tiny", "qwen3_vl_moe_tiny", "deepseek_v3_tiny", "gpt_oss_tiny", "step3p5_tiny", "qwen3_next_tiny"]:
        shutil.copy(FIX / f / "config.json", HERE / "config" / f"{f}.json")
    for f in ["tp_w2", "fsdp2_w2", "views_w1"]:
        shutil.copy(FIX / "dcp" / f / "ckpt" / ".metadata", HERE / "dcp_metadata" / f"{f}.metadata")


if __name__ == "__main__":
    main()
