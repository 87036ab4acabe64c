//! SIGTERM/SIGINT note for the collective in flight (unix only).
//!
//! When one rank dies, the MPI runtime (Open MPI's default) kills the other ranks with SIGTERM
//! at once, often before their watchdog fires. This handler makes such a rank still say which
//! collective it was blocked in: it writes
//! `collectives: rank R of N: terminated by signal S while in <op> (collective #Q on <backend>
//! communicator of M ranks (this rank: K)); a peer died or the job was aborted` to stderr, then
//! re-raises the signal with the default action (so the exit status is unchanged).
//!
//! When the environment variable [`crate::REPORT_DIR_ENV`] names a folder, the same line (and every other
//! fault report of this crate, see [`report`]) is also appended to `<folder>/rank-<R>.log`: the
//! MPI runtime may drop the stderr of processes it is terminating, the file keeps the report.
//!
//! The record lives in atomics (set by [`record`] / cleared by [`clear`], a few relaxed stores
//! per collective) and the message is formatted on the stack: the handler only calls the
//! async-signal-safe `write`, `signal` and `raise`.

use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering::Relaxed,
};

use crate::REPORT_DIR_ENV;

/// File descriptor of this process's report file, or -1.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

static ACTIVE: AtomicBool = AtomicBool::new(false);
static OP_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static OP_LEN: AtomicUsize = AtomicUsize::new(0);
static BACKEND_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static BACKEND_LEN: AtomicUsize = AtomicUsize::new(0);
static SEQ: AtomicU64 = AtomicU64::new(0);
static SIZE: AtomicUsize = AtomicUsize::new(0);
static RANK: AtomicUsize = AtomicUsize::new(0);
static PROC_RANK: AtomicUsize = AtomicUsize::new(0);
static PROC_SIZE: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Records the collective in flight.
pub(crate) fn record(op: &'static str, backend: &'static str, seq: u64, size: usize, rank: usize) {
    OP_PTR.store(op.as_ptr() as *mut u8, Relaxed);
    OP_LEN.store(op.len(), Relaxed);
    BACKEND_PTR.store(backend.as_ptr() as *mut u8, Relaxed);
    BACKEND_LEN.store(backend.len(), Relaxed);
    SEQ.store(seq, Relaxed);
    SIZE.store(size, Relaxed);
    RANK.store(rank, Relaxed);
    ACTIVE.store(true, Relaxed);
}

/// No collective in flight.
pub(crate) fn clear() {
    ACTIVE.store(false, Relaxed);
}

/// Fixed-capacity message buffer (no allocation in the handler).
struct Buf {
    bytes: [u8; 512],
    len: usize,
}

impl Buf {
    fn put(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.bytes.len() {
                self.bytes[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }
}

/// A `'static` str stored as pointer + length.
fn stored(ptr: &AtomicPtr<u8>, len: &AtomicUsize) -> &'static [u8] {
    let p = ptr.load(Relaxed);
    if p.is_null() {
        return b"?";
    }
    // SAFETY: the pointer and length were taken from a `&'static str` in `record`.
    unsafe { std::slice::from_raw_parts(p, len.load(Relaxed)) }
}

extern "C" fn on_signal(sig: libc::c_int) {
    if ACTIVE.load(Relaxed) {
        let mut m = Buf {
            bytes: [0; 512],
            len: 0,
        };
        m.put(b"collectives: rank ");
        m.num(PROC_RANK.load(Relaxed) as u64);
        m.put(b" of ");
        m.num(PROC_SIZE.load(Relaxed) as u64);
        m.put(b": terminated by signal ");
        m.num(sig as u64);
        m.put(b" while in ");
        m.put(stored(&OP_PTR, &OP_LEN));
        m.put(b" (collective #");
        m.num(SEQ.load(Relaxed));
        m.put(b" on ");
        m.put(stored(&BACKEND_PTR, &BACKEND_LEN));
        m.put(b" communicator of ");
        m.num(SIZE.load(Relaxed) as u64);
        m.put(b" ranks (this rank: ");
        m.num(RANK.load(Relaxed) as u64);
        m.put(b")); a peer died or the job was aborted\n");
        // SAFETY: write(2) on stderr and on the report file with a valid buffer; async-signal-safe.
        unsafe {
            libc::write(2, m.bytes.as_ptr().cast(), m.len);
            let fd = REPORT_FD.load(Relaxed);
            if fd >= 0 {
                libc::write(fd, m.bytes.as_ptr().cast(), m.len);
            }
        }
    }
    // SAFETY: signal(2) and raise(3) are async-signal-safe; restores the default action and
    // re-delivers the signal so the process ends as it would have without this handler.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Installs the handler for SIGTERM and SIGINT (once per process). `proc_rank`/`proc_size`
/// name the process (its world rank) in the message.
pub(crate) fn install(proc_rank: usize, proc_size: usize) {
    PROC_RANK.store(proc_rank, Relaxed);
    PROC_SIZE.store(proc_size, Relaxed);
    open_report_file(proc_rank);
    if INSTALLED.swap(true, Relaxed) {
        return;
    }
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only performs async-signal-safe calls.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// Opens `<$COLLECTIVES_REPORT_DIR>/rank-<R>.log` for appending when the variable is set (once).
fn open_report_file(proc_rank: usize) {
    use std::os::unix::io::IntoRawFd;
    let Some(dir) = std::env::var_os(REPORT_DIR_ENV) else {
        return;
    };
    if REPORT_FD.load(Relaxed) >= 0 {
        return;
    }
    let path = std::path::Path::new(&dir).join(format!("rank-{proc_rank}.log"));
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => REPORT_FD.store(f.into_raw_fd(), Relaxed),
        Err(e) => eprintln!(
            "collectives: cannot open the fault report {}: {e}",
            path.display()
        ),
    }
}

/// Prints a fault report line on stderr and appends it to this rank's report file (see
/// [`crate::REPORT_DIR_ENV`]). Not for signal handlers (it allocates).
pub fn report(line: &str) {
    eprintln!("{line}");
    let fd = REPORT_FD.load(Relaxed);
    if fd >= 0 {
        let text = format!("{line}\n");
        // SAFETY: write(2) with a valid buffer on a descriptor this module opened and never closes.
        unsafe {
            libc::write(fd, text.as_ptr().cast(), text.len());
        }
    }
}
