//! The `.metadata` file of a torch DCP saved by `FileSystemWriter` (`dcp.save(sd, checkpoint_id=
//! DIR)`), read without running it and written so that stock `torch.distributed.checkpoint.load`
//! reads it.
//!
//! Source: `torch/distributed/checkpoint/metadata.py` (`Metadata`, `TensorStorageMetadata`,
//! `BytesStorageMetadata`, `TensorProperties` with its `__getstate__` tuple `(dtype, layout,
//! requires_grad, _MEM_FORMAT_ENCODING, pin_memory[, strides])`, `ChunkStorageMetadata`,
//! `MetadataIndex`, `StorageMeta`) and `filesystem.py` (`_StorageInfo`, whose `__getstate__` drops
//! `None` fields; `finish` pickles `Metadata` with `pickle.dump`). Dataclasses pickle as
//! `cls.__new__(cls)` + `BUILD(dict of fields)`; `torch.Size` as `REDUCE(torch.Size, (tuple,))`;
//! dtypes as the globals `torch.<name>`.

use super::pickle::{self, Pickle, View};
use super::pickler::Pickler;
use placement::chunks::ChunkBox;
use safetensors::Dtype;
use std::collections::BTreeMap;

/// Module of the DCP metadata classes.
pub const MD: &str = "torch.distributed.checkpoint.metadata";
/// Module of `_StorageInfo`.
pub const FS: &str = "torch.distributed.checkpoint.filesystem";

/// The metadata classes a `.metadata` pickle may name (besides [`TORCH_DTYPES`] and
/// `torch.Size`): what torch 2.4 - 2.15's `FileSystemWriter` writes. `pathlib` paths appear as
/// `StorageMeta.checkpoint_id`.
pub const METADATA_GLOBALS: &[(&str, &str)] = &[
    (MD, "Metadata"),
    (MD, "TensorStorageMetadata"),
    (MD, "BytesStorageMetadata"),
    (MD, "TensorProperties"),
    (MD, "ChunkStorageMetadata"),
    (MD, "MetadataIndex"),
    (MD, "StorageMeta"),
    (MD, "_MEM_FORMAT_ENCODING"),
    (FS, "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
];

/// torch dtype global names (`torch.<name>`) and the dtype each stands for.
pub const TORCH_DTYPES: &[(&str, Dtype)] = &[
    ("bool", Dtype::BOOL),
    ("uint8", Dtype::U8),
    ("int8", Dtype::I8),
    ("int16", Dtype::I16),
    ("short", Dtype::I16),
    ("uint16", Dtype::U16),
    ("int32", Dtype::I32),
    ("int", Dtype::I32),
    ("uint32", Dtype::U32),
    ("int64", Dtype::I64),
    ("long", Dtype::I64),
    ("uint64", Dtype::U64),
    ("float16", Dtype::F16),
    ("half", Dtype::F16),
    ("bfloat16", Dtype::BF16),
    ("float32", Dtype::F32),
    ("float", Dtype::F32),
    ("float64", Dtype::F64),
    ("double", Dtype::F64),
    ("complex64", Dtype::C64),
    ("float8_e4m3fn", Dtype::F8_E4M3),
    ("float8_e5m2", Dtype::F8_E5M2),
    ("float8_e4m3fnuz", Dtype::F8_E4M3FNUZ),
    ("float8_e5m2fnuz", Dtype::F8_E5M2FNUZ),
    ("float8_e8m0fnu", Dtype::F8_E8M0),
];

/// Other torch dtypes that may appear (refused with their name: no byte layout here).
const OTHER_TORCH_DTYPES: &[&str] = &[
    "complex32",
    "complex128",
    "cfloat",
    "cdouble",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "float4_e2m1fn_x2",
];

/// The torch name of `dtype` (`bfloat16`, ...), as the metadata writes it.
pub fn torch_dtype_name(dtype: Dtype) -> Option<&'static str> {
    TORCH_DTYPES
        .iter()
        .find(|(n, d)| {
            *d == dtype && !matches!(*n, "short" | "int" | "long" | "half" | "float" | "double")
        })
        .map(|(n, _)| *n)
}

/// The dtype of the global `torch.<name>`; errors name unsupported ones.
pub fn dtype_of_global(module: &str, name: &str) -> Result<Dtype, String> {
    if module == "torch" {
        if let Some((_, d)) = TORCH_DTYPES.iter().find(|(n, _)| *n == name) {
            return Ok(*d);
        }
    }
    Err(format!(
        "dtype {module}.{name} is not supported (no safetensors equivalent)"
    ))
}

/// Whether `module.name` may appear in a `.metadata` pickle.
pub fn metadata_global_allowed(module: &str, name: &str) -> bool {
    METADATA_GLOBALS.contains(&(module, name))
        || (module == "torch"
            && (TORCH_DTYPES.iter().any(|(n, _)| *n == name) || OTHER_TORCH_DTYPES.contains(&name)))
}

/// One entry of `state_dict_metadata`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// `TensorStorageMetadata`: dtype, global size, saved chunks.
    Tensor(TensorItem),
    /// `BytesStorageMetadata`: a non-tensor value (its `torch.save` bytes are stored as they are).
    Bytes,
}

/// A tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorItem {
    /// `properties.dtype`.
    pub dtype: Dtype,
    /// `size`: the global shape.
    pub size: Vec<usize>,
    /// `chunks`: the saved boxes.
    pub chunks: Vec<ChunkBox>,
}

/// Where one item's bytes are (`_StorageInfo`): a byte range of a file of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageInfo {
    /// File name relative to the checkpoint directory (`__0_0.distcp`).
    pub relative_path: String,
    /// First byte of the item in the file.
    pub offset: u64,
    /// Length of the item in bytes.
    pub length: u64,
    /// Stream transforms (compression, ... extensions); empty for torch's default writer.
    pub transforms: Vec<String>,
}

/// Key of `storage_data` (`MetadataIndex`): fqn and chunk offset (`None` for bytes items).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorageIndex {
    /// Fully qualified name.
    pub fqn: String,
    /// The chunk's `offsets`.
    pub offset: Option<Vec<usize>>,
}

/// The parsed `Metadata`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TorchMetadata {
    /// `state_dict_metadata`, by fqn.
    pub items: BTreeMap<String, Item>,
    /// `storage_data`: where each chunk (tensor) or value (bytes) is stored.
    pub storage: BTreeMap<StorageIndex, StorageInfo>,
    /// `version` (`"1.0.0"` for torch 2.5 - 2.15), if recorded.
    pub version: Option<String>,
}

fn field<'a>(state: &View<'a>, name: &str, what: &str) -> Result<View<'a>, String> {
    state
        .get(name)?
        .ok_or_else(|| format!("{what} has no field '{name}'"))
}

/// `cls.__new__` + `BUILD` of the class `name` of module `module`: its state.
fn object<'a>(
    v: &View<'a>,
    module: &str,
    name: &str,
    what: &str,
) -> Result<Option<View<'a>>, String> {
    match v.call()? {
        Some(c) if c.module == module && c.name == name => Ok(c.state),
        _ => Err(format!("{what} is {}, not a {module}.{name}", v.kind())),
    }
}

/// `torch.Size(seq)` (or a plain tuple / list) as a list of sizes.
fn size(v: &View, what: &str) -> Result<Vec<usize>, String> {
    let seq = match v.call()? {
        Some(c) if (c.module, c.name) == ("torch", "Size") => match c.args.first() {
            Some(a) => a.seq(),
            None => Ok(Vec::new()),
        },
        Some(_) => Err(format!("{what} is {}, not a torch.Size", v.kind())),
        None => v.seq(),
    }
    .map_err(|e| format!("{what}: {e}"))?;
    seq.iter()
        .map(|x| x.usize().map_err(|e| format!("{what}: {e}")))
        .collect()
}

fn dtype_of(v: &View, what: &str) -> Result<Dtype, String> {
    match v.global() {
        Some((m, n)) => dtype_of_global(m, n).map_err(|e| format!("{what}: {e}")),
        None => Err(format!("{what}: dtype is {}, not a torch dtype", v.kind())),
    }
}

fn properties_dtype(v: &View, fqn: &str) -> Result<Dtype, String> {
    let what = format!("tensor '{fqn}': properties");
    let state =
        object(v, MD, "TensorProperties", &what)?.ok_or_else(|| format!("{what}: no state"))?;
    match state.node() {
        // torch >= 2.1: __getstate__ tuple (dtype, layout, requires_grad, mem format, pin[, strides])
        pickle::Node::Tuple(_) => {
            let t = state.seq()?;
            let d = t.first().ok_or_else(|| format!("{what}: empty state"))?;
            dtype_of(d, &what)
        }
        // a plain dataclass state
        _ => dtype_of(&field(&state, "dtype", &what)?, &what),
    }
}

fn parse_item(fqn: &str, v: &View) -> Result<Item, String> {
    let what = format!("tensor '{fqn}'");
    match v.call()? {
        Some(c) if c.module == MD && c.name == "BytesStorageMetadata" => Ok(Item::Bytes),
        Some(c) if c.module == MD && c.name == "TensorStorageMetadata" => {
            let st = c
                .state
                .ok_or_else(|| format!("{what}: TensorStorageMetadata without state"))?;
            let dtype = properties_dtype(&field(&st, "properties", &what)?, fqn)?;
            let size = size(&field(&st, "size", &what)?, &format!("{what}: size"))?;
            let mut chunks = Vec::new();
            for (i, c) in field(&st, "chunks", &what)?.seq()?.iter().enumerate() {
                let cw = format!("{what}: chunk {i}");
                let s = object(c, MD, "ChunkStorageMetadata", &cw)?
                    .ok_or_else(|| format!("{cw}: no state"))?;
                chunks.push(ChunkBox {
                    offsets: size_of_field(&s, "offsets", &cw)?,
                    sizes: size_of_field(&s, "sizes", &cw)?,
                });
            }
            Ok(Item::Tensor(TensorItem {
                dtype,
                size,
                chunks,
            }))
        }
        _ => Err(format!(
            "{what}: entry is {}, not a tensor or bytes storage metadata",
            v.kind()
        )),
    }
}

fn size_of_field(s: &View, name: &str, what: &str) -> Result<Vec<usize>, String> {
    size(&field(s, name, what)?, &format!("{what}: {name}"))
}

fn parse_storage(k: &View, v: &View) -> Result<(StorageIndex, StorageInfo), String> {
    let ks = object(k, MD, "MetadataIndex", "a storage_data key")?
        .ok_or_else(|| "a storage_data key has no state".to_string())?;
    let fqn = field(&ks, "fqn", "MetadataIndex")?.str()?.to_string();
    let what = format!("storage_data['{fqn}']");
    let offset = match ks.get("offset")? {
        None => None,
        Some(o) if o.is_none() => None,
        Some(o) => Some(size(&o, &format!("{what}: offset"))?),
    };
    let vs = object(v, FS, "_StorageInfo", &what)?.ok_or_else(|| format!("{what}: no state"))?;
    let offset_b = field(&vs, "offset", &what)?
        .usize()
        .map_err(|e| format!("{what}: offset: {e}"))?;
    let length = field(&vs, "length", &what)?
        .usize()
        .map_err(|e| format!("{what}: length: {e}"))?;
    let transforms = match vs.get("transform_descriptors")? {
        None => Vec::new(),
        Some(t) if t.is_none() => Vec::new(),
        Some(t) => t
            .seq()?
            .iter()
            .map(|x| x.str().map(str::to_string))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{what}: transform_descriptors: {e}"))?,
    };
    Ok((
        StorageIndex { fqn, offset },
        StorageInfo {
            relative_path: field(&vs, "relative_path", &what)?.str()?.to_string(),
            offset: offset_b as u64,
            length: length as u64,
            transforms,
        },
    ))
}

/// Parses a `.metadata` pickle. Errors (one line, no file name: the caller adds it): a global
/// that is not one of [`METADATA_GLOBALS`] / torch dtypes ("global 'collections.Counter' is not
/// one a DCP .metadata holds"), malformed pickle, a root that is not `Metadata`, entries of the
/// wrong kind, sizes that are not non-negative integers, an unsupported dtype.
pub fn parse_metadata(data: &[u8]) -> Result<TorchMetadata, String> {
    let p: Pickle = pickle::parse(data, &metadata_global_allowed).map_err(|e| {
        if e.contains("is not allowed") {
            format!(
                "{}: a DCP .metadata holds only torch.distributed.checkpoint classes, torch.Size, torch dtypes and pathlib paths",
                e.replace("is not allowed", "is not one a DCP .metadata holds")
            )
        } else {
            e
        }
    })?;
    let root = View::root(&p);
    let st = object(&root, MD, "Metadata", "the pickled root")?
        .ok_or_else(|| "Metadata has no state".to_string())?;
    let mut items = BTreeMap::new();
    for (k, v) in field(&st, "state_dict_metadata", "Metadata")?.items()? {
        let fqn = k
            .str()
            .map_err(|e| format!("state_dict_metadata key: {e}"))?;
        items.insert(fqn.to_string(), parse_item(fqn, &v)?);
    }
    let mut storage = BTreeMap::new();
    let sd = field(&st, "storage_data", "Metadata")?;
    if sd.is_none() {
        return Err("Metadata.storage_data is None (not written by FileSystemWriter)".into());
    }
    for (k, v) in sd
        .items()
        .map_err(|e| format!("Metadata.storage_data: {e}"))?
    {
        let (i, s) = parse_storage(&k, &v)?;
        storage.insert(i, s);
    }
    let version = match st.get("version")? {
        Some(v) if !v.is_none() => Some(v.str()?.to_string()),
        _ => None,
    };
    Ok(TorchMetadata {
        items,
        storage,
        version,
    })
}

/// `torch.Size(dims)`.
fn put_size(p: &mut Pickler, dims: &[usize]) {
    p.call("torch", "Size", |p| {
        p.int_tuple(dims);
    });
}

/// Writes `meta` as the pickle torch's `FileSystemWriter.finish` would (protocol 2): `Metadata`
/// with `state_dict_metadata`, `planner_data` (`{fqn: (fqn,)}`, what the default planner's
/// flattening records for a flat state dict), `storage_data`, `storage_meta` (`StorageMeta` with
/// no checkpoint id) and `version`. `TensorProperties` state is the 5-tuple every torch 2.x reads.
pub fn write_metadata(meta: &TorchMetadata) -> Result<Vec<u8>, String> {
    let mut p = Pickler::new(2);
    p.object(MD, "Metadata");
    let mut err = None;
    p.dict(|p| {
        p.str("state_dict_metadata").dict(|p| {
            for (fqn, item) in &meta.items {
                p.str(fqn);
                match item {
                    Item::Bytes => {
                        p.object(MD, "BytesStorageMetadata");
                    }
                    Item::Tensor(t) => {
                        let Some(dn) = torch_dtype_name(t.dtype) else {
                            err = Some(format!(
                                "tensor '{fqn}': dtype {} has no torch name",
                                t.dtype
                            ));
                            p.none();
                            continue;
                        };
                        p.object(MD, "TensorStorageMetadata").dict(|p| {
                            p.str("properties")
                                .object(MD, "TensorProperties")
                                .tuple(|p| {
                                    p.global("torch", dn);
                                    p.call("torch.serialization", "_get_layout", |p| {
                                        p.str("torch.strided");
                                    });
                                    p.bool(false);
                                    p.call(MD, "_MEM_FORMAT_ENCODING", |p| {
                                        p.int(0);
                                    });
                                    p.bool(false);
                                });
                            p.build();
                            p.str("size");
                            put_size(p, &t.size);
                            p.str("chunks").list(|p| {
                                for c in &t.chunks {
                                    p.object(MD, "ChunkStorageMetadata").dict(|p| {
                                        p.str("offsets");
                                        put_size(p, &c.offsets);
                                        p.str("sizes");
                                        put_size(p, &c.sizes);
                                    });
                                    p.build();
                                }
                            });
                        });
                        p.build();
                    }
                }
            }
        });
        p.str("planner_data").dict(|p| {
            for fqn in meta.items.keys() {
                p.str(fqn).tuple(|p| {
                    p.str(fqn);
                });
            }
        });
        p.str("storage_data").dict(|p| {
            for (i, s) in &meta.storage {
                p.object(MD, "MetadataIndex").dict(|p| {
                    p.str("fqn").str(&i.fqn);
                    if let Some(o) = &i.offset {
                        p.str("offset");
                        put_size(p, o);
                    }
                    p.str("index").none();
                });
                p.build();
                p.object(FS, "_StorageInfo").dict(|p| {
                    p.str("relative_path").str(&s.relative_path);
                    p.str("offset").uint(s.offset);
                    p.str("length").uint(s.length);
                });
                p.build();
            }
        });
        p.str("storage_meta").object(MD, "StorageMeta").dict(|p| {
            p.str("checkpoint_id").none();
            p.str("save_id").none();
            p.str("load_id").none();
            p.str("modules").list(|_| {});
        });
        p.build();
        p.str("version")
            .str(meta.version.as_deref().unwrap_or("1.0.0"));
    });
    p.build();
    match err {
        Some(e) => Err(e),
        None => Ok(p.finish()),
    }
}
