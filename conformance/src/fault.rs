//! Fault injection for the training scenarios: a file-size limit (`RLIMIT_FSIZE`, POSIX
//! `setrlimit(2)`) on this process, so a checkpoint write stops part-way through a file. With
//! `SIGXFSZ` at its default action the kernel kills the process at the limit (a crash in the
//! middle of writing a file); with it ignored the write fails with `EFBIG` (a full disk, seen by
//! the writer as an I/O error naming the file). The limit is process-wide: with the threads
//! backend it stops every rank's writes.

/// The limit in force before [`limit_file_size`], to put back with [`restore`].
pub struct Saved(libc::rlimit);

/// Limits every file this process writes to `bytes`; `crash`: at the limit the process is
/// killed (`SIGXFSZ`), else writes past it fail (`EFBIG`). Errors: the OS call's.
pub fn limit_file_size(bytes: u64, crash: bool) -> Result<Saved, String> {
    // SAFETY: plain libc calls on a local struct; `signal` only changes SIGXFSZ's disposition.
    unsafe {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_FSIZE, &mut old) != 0 {
            return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
        }
        let handler = if crash { libc::SIG_DFL } else { libc::SIG_IGN };
        if libc::signal(libc::SIGXFSZ, handler) == libc::SIG_ERR {
            return Err(format!(
                "signal(SIGXFSZ): {}",
                std::io::Error::last_os_error()
            ));
        }
        let new = libc::rlimit {
            rlim_cur: bytes as libc::rlim_t,
            rlim_max: old.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_FSIZE, &new) != 0 {
            return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
        Ok(Saved(old))
    }
}

/// Puts back the limit [`limit_file_size`] replaced.
pub fn restore(saved: Saved) -> Result<(), String> {
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &saved.0) } != 0 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}
