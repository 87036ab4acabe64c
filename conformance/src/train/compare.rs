//! Comparison of two runs' results: losses and final weights, bit for bit or within a tolerance.

use super::*;

/// How `compare-train` compares.
#[derive(Debug, Clone, Copy)]
pub enum Compare {
    Exact,
    Tolerance { atol: f64, rtol: f64 },
}

pub(super) fn close(a: f64, b: f64, how: Compare) -> bool {
    match how {
        Compare::Exact => a.to_bits() == b.to_bits(),
        Compare::Tolerance { atol, rtol } => (a - b).abs() <= atol + rtol * b.abs(),
    }
}

pub(super) fn read_result(
    dir: &Path,
) -> Result<(TrainResult, BTreeMap<String, HostTensor>), String> {
    let path = dir.join("train.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r: TrainResult =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let wpath = dir.join("weights.safetensors");
    let bytes = std::fs::read(&wpath).map_err(|e| format!("{}: {e}", wpath.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: {e}", wpath.display()))?;
    let mut w = BTreeMap::new();
    for (k, v) in st.tensors() {
        let t = HostTensor::new(v.dtype(), v.shape().to_vec(), v.data().to_vec())
            .map_err(|e| format!("{}: {k}: {e}", wpath.display()))?;
        w.insert(k, t);
    }
    Ok((r, w))
}

/// Compares a candidate run with a reference run: the candidate's losses against the reference's
/// at the same steps, and the final weights. `Ok(messages)` when equal, `Err(Ok(messages))` when they
/// differ (messages name the first differing step / tensor), `Err(Err(e))` for unusable input.
pub fn compare_runs(
    reference: &Path,
    candidate: &Path,
    how: Compare,
) -> Result<Vec<String>, Result<Vec<String>, String>> {
    let (r, rw) = read_result(reference).map_err(Err)?;
    let (c, cw) = read_result(candidate).map_err(Err)?;
    let mut problems = Vec::new();
    let by_step: BTreeMap<u64, f64> = r.losses.iter().map(|p| (p.step, p.loss)).collect();
    for p in &c.losses {
        match by_step.get(&p.step) {
            None => problems.push(format!("step {}: not in the reference run", p.step)),
            Some(&want) if !close(p.loss, want, how) => {
                problems.push(format!(
                    "step {}: loss {} != reference {}",
                    p.step, p.loss, want
                ));
                break;
            }
            _ => {}
        }
    }
    if c.steps != r.steps {
        problems.push(format!(
            "candidate ends at step {}, reference at {}",
            c.steps, r.steps
        ));
    }
    for (k, want) in &rw {
        let Some(got) = cw.get(k) else {
            problems.push(format!("weights: {k} missing"));
            continue;
        };
        let (g, w) = match (got.to_f32_vec(), want.to_f32_vec()) {
            (Ok(g), Ok(w)) => (g, w),
            _ => return Err(Err(format!("weights: {k}: not a float tensor"))),
        };
        if got.shape != want.shape {
            problems.push(format!(
                "weights: {k}: shape {:?} != {:?}",
                got.shape, want.shape
            ));
            continue;
        }
        if let Some((i, (a, b))) = g
            .iter()
            .zip(&w)
            .enumerate()
            .find(|(_, (a, b))| !close(f64::from(**a), f64::from(**b), how))
        {
            problems.push(format!("weights: {k}[{i}] = {a} != reference {b}"));
        }
    }
    let summary = format!(
        "{} losses compared (steps {}..={}), {} weight tensors, {}",
        c.losses.len(),
        c.start_step + 1,
        c.steps,
        rw.len(),
        match how {
            Compare::Exact => "bit-identical".to_string(),
            Compare::Tolerance { atol, rtol } => format!("atol {atol:e} rtol {rtol:e}"),
        }
    );
    if problems.is_empty() {
        Ok(vec![summary])
    } else {
        Err(Ok(problems))
    }
}
