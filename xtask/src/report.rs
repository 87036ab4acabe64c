//! The summary table (terminal and Markdown) and the JUnit XML file.

use crate::results::Row;
use std::fmt::Write as _;

/// The table as Markdown (also printed to the terminal).
pub fn markdown(rows: &[Row], header: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Conformance report\n\n{header}\n");
    let _ = writeln!(
        s,
        "| suite | world size | backend | passed | failed | skipped | time (s) | note |\n|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            md_cell(&r.label()),
            r.world_size,
            r.backend,
            r.passed,
            r.failed,
            r.skipped,
            r.seconds,
            md_cell(&r.note)
        );
    }
    let (p, f, k) = totals(rows);
    let _ = writeln!(s, "\n{p} passed, {f} failed, {k} skipped");
    let failures: Vec<_> = rows.iter().filter(|r| !r.failures.is_empty()).collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\n## Failures\n");
        for r in failures {
            for f in &r.failures {
                if f.name == r.name {
                    // A scenario row: its label already names it.
                    let _ = writeln!(
                        s,
                        "- {} / {} / world {}: {}",
                        r.label(),
                        r.backend,
                        r.world_size,
                        f.message
                    );
                } else {
                    let _ = writeln!(
                        s,
                        "- {} / {} / world {}: `{}`: {}",
                        r.label(),
                        r.backend,
                        r.world_size,
                        f.name,
                        f.message
                    );
                }
            }
        }
    }
    s
}

/// Text safe inside a Markdown table cell (no `|`, no line breaks).
fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// Passed, failed and skipped checks over all rows.
pub fn totals(rows: &[Row]) -> (usize, usize, usize) {
    rows.iter().fold((0, 0, 0), |(p, f, k), r| {
        (p + r.passed, f + r.failed, k + r.skipped)
    })
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JUnit XML: one testsuite per (backend, world size), one testcase per suite row; a row with
/// failures carries one `<failure>` per failed check.
pub fn junit(rows: &[Row]) -> String {
    let (p, f, k) = totals(rows);
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<testsuites name=\"conformance\" tests=\"{}\" failures=\"{f}\" skipped=\"{k}\">",
        p + f + k
    );
    let mut groups: Vec<(String, usize)> = Vec::new();
    for r in rows {
        let g = (r.backend.clone(), r.world_size);
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    for (backend, world) in groups {
        let members: Vec<&Row> = rows
            .iter()
            .filter(|r| r.backend == backend && r.world_size == world)
            .collect();
        let fails: usize = members.iter().filter(|r| r.failed > 0).count();
        let time: f64 = members.iter().map(|r| r.seconds).sum();
        let _ = writeln!(
            s,
            "  <testsuite name=\"{backend}.world{world}\" tests=\"{}\" failures=\"{fails}\" time=\"{time:.3}\">",
            members.len()
        );
        for r in members {
            let _ = write!(
                s,
                "    <testcase classname=\"{backend}.world{world}\" name=\"{}\" time=\"{:.3}\"",
                xml_escape(&r.label()),
                r.seconds
            );
            if r.failures.is_empty() && r.failed == 0 {
                let _ = writeln!(
                    s,
                    "><system-out>{} passed, {} skipped{}</system-out></testcase>",
                    r.passed,
                    r.skipped,
                    if r.note.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", xml_escape(&r.note))
                    }
                );
                continue;
            }
            let _ = writeln!(s, ">");
            for f in &r.failures {
                let _ = writeln!(
                    s,
                    "      <failure message=\"{}\">{}</failure>",
                    xml_escape(&f.name),
                    xml_escape(&f.message)
                );
            }
            let _ = writeln!(s, "    </testcase>");
        }
        let _ = writeln!(s, "  </testsuite>");
    }
    s.push_str("</testsuites>\n");
    s
}
