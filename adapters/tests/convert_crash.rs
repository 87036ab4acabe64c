//! The converter under a file-size limit (bash `ulimit -f`, POSIX `RLIMIT_FSIZE`): killed by
//! SIGXFSZ in the middle of writing an output file (a crash), or with SIGXFSZ ignored, its
//! writes failing with EFBIG (a full disk). Either way DST does not appear; the crash leaves its
//! partial directory, which the next run reports and removes; the full disk is a one-line error
//! naming the file and leaves nothing behind.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name)
}

/// `adapters convert --from hf --to native SRC DST` under bash with `prelude` first.
fn convert(prelude: &str, src: &Path, dst: &Path) -> std::process::Output {
    Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{prelude} exec \"$0\" convert --from hf --to native \"$1\" \"$2\""
        ))
        .arg(env!("CARGO_BIN_EXE_adapters"))
        .arg(src)
        .arg(dst)
        .output()
        .unwrap()
}

fn partials(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains(".partial-")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_crash_mid_write_leaves_no_dst_and_the_next_run_removes_the_partial() {
    let src = fixture("qwen3_moe_tiny");
    let big = std::fs::metadata(src.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(big > 100 * 1024, "{big}");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("native");
    // 64 KiB (bash counts 1024-byte blocks): the output file stops part-way.
    let out = convert("ulimit -f 64;", &src, &dst);
    assert_eq!(out.status.signal(), Some(libc_sigxfsz()), "{out:?}");
    assert!(!dst.exists());
    let left = partials(tmp.path());
    assert_eq!(left.len(), 1, "{left:?}");
    let sizes: Vec<u64> = std::fs::read_dir(&left[0])
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert!(
        sizes.contains(&(64 * 1024)),
        "a file cut at the limit: {sizes:?}"
    );
    // the next run says what it removes and converts
    let out = convert("", &src, &dst);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "note: removing {}, the partial output of a run that did not finish",
            left[0].display()
        )),
        "{err}"
    );
    assert!(partials(tmp.path()).is_empty());
    assert!(adapters::HfCheckpoint::open(&dst).is_ok());
}

#[test]
fn a_full_disk_is_an_error_naming_the_file_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("native");
    let out = convert(
        "trap '' XFSZ; ulimit -f 64;",
        &fixture("qwen3_moe_tiny"),
        &dst,
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
    assert!(
        line.contains(".safetensors") && line.contains("File too large"),
        "{err}"
    );
    assert!(!dst.exists());
    assert!(
        partials(tmp.path()).is_empty(),
        "{:?}",
        partials(tmp.path())
    );
}

/// SIGXFSZ on Linux (signal(7)).
fn libc_sigxfsz() -> i32 {
    25
}
