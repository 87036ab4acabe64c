//! Output files for the converter written with `O_DIRECT` where the platform and file system allow
//! it (Linux x86_64 / aarch64), through aligned staging buffers; otherwise plain buffered writes.
//! Profiling the converter showed ~3/4 of its time in the kernel's page-cache copy of buffered
//! writes; direct I/O skips that copy. The bytes written are identical either way.
//!
//! Writes happen on a background thread with two staging buffers (double buffering): while one
//! is being written, the caller fills the other, so producing the bytes and the (synchronous)
//! direct writes overlap. Memory: two buffers of at most the largest append (>= 8 MiB).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

const ALIGN: usize = 4096;
const CHUNK: usize = 8 << 20;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
const O_DIRECT: Option<i32> = Some(0o40000);
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
const O_DIRECT: Option<i32> = Some(0o200000);
#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
const O_DIRECT: Option<i32> = None;

/// The file side, owned by the writer thread.
struct Sink {
    path: PathBuf,
    file: File,
    direct: bool,
    written: u64,
}

impl Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self.file.write_all(data) {
            Err(e) if self.direct && self.written == 0 && e.kind() == ErrorKind::InvalidInput => {
                // The file system refused direct I/O: start again buffered (nothing written yet).
                self.file = open_plain(&self.path, false)?;
                self.direct = false;
                self.file.write_all(data)?;
            }
            r => r?,
        }
        self.written += data.len() as u64;
        Ok(())
    }
}

/// A staging buffer: `v[start..]` begins on an ALIGN boundary.
struct Buf {
    v: Vec<u8>,
    start: usize,
}

impl Buf {
    fn new(cap: usize) -> Buf {
        let v = vec![0u8; cap.div_ceil(ALIGN) * ALIGN + ALIGN];
        let start = v.as_ptr().align_offset(ALIGN).min(ALIGN);
        Buf { v, start }
    }
    /// Usable bytes after the aligned start.
    fn cap(&self) -> usize {
        (self.v.len() - self.start) / ALIGN * ALIGN
    }
    fn get(&self, n: usize) -> &[u8] {
        &self.v[self.start..self.start + n]
    }
}

/// A file being written sequentially (see the module docs).
pub struct OutFile {
    buf: Buf,
    len: usize,
    /// A free buffer; `None` while the writer thread holds it.
    spare: Option<Buf>,
    jobs: Option<SyncSender<(Buf, usize)>>,
    done: Receiver<std::io::Result<Buf>>,
    writer: Option<JoinHandle<Sink>>,
}

fn writer_gone() -> std::io::Error {
    std::io::Error::other("output writer thread stopped")
}

fn open_plain(path: &Path, append: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    if append {
        o.append(true);
    } else {
        o.write(true).create(true).truncate(true);
    }
    o.open(path)
}

impl OutFile {
    /// Creates (truncates) `path`, with `O_DIRECT` when available.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let direct = O_DIRECT.and_then(|flag| {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(flag)
                .open(path)
                .ok()
        });
        let (file, direct) = match direct {
            Some(f) => (f, true),
            None => (open_plain(path, false)?, false),
        };
        let mut sink = Sink {
            path: path.to_path_buf(),
            file,
            direct,
            written: 0,
        };
        let (jobs, job_rx) = sync_channel::<(Buf, usize)>(1);
        let (done_tx, done) = sync_channel::<std::io::Result<Buf>>(2);
        let writer = std::thread::Builder::new()
            .name("adapters-writer".into())
            .spawn(move || {
                for (buf, n) in job_rx {
                    let r = sink.write(buf.get(n));
                    let failed = r.is_err();
                    if done_tx.send(r.map(|_| buf)).is_err() || failed {
                        break;
                    }
                }
                sink
            })?;
        Ok(OutFile {
            buf: Buf::new(CHUNK),
            len: 0,
            spare: Some(Buf::new(CHUNK)),
            jobs: Some(jobs),
            done,
            writer: Some(writer),
        })
    }

    /// Appends `data`.
    pub fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        for part in data.chunks(CHUNK) {
            self.append_with(part.len(), |b| {
                b.copy_from_slice(part);
                Ok::<(), std::io::Error>(())
            })?;
        }
        Ok(())
    }

    /// Appends `n` bytes produced by `fill` directly in the staging buffer (no intermediate
    /// copy). The buffer grows to hold `n` when `n` exceeds the chunk size, so memory is bounded
    /// by the largest append. Every byte of the slice passed to `fill` must be written.
    pub fn append_with<E: From<std::io::Error>>(
        &mut self,
        n: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.len + n > self.buf.cap() {
            let aligned = self.len / ALIGN * ALIGN;
            if aligned > 0 {
                self.flush(aligned)?;
            }
        }
        if self.len + n > self.buf.cap() {
            let mut b = Buf::new(self.len + n);
            b.v[b.start..b.start + self.len].copy_from_slice(self.buf.get(self.len));
            self.buf = b;
        }
        let at = self.buf.start + self.len;
        fill(&mut self.buf.v[at..at + n])?;
        self.len += n;
        if self.len >= CHUNK {
            let aligned = self.len / ALIGN * ALIGN;
            self.flush(aligned)?;
        }
        Ok(())
    }

    /// Hands the first `n` staged bytes (a multiple of ALIGN) to the writer thread and continues
    /// in the spare buffer (waiting for the writer to return it), the rest moved to its front.
    fn flush(&mut self, n: usize) -> std::io::Result<()> {
        let mut next = match self.spare.take() {
            Some(b) => b,
            None => self.done.recv().map_err(|_| writer_gone())??,
        };
        let tail = self.len - n;
        if next.cap() < tail.max(self.buf.cap()) {
            next = Buf::new(tail.max(self.buf.cap()));
        }
        let (s0, s1) = (self.buf.start + n, self.buf.start + self.len);
        next.v[next.start..next.start + tail].copy_from_slice(&self.buf.v[s0..s1]);
        let full = std::mem::replace(&mut self.buf, next);
        self.len = tail;
        let jobs = self.jobs.as_ref().ok_or_else(writer_gone)?;
        if jobs.send((full, n)).is_err() {
            // the writer stopped on an error: report it
            return Err(match self.done.recv() {
                Ok(Err(e)) => e,
                _ => writer_gone(),
            });
        }
        Ok(())
    }

    /// Writes what is staged (the unaligned tail without `O_DIRECT`), waits for the writer
    /// thread and fsyncs.
    pub fn finish(mut self) -> std::io::Result<()> {
        let aligned = self.len / ALIGN * ALIGN;
        if aligned > 0 {
            self.flush(aligned)?;
        }
        drop(self.jobs.take());
        let mut sink = self
            .writer
            .take()
            .ok_or_else(writer_gone)?
            .join()
            .map_err(|_| writer_gone())?;
        for r in self.done.try_iter() {
            r?;
        }
        if self.len > 0 {
            let tail = self.buf.get(self.len);
            if sink.direct {
                sink.file.sync_all()?;
                sink.file = open_plain(&sink.path, true)?;
            }
            sink.file.write_all(tail)?;
        }
        sink.file.sync_all()
    }
}
