//! One tensor item of a `.distcp` file: a complete `torch.save` archive (a zip, entries stored
//! uncompressed) holding `{archive}/data.pkl`, the raw storage `{archive}/data/{key}` and small
//! records (`version`, `byteorder`, `.format_version`, `.storage_alignment`,
//! `.data/serialization_id`). Read without running the pickle; written so that
//! `torch.load(..., weights_only=True)` (what `FileSystemReader.read_data` calls) accepts it.
//!
//! Source: `torch/serialization.py` (`_save`: `persistent_id` gives `('storage', storage_type, key,
//! location, numel)`; `_load` / `_weights_only_unpickler`), `torch/_utils.py`
//! (`_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks)`;
//! `_rebuild_tensor_v3(..., dtype)` with an `UntypedStorage` counted in bytes, for dtypes without a
//! legacy storage class: uint16/32/64, float8).

use super::metadata::{dtype_of_global, TORCH_DTYPES};
use super::pickle::{self, View};
use super::pickler::Pickler;
use crate::tensor::dtype_size;
use safetensors::Dtype;
use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

/// Legacy typed storage classes (`torch.<Name>Storage`) and their element dtype.
pub const STORAGE_CLASSES: &[(&str, Dtype)] = &[
    ("BoolStorage", Dtype::BOOL),
    ("ByteStorage", Dtype::U8),
    ("CharStorage", Dtype::I8),
    ("ShortStorage", Dtype::I16),
    ("IntStorage", Dtype::I32),
    ("LongStorage", Dtype::I64),
    ("HalfStorage", Dtype::F16),
    ("BFloat16Storage", Dtype::BF16),
    ("FloatStorage", Dtype::F32),
    ("DoubleStorage", Dtype::F64),
    ("ComplexFloatStorage", Dtype::C64),
];

/// Globals a tensor item's `data.pkl` may name: the rebuild functions, `OrderedDict` (the empty
/// backward hooks), `torch.storage.UntypedStorage`, the storage classes and torch dtypes.
pub fn item_global_allowed(module: &str, name: &str) -> bool {
    match module {
        "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_tensor_v3"),
        "collections" => name == "OrderedDict",
        "torch.storage" => name == "UntypedStorage",
        "torch" => {
            STORAGE_CLASSES.iter().any(|(n, _)| *n == name)
                || TORCH_DTYPES.iter().any(|(n, _)| *n == name)
        }
        _ => false,
    }
}

/// Where a decoded item's elements are, relative to the start of the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Tensor shape.
    pub sizes: Vec<usize>,
    /// Strides in elements (torch never writes negative strides).
    pub strides: Vec<usize>,
    /// Element index of the tensor's first element in its storage.
    pub storage_offset: usize,
    /// Elements in the storage record.
    pub storage_numel: usize,
    /// Byte offset of the storage record's data from the start of the item.
    pub data_start: usize,
    /// CRC-32 the zip directory records for the storage record.
    pub crc32: u32,
}

impl ItemTensor {
    /// Number of elements of the tensor.
    pub fn numel(&self) -> usize {
        self.sizes.iter().product()
    }
}

fn zerr(e: zip::result::ZipError) -> String {
    format!("not a torch.save archive: {e}")
}

/// Decodes the tensor item `item` (the exact byte range `_StorageInfo` names). Errors (one line):
/// not a zip, no `data.pkl`, a pickle global other than [`item_global_allowed`], a root that is not
/// `_rebuild_tensor_v2/_v3`, a compressed or missing storage record, a record size that disagrees
/// with the storage's element count, a big-endian archive, elements outside the storage.
pub fn decode_item(item: &[u8]) -> Result<ItemTensor, String> {
    let mut z = ZipArchive::new(Cursor::new(item)).map_err(zerr)?;
    let names: Vec<String> = z
        .file_names()
        .map(|n| n.map(|c| c.into_owned()))
        .collect::<Result<_, _>>()
        .map_err(zerr)?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") || n.as_str() == "data.pkl")
        .ok_or("torch.save archive without data.pkl")?
        .clone();
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    let record =
        |z: &mut ZipArchive<Cursor<&[u8]>>, name: &str| -> Result<Option<Vec<u8>>, String> {
            match z.by_name(name) {
                Ok(mut f) => {
                    if f.size() > item.len() as u64 {
                        return Err(format!("record {name} claims {} bytes", f.size()));
                    }
                    let mut v = Vec::with_capacity(f.size() as usize);
                    f.read_to_end(&mut v)
                        .map_err(|e| format!("record {name}: {e}"))?;
                    Ok(Some(v))
                }
                Err(zip::result::ZipError::FileNotFound) => Ok(None),
                Err(e) => Err(zerr(e)),
            }
        };
    if let Some(b) = record(&mut z, &format!("{prefix}byteorder"))? {
        if b != b"little" {
            return Err(format!(
                "byteorder '{}' (only little-endian storages are read)",
                String::from_utf8_lossy(&b)
            ));
        }
    }
    let pk = record(&mut z, &pkl)?.ok_or("data.pkl vanished")?;
    let p = pickle::parse(&pk, &item_global_allowed).map_err(|e| {
        if e.contains("is not allowed") {
            format!(
                "data.pkl: {}: a tensor item holds only torch._utils._rebuild_tensor_v2/_v3, storages, dtypes and OrderedDict",
                e.replace("is not allowed", "is not one a tensor item holds")
            )
        } else {
            format!("data.pkl: {e}")
        }
    })?;
    let root = View::root(&p);
    let c = root
        .call()?
        .ok_or_else(|| format!("data.pkl holds {}, not a tensor", root.kind()))?;
    let v3 = match (c.module, c.name) {
        ("torch._utils", "_rebuild_tensor_v2") => false,
        ("torch._utils", "_rebuild_tensor_v3") => true,
        (m, n) => return Err(format!("data.pkl rebuilds with {m}.{n}, not a tensor")),
    };
    if c.args.len() < if v3 { 7 } else { 4 } {
        return Err(format!(
            "data.pkl: {} arguments to {}",
            c.args.len(),
            c.name
        ));
    }
    let pid = c.args[0].pers_id()?.seq()?;
    if pid.len() != 5 || pid[0].str().ok() != Some("storage") {
        return Err(
            "data.pkl: persistent id is not ('storage', type, key, location, numel)".into(),
        );
    }
    let (sm, sn) = pid[1]
        .global()
        .ok_or("data.pkl: storage type is not a global")?;
    let key = pid[2].str()?;
    let numel_field = pid[4].usize()?;
    let (dtype, storage_numel) = if v3 {
        let d = c.args[6]
            .global()
            .ok_or("data.pkl: _rebuild_tensor_v3 dtype is not a global")?;
        let dtype = dtype_of_global(d.0, d.1)?;
        if (sm, sn) != ("torch.storage", "UntypedStorage") {
            return Err(format!(
                "data.pkl: _rebuild_tensor_v3 with storage {sm}.{sn}"
            ));
        }
        let es = dtype_size(dtype).map_err(|e| e.to_string())?;
        if !numel_field.is_multiple_of(es) {
            return Err(format!(
                "data.pkl: {numel_field} storage bytes for {es}-byte elements"
            ));
        }
        (dtype, numel_field / es)
    } else {
        let dtype = match STORAGE_CLASSES
            .iter()
            .find(|(n, _)| sm == "torch" && *n == sn)
        {
            Some((_, d)) => *d,
            None => dtype_of_global(sm, sn)?,
        };
        (dtype, numel_field)
    };
    let storage_offset = c.args[1].usize()?;
    let ints = |v: &View, what: &str| -> Result<Vec<usize>, String> {
        v.seq()
            .map_err(|e| format!("data.pkl {what}: {e}"))?
            .iter()
            .map(|x| x.usize().map_err(|e| format!("data.pkl {what}: {e}")))
            .collect()
    };
    let sizes = ints(&c.args[2], "size")?;
    let strides = ints(&c.args[3], "stride")?;
    if strides.len() != sizes.len() {
        return Err(format!("data.pkl: size {sizes:?} with stride {strides:?}"));
    }
    let elem = dtype_size(dtype).map_err(|e| e.to_string())?;
    let rec_name = format!("{prefix}data/{key}");
    let f = z.by_name(&rec_name).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => format!("storage record {rec_name} is missing"),
        e => zerr(e),
    })?;
    if f.compression() != CompressionMethod::Stored {
        return Err(format!(
            "storage record {rec_name} is compressed ({})",
            f.compression()
        ));
    }
    let data_start = f
        .data_start()
        .ok_or("storage record without a data offset")? as usize;
    let bytes = storage_numel
        .checked_mul(elem)
        .ok_or("storage size overflows")?;
    if f.size() != bytes as u64 || data_start.checked_add(bytes).is_none_or(|e| e > item.len()) {
        return Err(format!(
            "storage record {rec_name} has {} bytes at offset {data_start}, but the storage is {storage_numel} x {elem} bytes in an item of {} bytes",
            f.size(),
            item.len()
        ));
    }
    let crc32 = f.crc32();
    let out = ItemTensor {
        dtype,
        sizes,
        strides,
        storage_offset,
        storage_numel,
        data_start,
        crc32,
    };
    if out.numel() > 0 {
        let last = out
            .sizes
            .iter()
            .zip(&out.strides)
            .try_fold(storage_offset, |a, (&n, &s)| {
                a.checked_add((n - 1).checked_mul(s)?)
            });
        if last.is_none_or(|l| l >= storage_numel) {
            return Err(format!(
                "tensor {:?} with strides {:?} at storage offset {storage_offset} reads past its storage of {storage_numel} elements",
                out.sizes, out.strides
            ));
        }
    }
    Ok(out)
}

/// Presents a file from byte `base` on as a stream that starts at 0 (each DCP item is its own
/// zip archive, whose offsets count from the item's first byte).
struct At<'a, W> {
    w: &'a mut W,
    base: u64,
}

impl<W: Write> Write for At<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.w.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

impl<W: Seek> Seek for At<'_, W> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let p = match pos {
            SeekFrom::Start(o) => self.w.seek(SeekFrom::Start(self.base + o))?,
            other => self.w.seek(other)?,
        };
        p.checked_sub(self.base)
            .ok_or_else(|| std::io::Error::other("seek before the item"))
    }
}

/// The `data.pkl` of a contiguous tensor of `dtype` and `sizes` (protocol 2, as `torch.save`):
/// `_rebuild_tensor_v2` with a legacy storage class, or `_rebuild_tensor_v3` with an
/// `UntypedStorage` for dtypes that have none.
pub fn data_pkl(dtype: Dtype, sizes: &[usize]) -> Result<Vec<u8>, String> {
    let numel: usize = sizes.iter().product();
    let mut strides = vec![1usize; sizes.len()];
    for d in (0..sizes.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * sizes[d + 1].max(1);
    }
    let class = STORAGE_CLASSES
        .iter()
        .find(|(_, d)| *d == dtype)
        .map(|(n, _)| *n);
    let dname = super::metadata::torch_dtype_name(dtype)
        .ok_or_else(|| format!("dtype {dtype} has no torch name"))?;
    let elem = dtype_size(dtype).map_err(|e| e.to_string())?;
    let mut p = Pickler::new(2);
    p.global(
        "torch._utils",
        if class.is_some() {
            "_rebuild_tensor_v2"
        } else {
            "_rebuild_tensor_v3"
        },
    );
    p.tuple(|p| {
        p.tuple(|p| {
            p.str("storage");
            match class {
                Some(c) => p.global("torch", c),
                None => p.global("torch.storage", "UntypedStorage"),
            };
            p.str("0").str("cpu");
            p.uint(if class.is_some() { numel } else { numel * elem } as u64);
        });
        p.persistent_id();
        p.int(0);
        p.int_tuple(sizes);
        p.int_tuple(&strides);
        p.bool(false);
        p.call("collections", "OrderedDict", |_| {});
        if class.is_none() {
            p.global("torch", dname);
        }
    });
    p.reduce();
    Ok(p.finish())
}

/// Writes at the current position of `w` one tensor item as `torch.save` writes it: records
/// `archive/data.pkl` ([`data_pkl`]), `.format_version`, `.storage_alignment`, `byteorder`,
/// `data/0` (64-byte aligned, filled by `fill`, which must write exactly `bytes` bytes),
/// `version`, `.data/serialization_id`; all stored. Returns the item's length in bytes.
pub fn write_item<W: Write + Seek>(
    w: &mut W,
    dtype: Dtype,
    sizes: &[usize],
    bytes: u64,
    serialization_id: &str,
    fill: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let pkl = data_pkl(dtype, sizes).map_err(std::io::Error::other)?;
    write_archive(w, &pkl, Some((bytes, fill)), serialization_id)
}

/// Writes at the current position of `w` the `torch.save` of a Python `str` (what DCP stores for
/// a non-tensor value: `BytesStorageMetadata`). Returns the item's length in bytes.
pub fn write_str_item<W: Write + Seek>(
    w: &mut W,
    s: &str,
    serialization_id: &str,
) -> std::io::Result<u64> {
    let mut p = Pickler::new(2);
    p.str(s);
    write_archive(w, &p.finish(), None, serialization_id)
}

/// The `str` a `torch.save` archive holds (the inverse of [`write_str_item`]). Errors when it holds
/// anything else (no global is allowed).
pub fn read_str_item(item: &[u8]) -> Result<String, String> {
    let mut z = ZipArchive::new(Cursor::new(item)).map_err(zerr)?;
    let name = z
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .ok_or("torch.save archive without data.pkl")?
        .into_owned();
    let mut f = z.by_name(&name).map_err(zerr)?;
    if f.size() > item.len() as u64 {
        return Err("data.pkl larger than its archive".into());
    }
    let mut v = Vec::new();
    f.read_to_end(&mut v).map_err(|e| e.to_string())?;
    let p = pickle::parse(&v, &|_, _| false)?;
    Ok(View::root(&p).str()?.to_string())
}

type Fill<'a> = &'a mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>;

fn write_archive<W: Write + Seek>(
    w: &mut W,
    pkl: &[u8],
    data: Option<(u64, Fill)>,
    serialization_id: &str,
) -> std::io::Result<u64> {
    let base = w.stream_position()?;
    let bytes = data.as_ref().map_or(0, |d| d.0);
    let opts = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .large_file(bytes >= u32::MAX as u64);
    let zio = |e: zip::result::ZipError| std::io::Error::other(e.to_string());
    let mut z = ZipWriter::new(At { w, base });
    let small = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    z.start_file("archive/data.pkl", small.with_alignment(64))
        .map_err(zio)?;
    z.write_all(pkl)?;
    for (name, data) in [
        (".format_version", &b"1"[..]),
        (".storage_alignment", b"64"),
        ("byteorder", b"little"),
    ] {
        z.start_file(format!("archive/{name}"), small.with_alignment(64))
            .map_err(zio)?;
        z.write_all(data)?;
    }
    if let Some((bytes, fill)) = data {
        z.start_file("archive/data/0", opts.with_alignment(64))
            .map_err(zio)?;
        let mut counted = Counted { w: &mut z, n: 0 };
        fill(&mut counted)?;
        if counted.n != bytes {
            return Err(std::io::Error::other(format!(
                "item data: {} bytes written, {bytes} expected",
                counted.n
            )));
        }
    }
    z.start_file("archive/version", small.with_alignment(64))
        .map_err(zio)?;
    z.write_all(b"3\n")?;
    z.start_file("archive/.data/serialization_id", small.with_alignment(64))
        .map_err(zio)?;
    z.write_all(serialization_id.as_bytes())?;
    let at = z.finish().map_err(zio)?;
    let end = at.w.stream_position()?;
    Ok(end - base)
}

struct Counted<'a, W: Write> {
    w: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let k = self.w.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_items_decode_to_their_layout() {
        for (dtype, sizes) in [
            (Dtype::BF16, vec![3, 4]),
            (Dtype::F32, vec![]),
            (Dtype::U16, vec![5]),
            (Dtype::BOOL, vec![2, 0, 3]),
            (Dtype::F8_E4M3, vec![2, 2]),
        ] {
            let n: usize = sizes.iter().product();
            let es = dtype_size(dtype).unwrap();
            let data: Vec<u8> = (0..n * es).map(|i| i as u8).collect();
            let mut buf = Cursor::new(vec![7u8; 13]);
            buf.seek(SeekFrom::End(0)).unwrap();
            let len = write_item(&mut buf, dtype, &sizes, data.len() as u64, "1", &mut |w| {
                w.write_all(&data)
            })
            .unwrap();
            let all = buf.into_inner();
            assert_eq!(all.len() as u64, 13 + len);
            let item = &all[13..];
            let t = decode_item(item).unwrap();
            assert_eq!(
                (t.dtype, t.sizes.clone(), t.storage_offset),
                (dtype, sizes.clone(), 0)
            );
            assert_eq!(t.storage_numel, n);
            assert_eq!(&item[t.data_start..t.data_start + data.len()], &data[..]);
            assert_eq!(t.data_start % 64, 0, "data 64-byte aligned");
            assert_eq!(t.crc32, crc32fast::hash(&data));
        }
    }

    #[test]
    fn bad_items_are_one_line_errors() {
        assert!(decode_item(b"not a zip")
            .unwrap_err()
            .contains("not a torch.save archive"));
        let mut buf = Cursor::new(Vec::new());
        write_item(&mut buf, Dtype::F32, &[2], 8, "1", &mut |w| {
            w.write_all(&[0; 8])
        })
        .unwrap();
        let good = buf.into_inner();
        let e = decode_item(&good[..good.len() - 30]).unwrap_err();
        assert!(e.contains("not a torch.save archive"), "{e}");
        let e = write_item(
            &mut Cursor::new(Vec::new()),
            Dtype::F32,
            &[2],
            8,
            "1",
            &mut |w| w.write_all(&[0; 4]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("4 bytes written, 8 expected"));
    }
}
