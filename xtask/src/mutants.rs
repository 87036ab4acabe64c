//! `cargo xtask mutants`: mutation testing of the spec code with cargo-mutants. The files, the
//! test command and the equivalent mutants are in `.cargo/mutants.toml`; this runs
//! `cargo mutants` with its output under `target/mutants/` (log in `target/mutants/log.txt`),
//! bounded in time when asked, and writes the caught / missed / unviable / timeout counts per file
//! and per crate to `target/mutants/summary.md` and `summary.json`. Fails when a mutant is
//! missed.

use crate::process::run_logged;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Options of `cargo xtask mutants`.
#[derive(clap::Args, Debug)]
pub struct MutantsArgs {
    /// Only mutants in code this diff touches (a `git diff` output file), as `cargo mutants
    /// --in-diff`.
    #[arg(long)]
    pub in_diff: Option<PathBuf>,
    /// Only the mutants of files whose workspace-relative path starts with this (among the
    /// config's files; repeatable), e.g. `placement/src/view.rs` or `adapters/`.
    #[arg(long = "file")]
    pub files: Vec<String>,
    /// Test each mutant with the tests of its own crate only (faster; the config's test command
    /// is every library crate's tests).
    #[arg(long)]
    pub own_tests: bool,
    /// Mutate the checkout itself and build in its `target/` with the test profile, without a
    /// baseline run (for CI on a clean clone, right after `cargo test --workspace` passed). Never
    /// on a working copy you care about: a killed run can leave a mutated file behind.
    #[arg(long)]
    pub in_place: bool,
    /// Stop after this many seconds (0: no bound) and summarise the mutants tested so far; the
    /// rest are counted as not tested.
    #[arg(long, default_value_t = 0)]
    pub timeout_secs: u64,
    /// Run one shard `k/n` of the mutants, as `cargo mutants --shard`.
    #[arg(long)]
    pub shard: Option<String>,
    /// Skip the mutants the previous run in `target/mutants/` caught, as `cargo mutants
    /// --iterate` (they are counted as caught again, from its `previously_caught.txt`).
    #[arg(long)]
    pub iterate: bool,
    /// Parallel build/test jobs, as `cargo mutants --jobs`.
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// Outcome counts of one file (or crate, or all).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub caught: usize,
    pub missed: usize,
    pub unviable: usize,
    pub timeout: usize,
    /// Generated but not tested (the run was bounded in time).
    pub not_tested: usize,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.caught += o.caught;
        self.missed += o.missed;
        self.unviable += o.unviable;
        self.timeout += o.timeout;
        self.not_tested += o.not_tested;
    }
    fn tested(&self) -> usize {
        self.caught + self.missed + self.unviable + self.timeout
    }
}

/// The file a line of cargo-mutants' `caught.txt` (etc.) names: `path:line:col: what`.
fn file_of(line: &str) -> Option<&str> {
    let path = line.split(':').next()?.trim();
    (!path.is_empty()).then_some(path)
}

/// Per-file counts from cargo-mutants' output directory `out` (`mutants.out`): the outcome lists
/// and the list of every generated mutant (`mutants.json`), so what was not reached is counted.
/// Also returns the missed mutants' lines.
pub fn summarise(out: &Path) -> Result<(BTreeMap<String, Counts>, Vec<String>), String> {
    let mut files: BTreeMap<String, Counts> = BTreeMap::new();
    let read = |name: &str| -> Vec<String> {
        fs::read_to_string(out.join(name))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut missed_lines = Vec::new();
    for (name, slot) in [
        ("caught.txt", 0),
        ("previously_caught.txt", 0),
        ("missed.txt", 1),
        ("unviable.txt", 2),
        ("timeout.txt", 3),
    ] {
        for line in read(name) {
            let Some(f) = file_of(&line) else { continue };
            let c = files.entry(f.to_string()).or_default();
            match slot {
                0 => c.caught += 1,
                1 => c.missed += 1,
                2 => c.unviable += 1,
                _ => c.timeout += 1,
            }
            if slot == 1 {
                missed_lines.push(line);
            }
        }
    }
    // Every generated mutant, to count the ones a bounded run did not reach.
    let generated: BTreeMap<String, usize> = match fs::read_to_string(out.join("mutants.json")) {
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", out.join("mutants.json").display()))?;
            let mut m = BTreeMap::new();
            for mutant in v.as_array().into_iter().flatten() {
                if let Some(f) = mutant.get("file").and_then(|f| f.as_str()) {
                    *m.entry(f.to_string()).or_insert(0) += 1;
                }
            }
            m
        }
        Err(_) => BTreeMap::new(),
    };
    for (f, n) in generated {
        let c = files.entry(f).or_default();
        c.not_tested = n.saturating_sub(c.tested());
    }
    Ok((files, missed_lines))
}

/// `.cargo/mutants.toml` without its `test_package` line.
fn own_tests_config(root: &Path) -> Result<String, String> {
    let p = root.join(".cargo").join("mutants.toml");
    let text = fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(drop_test_package(&text))
}

fn drop_test_package(config: &str) -> String {
    config
        .lines()
        .filter(|l| !l.trim_start().starts_with("test_package"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A cargo-mutants name regex for the mutants of files whose path starts with `prefix` (names
/// are `path:line:col: what`; the config's `examine_globs` are not narrowed by `--file`).
fn file_regex(prefix: &str) -> String {
    let mut r = String::from("^");
    for ch in prefix.chars() {
        if ch.is_ascii_alphanumeric() || ch == '/' || ch == '_' || ch == '-' {
            r.push(ch);
        } else {
            r.push('\\');
            r.push(ch);
        }
    }
    if prefix.ends_with(".rs") {
        r.push(':');
    }
    r
}

/// `git checkout -- FILE` for every file mutants were generated from (after an `--in-place` run
/// killed at the time bound).
fn restore<'a>(root: &Path, files: impl Iterator<Item = &'a String>) -> Result<(), String> {
    for f in files {
        let status = Command::new("git")
            .current_dir(root)
            .args(["checkout", "--", f])
            .status()
            .map_err(|e| format!("git checkout -- {f}: {e}"))?;
        if !status.success() {
            return Err(format!("git checkout -- {f}: {status}"));
        }
    }
    Ok(())
}

/// `--iterate` needs the outcome lists of a previous run.
fn cmd_iterate_check(out: &Path) -> Result<(), String> {
    if out.join("caught.txt").is_file() {
        Ok(())
    } else {
        Err(format!(
            "--iterate: no previous run in {} (run without --iterate first)",
            out.display()
        ))
    }
}

/// The crate of a workspace-relative path (its first component).
fn crate_of(file: &str) -> &str {
    file.split('/').next().unwrap_or(file)
}

/// The summary table (markdown): one row per file, per crate and in all.
pub fn table(files: &BTreeMap<String, Counts>) -> String {
    let mut crates: BTreeMap<&str, Counts> = BTreeMap::new();
    let mut all = Counts::default();
    for (f, c) in files {
        crates.entry(crate_of(f)).or_default().add(c);
        all.add(c);
    }
    let mut s = String::from(
        "| file | caught | missed | unviable | timeout | not tested |\n|---|---|---|---|---|---|\n",
    );
    let row = |name: &str, c: &Counts| {
        format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            c.caught, c.missed, c.unviable, c.timeout, c.not_tested
        )
    };
    for (f, c) in files {
        s.push_str(&row(f, c));
    }
    for (k, c) in &crates {
        s.push_str(&row(&format!("**{k}**"), c));
    }
    s.push_str(&row("**all**", &all));
    s
}

/// Runs `cargo xtask mutants`; `Ok(false)` when a mutant was missed or cargo-mutants failed.
pub fn run(args: MutantsArgs) -> Result<bool, String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask has no parent directory")?
        .to_path_buf();
    let dir = root.join("target").join("mutants");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = dir.join("mutants.out");
    if args.iterate {
        cmd_iterate_check(&out)?;
    } else {
        let _ = fs::remove_dir_all(&out);
    }
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(&root)
        .args(["mutants", "--no-shuffle", "--colors", "never", "--output"])
        .arg(&dir);
    if let Some(d) = &args.in_diff {
        let d = if d.is_absolute() {
            d.clone()
        } else {
            std::env::current_dir().map_err(|e| e.to_string())?.join(d)
        };
        if !d.is_file() {
            return Err(format!("--in-diff {}: no such file", d.display()));
        }
        cmd.arg("--in-diff").arg(d);
    }
    for f in &args.files {
        cmd.args(["--re", &file_regex(f)]);
    }
    if args.own_tests {
        // The config without its test command: cargo-mutants then tests each mutant with the
        // tests of the package it mutates (a --test-package on the command line would apply one
        // package to every mutant).
        let own = dir.join("own-tests.toml");
        fs::write(&own, own_tests_config(&root)?).map_err(|e| format!("{}: {e}", own.display()))?;
        cmd.arg("--config").arg(&own);
    }
    if args.in_place {
        // A clean clone's own checkout and the target/ that `cargo test` just built: only the
        // mutated crate and its dependents rebuild; the tests just passed, so no baseline.
        cmd.args([
            "--in-place",
            "--profile",
            "test",
            "--baseline",
            "skip",
            "--timeout",
            "300",
            "--build-timeout",
            "600",
        ]);
    }
    if let Some(s) = &args.shard {
        cmd.args(["--shard", s]);
    }
    if args.iterate {
        cmd.arg("--iterate");
    }
    if let Some(j) = args.jobs {
        cmd.args(["--jobs", &j.to_string()]);
    }
    let log = dir.join("log.txt");
    let bound = if args.timeout_secs == 0 {
        Duration::from_secs(u64::MAX / 4)
    } else {
        Duration::from_secs(args.timeout_secs)
    };
    eprintln!(
        "xtask mutants: cargo mutants (config .cargo/mutants.toml), log {}",
        log.display()
    );
    let outcome = run_logged(cmd, &log, None, bound)?;
    let (files, missed) = summarise(&out)?;
    if args.in_place && outcome.timed_out {
        // Killed at the bound, cargo-mutants may not have put the mutated file back.
        restore(&root, files.keys())?;
    }
    let text = table(&files);
    let mut all = Counts::default();
    files.values().for_each(|c| all.add(c));
    let head = format!(
        "cargo mutants: {} mutants tested in {:.0} s{}: {} caught, {} missed, {} unviable, {} timeout, {} not tested\n",
        all.tested(),
        outcome.seconds,
        if outcome.timed_out { " (stopped at the time bound)" } else { "" },
        all.caught,
        all.missed,
        all.unviable,
        all.timeout,
        all.not_tested
    );
    let mut md = format!("# Mutation testing\n\n{head}\n{text}");
    if !missed.is_empty() {
        md.push_str("\n## Missed\n\n");
        for m in &missed {
            md.push_str(&format!("- {m}\n"));
        }
    }
    fs::write(dir.join("summary.md"), &md).map_err(|e| e.to_string())?;
    let json = serde_json::json!({
        "seconds": outcome.seconds,
        "stopped_at_time_bound": outcome.timed_out,
        "files": files,
        "missed": missed,
    });
    fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    print!("{head}{text}");
    for m in &missed {
        println!("MISSED {m}");
    }
    println!("xtask mutants: wrote {}", dir.join("summary.md").display());
    // cargo-mutants exits 2 when mutants were missed, 3 on timeouts, 4 when the baseline fails.
    let tool_failed = !outcome.timed_out && !matches!(outcome.code, Some(0) | Some(2) | Some(3));
    if tool_failed {
        eprintln!(
            "xtask mutants: cargo mutants ended with {} (see {})",
            outcome.note,
            log.display()
        );
    }
    Ok(missed.is_empty() && !tool_failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_tests_drop_only_the_test_command() {
        let c =
            "examine_globs = [\"a.rs\"]\ntest_package = [\"x\", \"y\"]\nprofile = \"mutants\"\n";
        assert_eq!(
            drop_test_package(c),
            "examine_globs = [\"a.rs\"]\nprofile = \"mutants\"\n"
        );
    }

    #[test]
    fn a_file_prefix_is_an_anchored_name_regex() {
        assert_eq!(
            file_regex("placement/src/view.rs"),
            "^placement/src/view\\.rs:"
        );
        assert_eq!(file_regex("adapters/"), "^adapters/");
    }

    #[test]
    fn counts_per_file_include_what_a_bounded_run_did_not_reach() {
        let out = &std::env::temp_dir().join(format!("xtask-mutants-{}", std::process::id()));
        fs::create_dir_all(out).unwrap();
        fs::write(
            out.join("caught.txt"),
            "placement/src/shard.rs:10:5: replace chunk -> usize with 0\nplacement/src/shard.rs:12:9: replace + with -\n",
        )
        .unwrap();
        fs::write(
            out.join("missed.txt"),
            "adapters/src/layout.rs:100:12: replace && with ||\n",
        )
        .unwrap();
        fs::write(
            out.join("unviable.txt"),
            "placement/src/view.rs:3:1: replace f -> X with Default::default()\n",
        )
        .unwrap();
        fs::write(
            out.join("mutants.json"),
            r#"[{"file": "placement/src/shard.rs"}, {"file": "placement/src/shard.rs"},
                {"file": "placement/src/shard.rs"}, {"file": "adapters/src/layout.rs"},
                {"file": "placement/src/view.rs"}, {"file": "moe-kernels/src/permute.rs"}]"#,
        )
        .unwrap();
        let (files, missed) = summarise(out).unwrap();
        assert_eq!(
            missed,
            vec!["adapters/src/layout.rs:100:12: replace && with ||"]
        );
        let shard = &files["placement/src/shard.rs"];
        assert_eq!((shard.caught, shard.not_tested), (2, 1));
        assert_eq!(files["adapters/src/layout.rs"].missed, 1);
        assert_eq!(files["placement/src/view.rs"].unviable, 1);
        assert_eq!(files["moe-kernels/src/permute.rs"].not_tested, 1);
        let t = table(&files);
        assert!(t.contains("| **placement** | 2 | 0 | 1 | 0 | 1 |"), "{t}");
        assert!(t.contains("| **all** | 2 | 1 | 1 | 0 | 2 |"), "{t}");
        let _ = fs::remove_dir_all(out);
    }
}
