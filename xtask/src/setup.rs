//! The machine and the builds: where the workspace and its target directory are, whether the
//! MPI backend can run here, and building the conformance binary and the collectives examples.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian packages the MPI backend needs (build and run).
pub(crate) const MPI_PACKAGES: &str = "openmpi-bin libopenmpi-dev libclang-dev pkg-config";

pub(crate) fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

pub(crate) fn succeeds(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Why the MPI backend cannot run here, or None when `mpirun` and the MPI library are present.
pub(crate) fn mpi_missing() -> Option<String> {
    if !succeeds("mpirun", &["--version"]) {
        return Some("`mpirun` not found".into());
    }
    let lib = ["ompi", "ompi-c", "mpich", "mpi"]
        .iter()
        .any(|p| succeeds("pkg-config", &["--exists", p]))
        || succeeds("mpicc", &["--showme:version"]);
    if !lib {
        return Some("the MPI development library (pkg-config ompi / mpicc) not found".into());
    }
    None
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Every directory under conformance/fixtures/ that holds a config.json.
pub(crate) fn default_fixtures(root: &Path) -> Result<Vec<PathBuf>, String> {
    let dir = root.join("conformance").join("fixtures");
    let mut out = Vec::new();
    let entries = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.join("config.json").is_file() {
            out.push(path);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(format!("no fixture directories under {}", dir.display()));
    }
    Ok(out)
}

/// `cargo build --quiet ARGS` (plus `--release`) in the workspace; whether it succeeded.
fn cargo_build(root: &Path, release: bool, args: &[&str]) -> Result<bool, String> {
    let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    build
        .current_dir(root)
        .args(["build", "--quiet"])
        .args(args);
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    Ok(status.success())
}

/// `cargo build -p conformance --bin conformance` (with the `mpi` feature when `with_mpi`).
pub(crate) fn build_conformance(
    root: &Path,
    release: bool,
    with_mpi: bool,
) -> Result<bool, String> {
    eprintln!(
        "xtask: building conformance ({}{})",
        if release { "release" } else { "debug" },
        if with_mpi { "" } else { ", without MPI" }
    );
    let mut args = vec!["-p", "conformance", "--bin", "conformance"];
    if with_mpi {
        args.extend(["--features", "mpi"]);
    }
    cargo_build(root, release, &args)
}

/// Builds the collectives example binaries (MPI fault scenarios, NCCL selftest: they need the
/// `mpi` feature).
pub(crate) fn build_examples(root: &Path, release: bool) -> Result<bool, String> {
    eprintln!("xtask: building the collectives examples");
    cargo_build(
        root,
        release,
        &["-p", "collectives", "--examples", "--features", "mpi"],
    )
}
