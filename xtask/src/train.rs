//! Suite `train`: save / resume scenarios of `conformance train` for one (backend, world size),
//! each a report row, plus the loss curves for report.html.
//!
//! Runs (under `target/conformance/train/<backend>-w<W>/`; every run is a new process with the
//! timeout and process-group handling of [`crate::process::run_logged`]):
//! 1. `A`: 8 steps, plan `ep`, uninterrupted;
//! 2. `B1`: 4 steps saving every 2 into `C`, then `B2`: resume from `C` to step 8;
//!    `compare-train --exact` against `A`;
//! 3. `B3`: resume from `C` on another mesh (`ep-tp` at world 4; quick: `single` at world 1),
//!    `compare-train --atol 1e-5 --rtol 1e-4` against `A`;
//! 4. `D`: rank 1 dies while saving step 4 (must fail), then `E`: resume from `D` must skip the
//!    incomplete step-4 dir, resume from step 2 and match `A` exactly;
//! 5. `F`: rank 1 dies at the start of step 3: the job must fail within [`KILL_BOUND`] with an
//!    error on stderr (or, under MPI, in the ranks' fault report files).
//! 6. `G`: 2 steps of a plan with `_StridedShard` placements (packed gate|up `_S(2, 2)`: `tp` at
//!    world 2, `ep-tp` at world 4) saved at step 2; `conformance dcp` must pass on that checkpoint
//!    and on `C`'s step 4 (torch DCP layout, every item, placements named). `G/step_00000002` with
//!    `G-out/weights.safetensors` is what `generate_dcp.py verify-ours` loads with stock torch.

use crate::html::{Marker, Plot, Series};
use crate::process::{launcher, log_tail, rank_args, run_logged, RunOutcome};
use crate::results::{Failure, Row};
use crate::Backend;
use serde::Deserialize;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A job with a killed rank must end within this.
pub const KILL_BOUND: Duration = Duration::from_secs(60);
/// Per-collective timeout (`COLLECTIVES_TIMEOUT_SECS`) given to the ranks of the kill scenarios,
/// well inside [`KILL_BOUND`] (the default is 60 s).
pub const KILL_COLLECTIVE_TIMEOUT_SECS: u64 = 20;
/// Steps of the full runs.
pub const STEPS: u64 = 8;
/// The plan of the scenarios.
pub const PLAN: &str = "ep";
/// Tolerance of the other-mesh resume.
pub const OTHER_MESH_ATOL: &str = "1e-5";
pub const OTHER_MESH_RTOL: &str = "1e-4";

pub const ROW_UNINTERRUPTED: &str = "uninterrupted run";
pub const ROW_SAME_MESH: &str = "resume same mesh: bit-identical";
pub const ROW_OTHER_MESH: &str = "resume other mesh: within tolerance";
pub const ROW_KILL_SAVE: &str = "kill during save: resume skips the incomplete step";
pub const ROW_CRASH_WRITE: &str =
    "crash mid-write of a checkpoint file: resume skips the partial step";
pub const ROW_DISK_FULL: &str =
    "disk full during save: the error names the file, resume skips the step";

/// A fault in the step-4 save of scenario 4.
pub struct SaveFault {
    /// The `conformance train` flag that sets it (with `--kill-rank 1`).
    pub flag: &'static str,
    /// What it is, for progress and verdicts.
    pub what: &'static str,
    /// What the failing job's stderr must say.
    pub says: &'static [&'static str],
    /// Whether a partial data file (`.__R_0.distcp.tmp-PID`) must be left in the step-4 dir: the
    /// proof that the process died part-way through writing it.
    pub leaves_partial: bool,
}

/// The save faults, in row order: a rank killed after writing its file (before the commit), a
/// crash part-way through the file (file-size limit, SIGXFSZ), a full disk (EFBIG).
pub const SAVE_FAULTS: [SaveFault; 3] = [
    SaveFault {
        flag: "--kill-in-save-at-step",
        what: "rank 1 killed in the step-4 save",
        says: &[],
        leaves_partial: false,
    },
    SaveFault {
        flag: "--crash-mid-write-at-step",
        what: "a crash mid-write in the step-4 save",
        says: &["file-size limit"],
        leaves_partial: true,
    },
    SaveFault {
        flag: "--disk-full-at-step",
        what: "a full disk in the step-4 save",
        says: &[".distcp", "File too large"],
        leaves_partial: false,
    },
];
pub const ROW_KILL_TRAIN: &str = "kill during training: error in bounded time";
pub const ROW_DCP: &str = "saved checkpoints (incl. _S placements) pass conformance dcp";

/// The plan of scenario `G` (packed gate|up `_S(2, 2)` on the TP mesh dim) at `world` ranks.
pub fn strided_plan(world: usize) -> &'static str {
    if world >= 4 {
        "ep-tp"
    } else {
        "tp"
    }
}

/// Verdict of one `conformance dcp` run: its exit and its closing `N passed, 0 failed` line, with
/// the line of the first `gate_and_up_projs` tensor (its chunk count and layout) as the note.
pub fn dcp_verdict(out: &RunOutcome, stdout: &str) -> Result<String, String> {
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.contains(" passed, "))
        .unwrap_or("");
    if !out.ok || !last.contains(" 0 failed") {
        let fails: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("FAIL"))
            .take(3)
            .collect();
        return Err(format!(
            "conformance dcp: {} ({last}) {}",
            out.note,
            fails.join(" | ")
        ));
    }
    let gu = stdout
        .lines()
        .find(|l| l.contains("gate_and_up_projs (") && l.contains("PASS"))
        .map(|l| l.trim().trim_start_matches("[dcp] PASS ").to_string())
        .unwrap_or_default();
    Ok(format!(
        "{}{}",
        last.trim(),
        if gu.is_empty() {
            String::new()
        } else {
            format!("; {gu}")
        }
    ))
}

/// One loss of `train.json`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Loss {
    pub step: u64,
    pub loss: f64,
}

/// `DIR/train.json` as `conformance train` writes it.
#[derive(Debug, Clone, Deserialize)]
pub struct TrainJson {
    pub plan: String,
    pub world: usize,
    #[serde(default)]
    pub mesh: Vec<usize>,
    #[serde(default)]
    pub start_step: u64,
    pub steps: u64,
    pub losses: Vec<Loss>,
    #[serde(default)]
    pub resumed_from: Option<String>,
    #[serde(default)]
    pub incomplete_skipped: Vec<String>,
    #[serde(default)]
    pub weights_digest: String,
}

/// The name of the step-`k` checkpoint dir.
pub fn step_dir(k: u64) -> String {
    format!("step_{k:08}")
}

/// The last component of a path as written in train.json (absolute, relative or a bare name).
fn last_component(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or(p)
}

/// Reads `dir/train.json` and checks that `dir/weights.safetensors` exists.
pub fn read_train(dir: &Path) -> Result<TrainJson, String> {
    let path = dir.join("train.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tj: TrainJson =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let weights = dir.join("weights.safetensors");
    if !weights.is_file() {
        return Err(format!("{} missing", weights.display()));
    }
    Ok(tj)
}

/// The run trained `plan` on `world` ranks from `start` to `steps`, with one finite loss per step
/// (`start + 1 ..= steps`, in order) and a weights digest; a run from step 0 was not resumed.
pub fn check_run(
    tj: &TrainJson,
    plan: &str,
    world: usize,
    start: u64,
    steps: u64,
) -> Result<(), String> {
    if tj.plan != plan || tj.world != world {
        return Err(format!(
            "train.json says plan {} world {}, expected plan {plan} world {world}",
            tj.plan, tj.world
        ));
    }
    if tj.start_step != start || tj.steps != steps {
        return Err(format!(
            "train.json says start_step {} steps {}, expected {start} and {steps}",
            tj.start_step, tj.steps
        ));
    }
    if start == 0 && tj.resumed_from.is_some() {
        return Err(format!(
            "a fresh run says resumed_from {:?}",
            tj.resumed_from
        ));
    }
    let got: Vec<u64> = tj.losses.iter().map(|l| l.step).collect();
    let want: Vec<u64> = (start + 1..=steps).collect();
    if got != want {
        return Err(format!("losses are for steps {got:?}, expected {want:?}"));
    }
    if let Some(l) = tj.losses.iter().find(|l| !l.loss.is_finite()) {
        return Err(format!("loss of step {} is {}", l.step, l.loss));
    }
    if tj.weights_digest.is_empty() {
        return Err("train.json has no weights_digest".into());
    }
    Ok(())
}

/// The run resumed from the step-`from` dir and reported the step dirs `skipped` as incomplete.
pub fn check_resume(tj: &TrainJson, from: u64, skipped: &[u64]) -> Result<(), String> {
    let want = step_dir(from);
    match tj.resumed_from.as_deref() {
        Some(p) if last_component(p) == want => {}
        other => {
            return Err(format!(
                "resumed_from is {other:?}, expected the {want} dir"
            ))
        }
    }
    for k in skipped {
        let name = step_dir(*k);
        if !tj
            .incomplete_skipped
            .iter()
            .any(|p| last_component(p) == name)
        {
            return Err(format!(
                "incomplete_skipped is {:?}, expected it to list the {name} dir",
                tj.incomplete_skipped
            ));
        }
    }
    Ok(())
}

/// Verdict of a job with a killed rank: it must exit non-zero, by itself (not by our timeout),
/// within `bound`, and report an error on stderr or in a rank's fault report file: a line saying
/// "error" (any case; one naming a collective preferred), else a collectives fault report naming
/// the collective (`(collective #N`). Ok: the note, with the seconds and that line.
pub fn kill_verdict(
    out: &RunOutcome,
    bound: Duration,
    stderr: &str,
    reports: &str,
) -> Result<String, String> {
    if out.ok {
        return Err("the job exited with status 0, but a rank was killed".into());
    }
    if out.timed_out || out.seconds > bound.as_secs_f64() {
        return Err(format!(
            "the job did not end by itself within {} s ({:.1} s; {})",
            bound.as_secs(),
            out.seconds,
            out.note
        ));
    }
    let has_error = |l: &&str| l.to_ascii_lowercase().contains("error");
    let names_collective =
        |l: &&str| l.contains("collective") || COLLECTIVE_OPS.iter().any(|op| l.contains(op));
    let pick = |text: &str| -> Option<(String, bool)> {
        let errors: Vec<&str> = text.lines().filter(has_error).collect();
        errors
            .iter()
            .find(|l| names_collective(l))
            .map(|l| (l.trim().to_string(), true))
            .or_else(|| errors.first().map(|l| (l.trim().to_string(), false)))
    };
    // Under MPI the surviving ranks are usually ended by mpirun's SIGTERM; their report is the
    // collectives fault line `... terminated by signal 15 while in all_to_all (collective #20 ...)`:
    // an error naming the collective, though without the word.
    let fault_report = |text: &str| -> Option<String> {
        text.lines()
            .find(|l| l.contains("(collective #"))
            .map(|l| l.trim().to_string())
    };
    let found = pick(stderr)
        .map(|(l, c)| (l, c, ""))
        .or_else(|| pick(reports).map(|(l, c)| (l, c, "rank fault report: ")))
        .or_else(|| {
            fault_report(stderr)
                .or_else(|| fault_report(reports))
                .map(|l| {
                    (
                        l,
                        true,
                        "no line says \"error\"; collectives fault report: ",
                    )
                })
        });
    match found {
        Some((line, names, from)) => Ok(format!(
            "failed in {:.1} s ({}); {from}{line}{}",
            out.seconds,
            out.note,
            if names {
                ""
            } else {
                " (no error line names a collective)"
            }
        )),
        None => Err(format!(
            "the job failed in {:.1} s ({}) but printed no error on stderr",
            out.seconds, out.note
        )),
    }
}

/// Collective names looked for in a killed job's error.
const COLLECTIVE_OPS: [&str; 7] = [
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "all_to_all",
    "broadcast",
    "barrier",
    "send",
];

/// Verdict of `compare-train` from its exit code (0 equal, 1 differ, 2 unusable input).
pub fn compare_verdict(out: &RunOutcome, output: &str) -> Result<(), String> {
    let tail = |n: usize| {
        let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[..lines.len().min(n)].join(" | ")
    };
    match (out.timed_out, out.code) {
        (true, _) => Err(format!("compare-train: {}", out.note)),
        (false, Some(0)) => Ok(()),
        (false, Some(1)) => Err(format!("compare-train: differ: {}", tail(4))),
        (false, Some(2)) => Err(format!("compare-train: unusable input: {}", tail(4))),
        _ => Err(format!("compare-train: {}: {}", out.note, tail(4))),
    }
}

/// Loss points of a run.
fn points(tj: &TrainJson) -> Vec<(f64, f64)> {
    tj.losses.iter().map(|l| (l.step as f64, l.loss)).collect()
}

/// The loss-curve plot of one group: uninterrupted `a`, resumed `b1` then `b2` (with the resume
/// point marked), other-mesh resume `b3`. None when there is nothing to draw.
pub fn loss_plot(
    title: &str,
    a: Option<&TrainJson>,
    b1: Option<&TrainJson>,
    b2: Option<&TrainJson>,
    b3: Option<&TrainJson>,
) -> Option<Plot> {
    let mut series = Vec::new();
    let mut markers = Vec::new();
    if let Some(a) = a {
        series.push(Series {
            name: format!("uninterrupted (A, {} world {})", a.plan, a.world),
            points: points(a),
        });
    }
    if b1.is_some() || b2.is_some() {
        let mut pts: Vec<(f64, f64)> = b1.map(points).unwrap_or_default();
        if let Some(b2) = b2 {
            pts.extend(points(b2));
            markers.push(Marker {
                x: b2.start_step as f64,
                label: format!("resume (step {})", b2.start_step),
            });
        }
        series.push(Series {
            name: "saved + resumed (B1, B2)".into(),
            points: pts,
        });
    }
    if let Some(b3) = b3 {
        series.push(Series {
            name: format!(
                "resumed on {} world {} mesh {:?} (B3)",
                b3.plan, b3.world, b3.mesh
            ),
            points: points(b3),
        });
    }
    if series.is_empty() {
        return None;
    }
    Some(Plot {
        title: title.into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series,
        markers,
    })
}

/// The scenarios of one (backend, world size).
pub struct Group {
    pub bin: PathBuf,
    pub backend: Backend,
    pub world: usize,
    pub quick: bool,
    pub as_root: bool,
    pub timeout: Duration,
    /// Work folder (emptied first): out dirs and checkpoint roots.
    pub dir: PathBuf,
    pub logs: PathBuf,
}

/// One finished child: outcome and its logs.
struct Ran {
    out: RunOutcome,
    log: PathBuf,
    err: PathBuf,
}

impl Ran {
    /// The last log lines, for a failure message.
    fn tail(&self) -> String {
        format!(
            "stderr {}: {} ; stdout {}: {}",
            self.err.display(),
            log_tail(&self.err, 4),
            self.log.display(),
            log_tail(&self.log, 2)
        )
    }
    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap_or_default()
    }
}

/// The partial data files a save interrupted mid-write leaves in `dir` (name and bytes).
fn partial_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let len = e.metadata().ok()?.len();
            name.contains(".distcp.tmp-")
                .then(|| format!("{name} ({len} bytes)"))
        })
        .collect();
    v.sort();
    v
}

/// A passing or failing scenario row.
fn row(
    backend: &str,
    world: usize,
    name: &str,
    seconds: f64,
    verdict: Result<String, String>,
) -> Row {
    let mut r = Row::new("train", backend, world, seconds);
    r.name = name.into();
    match verdict {
        Ok(note) => {
            r.passed = 1;
            r.note = note;
        }
        Err(message) => {
            r.failed = 1;
            r.failures.push(Failure {
                name: name.into(),
                message,
            });
        }
    }
    r
}

impl Group {
    /// The other mesh of the resume scenario: (plan, world).
    pub fn other_mesh(quick: bool) -> (&'static str, usize) {
        if quick {
            ("single", 1)
        } else {
            ("ep-tp", 4)
        }
    }

    /// The arguments of `conformance train` on `world` ranks.
    pub fn train_args(&self, plan: &str, world: usize, extra: &[&str]) -> Vec<String> {
        let mut a = rank_args("train", self.backend, world);
        a.extend(["--plan".into(), plan.into()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn log_paths(&self, tag: &str) -> (PathBuf, PathBuf) {
        let base = format!("train-{}-w{}-{tag}", self.backend.name(), self.world);
        (
            self.logs.join(format!("{base}.log")),
            self.logs.join(format!("{base}.err.log")),
        )
    }

    /// Runs `conformance train` (tag names the logs).
    fn train(
        &self,
        tag: &str,
        plan: &str,
        world: usize,
        extra: &[&str],
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Ran, String> {
        let args = self.train_args(plan, world, extra);
        let cmd = launcher(&self.bin, self.backend, world, self.as_root, env, &args);
        let (log, err) = self.log_paths(tag);
        let out = run_logged(cmd, &log, Some(&err), timeout)?;
        Ok(Ran { out, log, err })
    }

    /// Runs `compare-train` of `candidate` against `reference`.
    fn compare(
        &self,
        tag: &str,
        reference: &str,
        candidate: &str,
        mode: &[&str],
    ) -> Result<(f64, Result<(), String>), String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "compare-train",
            "--reference",
            reference,
            "--candidate",
            candidate,
        ]);
        cmd.args(mode);
        let (log, err) = self.log_paths(tag);
        let out = run_logged(cmd, &log, Some(&err), self.timeout)?;
        let text = format!(
            "{}\n{}",
            fs::read_to_string(&log).unwrap_or_default(),
            fs::read_to_string(&err).unwrap_or_default()
        );
        Ok((out.seconds, compare_verdict(&out, &text)))
    }

    /// A finished training run that must have succeeded and written a valid train.json.
    fn finished(
        &self,
        ran: &Ran,
        what: &str,
        dir: &str,
        expect: (&str, usize, u64, u64),
    ) -> Result<TrainJson, String> {
        if !ran.out.ok {
            return Err(format!("{what} failed ({}); {}", ran.out.note, ran.tail()));
        }
        let tj = read_train(Path::new(dir)).map_err(|e| format!("{what}: {e}; {}", ran.tail()))?;
        check_run(&tj, expect.0, expect.1, expect.2, expect.3)
            .map_err(|e| format!("{what}: {e}"))?;
        Ok(tj)
    }

    /// The environment of a job with a killed rank: a short collective timeout and a report dir.
    fn kill_env(&self, tag: &str) -> Vec<(&'static str, String)> {
        let reports = self.dir.join(format!("{tag}-reports"));
        let _ = fs::create_dir_all(&reports);
        vec![
            (
                "COLLECTIVES_TIMEOUT_SECS",
                KILL_COLLECTIVE_TIMEOUT_SECS.to_string(),
            ),
            ("COLLECTIVES_REPORT_DIR", reports.display().to_string()),
        ]
    }

    /// Scenario 4 with one fault: run `tags.0` saves every 2 steps and meets `fault` in the
    /// step-4 save (it must fail, by itself, in bounded time, saying what `fault.says`); run
    /// `tags.1` resumes from step 2, reports step 4 as skipped and matches run A bit for bit.
    fn fault_in_save(
        &self,
        fault: &SaveFault,
        tags: (&str, &str),
        a_dir: &str,
    ) -> Result<(f64, Result<String, String>), String> {
        let steps = STEPS.to_string();
        let w = self.world;
        let (root, out, resumed) = (
            self.path(tags.0),
            self.path(&format!("{}-out", tags.0)),
            self.path(tags.1),
        );
        let d = self.train(
            tags.0,
            PLAN,
            w,
            &[
                "--steps",
                &steps,
                "--ckpt-root",
                &root,
                "--save-every",
                "2",
                "--kill-rank",
                "1",
                fault.flag,
                "4",
                "--out-dir",
                &out,
            ],
            &self.kill_env(tags.0),
            self.timeout,
        )?;
        let mut secs = d.out.seconds;
        let stderr = d.stderr();
        let verdict = if d.out.ok {
            Err(format!(
                "the job with {} exited with status 0; {}",
                fault.what,
                d.tail()
            ))
        } else if d.out.timed_out {
            Err(format!(
                "the job with {} did not end ({}); {}",
                fault.what,
                d.out.note,
                d.tail()
            ))
        } else if let Some(missing) = fault.says.iter().find(|w| !stderr.contains(*w)) {
            Err(format!(
                "the job with {} failed without saying '{missing}'; {}",
                fault.what,
                d.tail()
            ))
        } else if fault.leaves_partial
            && partial_files(&Path::new(&root).join(step_dir(4))).is_empty()
        {
            Err(format!(
                "the job with {} left no partial .distcp.tmp file in {}; {}",
                fault.what,
                step_dir(4),
                d.tail()
            ))
        } else {
            let partial = partial_files(&Path::new(&root).join(step_dir(4)));
            // The line naming the file, from its "error:" on (a library may print before it).
            let said = fault.says.first().and_then(|w| {
                stderr
                    .lines()
                    .find(|l| l.contains(w))
                    .map(|l| l.find("error:").map_or(l, |i| &l[i..]))
            });
            let killed_note = if let (true, Some(line)) = (partial.is_empty(), said) {
                format!(
                    "failed in {:.1} s ({}): {}",
                    d.out.seconds,
                    d.out.note,
                    line.trim()
                )
            } else if partial.is_empty() {
                format!("failed in {:.1} s ({})", d.out.seconds, d.out.note)
            } else {
                format!(
                    "failed in {:.1} s ({}), leaving {}",
                    d.out.seconds,
                    d.out.note,
                    partial.join(", ")
                )
            };
            let e = self.train(
                tags.1,
                PLAN,
                w,
                &[
                    "--steps",
                    &steps,
                    "--ckpt-root",
                    &root,
                    "--resume",
                    "--out-dir",
                    &resumed,
                ],
                &[],
                self.timeout,
            )?;
            secs += e.out.seconds;
            let what = format!("resume {}", tags.1);
            match self
                .finished(&e, &what, &resumed, (PLAN, w, 2, STEPS))
                .and_then(|tj| check_resume(&tj, 2, &[4]).map_err(|e| format!("{what}: {e}")))
            {
                Err(e) => Err(format!("{killed_note}; {e}")),
                Ok(()) => {
                    let cmp = format!("cmp-A-{}", tags.1);
                    let (s, v) = self.compare(&cmp, a_dir, &resumed, &["--exact"])?;
                    secs += s;
                    v.map(|()| {
                        format!(
                            "{killed_note}; resume skipped {} and matched run A bit for bit",
                            step_dir(4)
                        )
                    })
                }
            }
        };
        Ok((secs, verdict))
    }

    /// Runs the scenarios; `progress` gets a short message before each run.
    pub fn run(&self, progress: &dyn Fn(&str)) -> Result<(Vec<Row>, Option<Plot>), String> {
        let _ = fs::remove_dir_all(&self.dir);
        fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        fs::create_dir_all(&self.logs).map_err(|e| format!("{}: {e}", self.logs.display()))?;
        let b = self.backend.name();
        let w = self.world;
        let say = |m: &str| progress(&format!("train {b} world {w}: {m}"));
        let steps = STEPS.to_string();
        let mut rows = Vec::new();
        let (a_dir, b1_dir, b2_dir, b3_dir) = (
            self.path("A"),
            self.path("B1"),
            self.path("B2"),
            self.path("B3"),
        );
        let c_root = self.path("C");
        let f_out = self.path("F");

        // 1. Uninterrupted reference.
        say("uninterrupted");
        let a = self.train(
            "A",
            PLAN,
            w,
            &["--steps", &steps, "--out-dir", &a_dir],
            &[],
            self.timeout,
        )?;
        let a_json = self.finished(&a, "run A", &a_dir, (PLAN, w, 0, STEPS));
        rows.push(row(
            b,
            w,
            ROW_UNINTERRUPTED,
            a.out.seconds,
            a_json
                .as_ref()
                .map(|tj| {
                    format!(
                        "{} steps, final loss {:.6}",
                        tj.steps,
                        tj.losses.last().map(|l| l.loss).unwrap_or(f64::NAN)
                    )
                })
                .map_err(|e| e.clone()),
        ));
        let needs_a = |e: Result<String, String>| -> Result<String, String> {
            match (&a_json, e) {
                (Err(_), Err(e)) => Err(format!("{e} (the reference run A failed too)")),
                (_, r) => r,
            }
        };

        // 2. Save (steps 1..4, every 2), resume in a new process to step 8, bit-identical to A.
        say("save, resume same mesh");
        let b1 = self.train(
            "B1",
            PLAN,
            w,
            &[
                "--steps",
                "4",
                "--ckpt-root",
                &c_root,
                "--save-every",
                "2",
                "--out-dir",
                &b1_dir,
            ],
            &[],
            self.timeout,
        )?;
        let b1_json = self.finished(&b1, "first part B1", &b1_dir, (PLAN, w, 0, 4));
        let mut secs = b1.out.seconds;
        let mut b2_json = None;
        let verdict = match &b1_json {
            Err(e) => Err(e.clone()),
            Ok(_) => {
                let b2 = self.train(
                    "B2",
                    PLAN,
                    w,
                    &[
                        "--steps",
                        &steps,
                        "--ckpt-root",
                        &c_root,
                        "--resume",
                        "--out-dir",
                        &b2_dir,
                    ],
                    &[],
                    self.timeout,
                )?;
                secs += b2.out.seconds;
                match self
                    .finished(&b2, "resume B2", &b2_dir, (PLAN, w, 4, STEPS))
                    .and_then(|tj| {
                        check_resume(&tj, 4, &[])
                            .map(|()| tj)
                            .map_err(|e| format!("resume B2: {e}"))
                    }) {
                    Err(e) => Err(e),
                    Ok(tj) => {
                        b2_json = Some(tj);
                        let (s, v) = self.compare("cmp-A-B2", &a_dir, &b2_dir, &["--exact"])?;
                        secs += s;
                        v.map(|()| {
                            "steps 5-8 and final weights equal run A's bit for bit".to_string()
                        })
                    }
                }
            }
        };
        rows.push(row(b, w, ROW_SAME_MESH, secs, needs_a(verdict)));

        // 3. Resume the same checkpoint on another mesh, within tolerance of A.
        let (plan3, world3) = Group::other_mesh(self.quick);
        say(&format!("resume on {plan3} world {world3}"));
        let mut b3_json = None;
        let mut secs = 0.0;
        let verdict = match &b1_json {
            Err(e) => Err(format!("no checkpoint to resume: {e}")),
            Ok(_) => {
                let b3 = self.train(
                    "B3",
                    plan3,
                    world3,
                    &[
                        "--steps",
                        &steps,
                        "--ckpt-root",
                        &c_root,
                        "--resume",
                        "--out-dir",
                        &b3_dir,
                    ],
                    &[],
                    self.timeout,
                )?;
                secs += b3.out.seconds;
                match self
                    .finished(
                        &b3,
                        &format!("resume B3 ({plan3} world {world3})"),
                        &b3_dir,
                        (plan3, world3, 4, STEPS),
                    )
                    .and_then(|tj| {
                        check_resume(&tj, 4, &[])
                            .map(|()| tj)
                            .map_err(|e| format!("resume B3: {e}"))
                    }) {
                    Err(e) => Err(e),
                    Ok(tj) => {
                        let mesh = tj.mesh.clone();
                        b3_json = Some(tj);
                        let (s, v) = self.compare(
                            "cmp-A-B3",
                            &a_dir,
                            &b3_dir,
                            &["--atol", OTHER_MESH_ATOL, "--rtol", OTHER_MESH_RTOL],
                        )?;
                        secs += s;
                        v.map(|()| {
                            format!(
                                "resumed on {plan3} world {world3} (mesh {mesh:?}): within atol {OTHER_MESH_ATOL} rtol {OTHER_MESH_RTOL} of run A"
                            )
                        })
                    }
                }
            }
        };
        rows.push(row(b, w, ROW_OTHER_MESH, secs, needs_a(verdict)));

        // 4. A rank dies while saving step 4 (after its file, mid-file, or its disk fills); the
        // resume skips that dir and restarts from step 2.
        for (fault, (tags, row_name)) in SAVE_FAULTS.iter().zip([
            (("D", "E"), ROW_KILL_SAVE),
            (("H", "I"), ROW_CRASH_WRITE),
            (("J", "K"), ROW_DISK_FULL),
        ]) {
            say(fault.what);
            let (secs, verdict) = self.fault_in_save(fault, tags, &a_dir)?;
            rows.push(row(b, w, row_name, secs, needs_a(verdict)));
        }

        // 5. A rank dies at the start of step 3: error in bounded time.
        say("kill during training");
        let env = self.kill_env("F");
        let f = self.train(
            "F",
            PLAN,
            w,
            &[
                "--steps",
                &steps,
                "--kill-rank",
                "1",
                "--kill-at-step",
                "3",
                "--out-dir",
                &f_out,
            ],
            &env,
            KILL_BOUND.min(self.timeout),
        )?;
        let reports = read_reports(Path::new(&env[1].1));
        let verdict = match (&a_json, kill_verdict(&f.out, KILL_BOUND, &f.stderr(), &reports)) {
            // A failing job proves nothing when `train` fails without a kill too.
            (Err(_), Ok(note)) => Err(format!(
                "the uninterrupted run A failed, so this failure does not show the kill was detected ({note})"
            )),
            (_, v) => v.map_err(|e| format!("{e}; {}", f.tail())),
        };
        rows.push(row(b, w, ROW_KILL_TRAIN, f.out.seconds, verdict));

        // 6. Save with _StridedShard placements; conformance dcp on that and on C's checkpoint.
        let splan = strided_plan(w);
        say(&format!("save on {splan}, conformance dcp"));
        let (g_root, g_out) = (self.path("G"), self.path("G-out"));
        let g = self.train(
            "G",
            splan,
            w,
            &[
                "--steps",
                "2",
                "--ckpt-root",
                &g_root,
                "--save-every",
                "2",
                "--out-dir",
                &g_out,
            ],
            &[],
            self.timeout,
        )?;
        let mut secs = g.out.seconds;
        let verdict = match self.finished(
            &g,
            &format!("save run G ({splan})"),
            &g_out,
            (splan, w, 0, 2),
        ) {
            Err(e) => Err(e),
            Ok(_) => {
                let mut notes = Vec::new();
                let mut bad = None;
                for (tag, dir) in [
                    ("dcp-G", Path::new(&g_root).join(step_dir(2))),
                    ("dcp-C", Path::new(&c_root).join(step_dir(4))),
                ] {
                    let mut cmd = Command::new(&self.bin);
                    cmd.args(["dcp", "--checkpoint", &dir.display().to_string()]);
                    let (log, err) = self.log_paths(tag);
                    let out = run_logged(cmd, &log, Some(&err), self.timeout)?;
                    secs += out.seconds;
                    let text = fs::read_to_string(&log).unwrap_or_default();
                    match dcp_verdict(&out, &text) {
                        Ok(n) => notes.push(format!("{}: {n}", &tag[4..])),
                        Err(e) => {
                            bad = Some(format!(
                                "{}: {e}; stderr {}",
                                dir.display(),
                                log_tail(&err, 2)
                            ))
                        }
                    }
                }
                match bad {
                    Some(e) => Err(e),
                    None => Ok(format!("{splan}: {}", notes.join("; "))),
                }
            }
        };
        rows.push(row(b, w, ROW_DCP, secs, verdict));

        let title = format!("Loss, plan {PLAN}, {b} world {w}");
        let plot = loss_plot(
            &title,
            a_json.as_ref().ok(),
            b1_json.as_ref().ok(),
            b2_json.as_ref(),
            b3_json.as_ref(),
        );
        Ok((rows, plot))
    }
}

/// Every rank's fault report file of a folder, concatenated.
fn read_reports(dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(entries) = fs::read_dir(dir) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            out.push_str(&fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}
