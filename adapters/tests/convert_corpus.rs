//! `adapters convert --from hf --to native` on the damaged-checkpoint corpus (the cases the
//! `conformance` commands reject while reading the checkpoint; see
//! `conformance/tests/corpus/mod.rs`): every run ends within its bound, exits 1 or 2 without a
//! panic, says one `error:` line naming the file and the key or field, leaves no destination
//! directory (nor a temporary one beside it) and does not touch the source.

#[path = "../../conformance/tests/corpus/mod.rs"]
mod corpus;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_adapters");
const BOUND: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures")
        .join(name)
}

/// Every file of `dir` (not following links) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            m.insert(
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            );
        }
    }
    m
}

#[test]
fn the_converter_rejects_every_damaged_checkpoint_in_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut problems = Vec::new();
    let mut runs = 0;
    for (i, c) in corpus::corpus().iter().enumerate() {
        if !c.reject.contains('r') {
            continue;
        }
        let case = tmp.path().join(format!("case{i}"));
        let src = case.join("src");
        corpus::copy_dir(&fixture(c.fixture), &src);
        corpus::apply(&src, &c.damage);
        let before = snapshot(&src);
        let dst = case.join("native");
        let (code, err, _) = corpus::run_bounded(
            Command::new(BIN)
                .args(["convert", "--from", "hf", "--to", "native", "--quiet"])
                .arg(&src)
                .arg(&dst),
            BOUND,
            &c.name,
        );
        runs += 1;
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        let left: Vec<String> = std::fs::read_dir(&case)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "src")
            .collect();
        if !matches!(code, Some(1) | Some(2)) {
            problems.push(format!("{}: exit {code:?}; stderr: {err}", c.name));
        } else if err.contains("panicked") {
            problems.push(format!("{}: panicked: {err}", c.name));
        } else if lines.len() != 1 || !lines[0].contains(&c.names) {
            problems.push(format!(
                "{}: want one error naming '{}': {err}",
                c.name, c.names
            ));
        } else if !left.is_empty() {
            problems.push(format!("{}: left {left:?} beside the source", c.name));
        } else if snapshot(&src) != before {
            problems.push(format!("{}: the source changed", c.name));
        }
    }
    eprintln!("convert corpus: {runs} runs");
    assert!(runs > 150, "{runs}");
    assert!(
        problems.is_empty(),
        "{} of {runs}:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
