//! One fuzz target per parser a user's files reach: the safetensors header, the shard index
//! (`model.safetensors.index.json`), config.json and torch DCP's `.metadata` (pickle). Each
//! target mutates the inputs of its committed seed corpus (`tests/fuzz_corpus/<target>/`, made
//! by `make_seeds.py`: small hand-made files and copies of the committed transformers / torch
//! outputs) with byte flips, inserts, deletions, cuts, splices of another seed and
//! interesting numbers written over a digit run, and runs the parser and everything after it
//! (the adapter, a read of every tensor). Either it works or it gives a one-line error; a panic
//! fails the target, and its (shrunk) input is written to `target/fuzz-failures/<target>/`
//! to be added to the corpus.
//!
//! The mutation engine is proptest's (strategies, shrinking); the bound is `FUZZ_SECONDS` per
//! target when set (CI: 60), else 64 inputs per target. The four targets run in parallel as
//! four tests.

use adapters::{adapter_for, dcp, HfCheckpoint};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRunner};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target)
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../conformance/fixtures")
}

/// The seeds of a target: (file name, bytes), sorted by name.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no seeds for {target}");
    v
}

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Edit {
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index, usize),
    Cut(prop::sample::Index),
    /// Bytes `[at, at + len)` of another seed inserted at a position.
    Splice(
        prop::sample::Index,
        prop::sample::Index,
        prop::sample::Index,
        usize,
    ),
    /// An interesting number written over the digit run at or after a position.
    Number(prop::sample::Index, &'static str),
}

const NUMBERS: [&str; 8] = [
    "0",
    "-1",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "99999999999999999999999",
    "2.5",
];

fn edit() -> impl Strategy<Value = Edit> {
    let ix = any::<prop::sample::Index>;
    prop_oneof![
        (ix(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (ix(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        (ix(), 1..16usize).prop_map(|(i, n)| Edit::Delete(i, n)),
        ix().prop_map(Edit::Cut),
        (ix(), ix(), ix(), 1..64usize).prop_map(|(a, s, b, n)| Edit::Splice(a, s, b, n)),
        (ix(), prop::sample::select(&NUMBERS[..])).prop_map(|(i, n)| Edit::Number(i, n)),
    ]
}

fn apply(seeds: &[(String, Vec<u8>)], seed: usize, edits: &[Edit]) -> Vec<u8> {
    let mut b = seeds[seed].1.clone();
    for e in edits {
        let at = |i: &prop::sample::Index, n: usize| if n == 0 { 0 } else { i.index(n) };
        match e {
            Edit::Flip(i, v) if !b.is_empty() => {
                let k = i.index(b.len());
                b[k] = *v;
            }
            Edit::Flip(..) => {}
            Edit::Insert(i, v) => {
                let k = at(i, b.len() + 1);
                b.insert(k, *v);
            }
            Edit::Delete(i, n) => {
                let k = at(i, b.len());
                let end = (k + n).min(b.len());
                b.drain(k..end);
            }
            Edit::Cut(i) => {
                let k = at(i, b.len());
                b.truncate(k);
            }
            Edit::Splice(a, s, from, n) => {
                let other = &seeds[s.index(seeds.len())].1;
                let f = at(from, other.len());
                let piece = other[f..(f + n).min(other.len())].to_vec();
                let k = at(a, b.len() + 1);
                b.splice(k..k, piece);
            }
            Edit::Number(i, num) => {
                let start = at(i, b.len());
                if let Some(off) = b[start..].iter().position(u8::is_ascii_digit) {
                    let s = start + off;
                    let end = s + b[s..].iter().take_while(|c| c.is_ascii_digit()).count();
                    b.splice(s..end, num.bytes());
                }
            }
        }
    }
    b
}

fn one_line(r: adapters::Result<()>) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        let s = e.to_string();
        prop_assert!(!s.contains('\n'), "a multi-line error: {}", s);
    }
    Ok(())
}

/// Opens `dir`, reads every tensor, builds the adapter, converts to native and back.
fn exercise_hf(dir: &Path) -> Result<(), TestCaseError> {
    one_line(HfCheckpoint::open(dir).and_then(|ck| {
        for k in ck.keys() {
            ck.tensor(k)?;
        }
        let a = adapter_for(&ck)?;
        let native = a.from_hf(&ck)?;
        a.to_hf(&native).map(|_| ())
    }))
}

/// Symlinks the files of `src` except `except` into `dst`.
fn link_files(src: &Path, dst: &Path, except: &str) {
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap();
        if p.is_file() && name != except {
            std::os::unix::fs::symlink(&p, dst.join(name)).unwrap();
        }
    }
}

/// Runs the target on one input (the mutated bytes of seed `seed`).
type Body = fn(&str, &[u8], &Path) -> Result<(), TestCaseError>;

fn safetensors_header(_seed: &str, b: &[u8], d: &Path) -> Result<(), TestCaseError> {
    std::fs::copy(
        corpus_dir("config").join("qwen3_moe_tiny.json"),
        d.join("config.json"),
    )
    .unwrap();
    std::fs::write(d.join("model.safetensors"), b).unwrap();
    exercise_hf(d)
}

fn index_json(_seed: &str, b: &[u8], d: &Path) -> Result<(), TestCaseError> {
    let src = fixtures().join("qwen3_moe_tiny_sharded");
    link_files(&src, d, "model.safetensors.index.json");
    std::fs::write(d.join("model.safetensors.index.json"), b).unwrap();
    exercise_hf(d)
}

fn config_json(seed: &str, b: &[u8], d: &Path) -> Result<(), TestCaseError> {
    let src = fixtures().join(seed.trim_end_matches(".json"));
    link_files(&src, d, "config.json");
    std::fs::write(d.join("config.json"), b).unwrap();
    exercise_hf(d)
}

fn dcp_metadata(seed: &str, b: &[u8], d: &Path) -> Result<(), TestCaseError> {
    let src = fixtures()
        .join("dcp")
        .join(seed.trim_end_matches(".metadata"))
        .join("ckpt");
    link_files(&src, d, ".metadata");
    std::fs::write(d.join(".metadata"), b).unwrap();
    for r in [dcp::open(d), dcp::inspect(d)] {
        match r {
            Err(e) => one_line(Err(e))?,
            Ok(ck) => {
                for k in ck.keys() {
                    one_line(ck.read_full(&k).map(|_| ()))?;
                }
            }
        }
    }
    Ok(())
}

/// Runs `target` until its bound; on a failure writes the shrunk input and panics.
fn fuzz(target: &str, body: Body) {
    let seeds = seeds(target);
    let bound = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let strategy = (0..seeds.len(), prop::collection::vec(edit(), 0..6));
    let t0 = Instant::now();
    let mut inputs = 0u64;
    loop {
        let batch = 64;
        let mut runner = TestRunner::new(Config {
            cases: batch,
            failure_persistence: None,
            ..Config::default()
        });
        let r = runner.run(&strategy, |(seed, edits)| {
            let b = apply(&seeds, seed, &edits);
            let d = tempfile::tempdir().unwrap();
            body(&seeds[seed].0, &b, d.path())
        });
        inputs += u64::from(batch);
        if let Err(e) = r {
            let (why, input) = match e {
                TestError::Fail(why, (seed, edits)) => {
                    (why.to_string(), apply(&seeds, seed, &edits))
                }
                TestError::Abort(why) => panic!("fuzz {target}: aborted: {why}"),
            };
            let out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/fuzz-failures")
                .join(target);
            std::fs::create_dir_all(&out).unwrap();
            let p = out.join(format!("input-{}", inputs));
            std::fs::write(&p, &input).unwrap();
            panic!("fuzz {target}: {why}; input written to {}", p.display());
        }
        match bound {
            Some(b) if t0.elapsed() < b => continue,
            _ => break,
        }
    }
    eprintln!(
        "fuzz {target}: {inputs} inputs from {} seeds in {:.1} s, no panic, every error one line",
        seeds.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn fuzz_safetensors_header() {
    fuzz("safetensors", safetensors_header);
}

#[test]
fn fuzz_index_json() {
    fuzz("index", index_json);
}

#[test]
fn fuzz_config_json() {
    fuzz("config", config_json);
}

#[test]
fn fuzz_dcp_metadata() {
    fuzz("dcp_metadata", dcp_metadata);
}

#[test]
fn the_seeds_parse() {
    // Unmutated, every seed gets through its parser (so the mutations start from valid input).
    for (name, b) in seeds("safetensors") {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("model.safetensors"), b).unwrap();
        HfCheckpoint::open(d.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in seeds("config") {
        let d = tempfile::tempdir().unwrap();
        config_json(&name, &b, d.path()).unwrap();
        let ck = HfCheckpoint::open(d.path()).unwrap();
        adapter_for(&ck)
            .unwrap()
            .from_hf(&ck)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in seeds("index") {
        let d = tempfile::tempdir().unwrap();
        index_json(&name, &b, d.path()).unwrap();
        HfCheckpoint::open(d.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for (name, b) in seeds("dcp_metadata") {
        let d = tempfile::tempdir().unwrap();
        dcp_metadata(&name, &b, d.path()).unwrap();
        dcp::open(d.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn a_panicking_parser_fails_its_target_and_its_input_is_kept() {
    // The harness itself: a body that panics on any edited seed. (Every case with at least one
    // edit that changes a byte fails it; a batch of 64 cases of 0..6 edits each misses with
    // probability about (1/6)^64. A narrower condition, such as "the first byte changed", is
    // met by chance only and made this test flaky.)
    fn fragile(seed: &str, b: &[u8], _d: &Path) -> Result<(), TestCaseError> {
        let orig = std::fs::read(corpus_dir("safetensors").join(seed)).unwrap();
        assert!(b == orig.as_slice(), "input changed");
        Ok(())
    }
    let r = std::panic::catch_unwind(|| fuzz("safetensors", fragile));
    let msg = match r {
        Ok(()) => panic!("the fuzz target missed the panic"),
        Err(e) => e.downcast_ref::<String>().cloned().unwrap_or_default(),
    };
    assert!(
        msg.contains("input changed") && msg.contains("input written to"),
        "{msg}"
    );
    let p = msg.rsplit("input written to ").next().unwrap();
    assert!(Path::new(p).is_file(), "{p}");
}
