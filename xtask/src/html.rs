//! `target/conformance/report.html`: one self-contained page (inline CSS and SVG, no external
//! assets) with the totals, the suite x (backend, world size) matrix, every row, the failures and
//! the loss curves of the save/resume training scenarios.

use crate::report::totals;
use crate::results::Row;
use std::fmt::Write as _;

/// Text safe inside HTML/SVG elements and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// One curve: (x, y) points in x order.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A vertical line at `x` with a label (e.g. the resume point).
#[derive(Debug, Clone)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

/// A line plot.
#[derive(Debug, Clone)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub markers: Vec<Marker>,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
/// Dash patterns so that curves lying on top of each other stay visible.
const DASHES: [&str; 6] = ["", "8 4", "2 3", "12 3 2 3", "4 4", "1 6"];

/// A range [lo, hi] with hi > lo: an empty or degenerate range is widened around its value.
fn span(values: impl Iterator<Item = f64>, pad_fraction: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()).max(1e-300) {
        let pad = if lo.abs() > 0.0 { lo.abs() * 0.05 } else { 1.0 };
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * pad_fraction;
    (lo - pad, hi + pad)
}

/// About `n` round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi], and the
/// number of decimals to print them with.
pub fn ticks(lo: f64, hi: f64, n: usize) -> (Vec<f64>, usize) {
    if !lo.is_finite() || !hi.is_finite() || hi <= lo {
        return (vec![lo], 0);
    }
    let raw = (hi - lo) / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).clamp(0.0, 12.0) as usize;
    let mut out = Vec::new();
    let mut k = (lo / step).ceil();
    while k * step <= hi + step * 1e-9 && out.len() < 100 {
        out.push(k * step);
        k += 1.0;
    }
    (out, decimals)
}

/// The plot as an inline `<svg>`: axes with ticks and labels, one polyline (and point markers)
/// per series, dashed vertical lines for the markers, a legend.
pub fn svg(plot: &Plot) -> String {
    let (w, h) = (960.0, 400.0);
    let (left, right, top, bottom) = (80.0, 560.0, 40.0, 330.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        (left + right) / 2.0,
        escape(&plot.title)
    );
    let points = || plot.series.iter().flat_map(|se| se.points.iter());
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    if points().filter(finite).count() == 0 {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no data</text></svg>"#,
            (left + right) / 2.0,
            (top + bottom) / 2.0
        );
        return s;
    }
    let (x0, x1) = span(
        points()
            .filter(finite)
            .map(|p| p.0)
            .chain(plot.markers.iter().map(|m| m.x)),
        0.0,
    );
    let (y0, y1) = span(points().filter(finite).map(|p| p.1), 0.05);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (right - left);
    let py = |y: f64| bottom - (y - y0) / (y1 - y0) * (bottom - top);

    // Axes, grid and ticks.
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        right - left,
        bottom - top
    );
    let (xt, xd) = ticks(x0, x1, 8);
    for t in xt {
        let x = px(t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{}" stroke="#333"/><line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{t:.xd$}</text>"##,
            bottom + 5.0,
            bottom + 18.0
        );
    }
    let (yt, yd) = ticks(y0, y1, 6);
    for t in yt {
        let y = py(t);
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{y:.1}" x2="{left}" y2="{y:.1}" stroke="#333"/><line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{t:.yd$}</text>"##,
            left - 5.0,
            left - 8.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (left + right) / 2.0,
        bottom + 38.0,
        escape(&plot.x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{0}" text-anchor="middle" transform="rotate(-90 18 {0})">{1}</text>"#,
        (top + bottom) / 2.0,
        escape(&plot.y_label)
    );
    // Markers.
    for m in plot.markers.iter().filter(|m| m.x.is_finite()) {
        let x = px(m.x);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#888" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="#555">{}</text>"##,
            x + 4.0,
            top + 14.0,
            escape(&m.label)
        );
    }
    // Series.
    for (i, se) in plot.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = DASHES[i % DASHES.len()];
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.2},{:.2}", px(x), py(y)))
            .collect();
        let dash_attr = if dash.is_empty() {
            String::new()
        } else {
            format!(r#" stroke-dasharray="{dash}""#)
        };
        let _ = writeln!(
            s,
            r#"<polyline class="series" data-series="{}" fill="none" stroke="{color}" stroke-width="2"{dash_attr} points="{}"/>"#,
            escape(&se.name),
            pts.join(" ")
        );
        for p in &pts {
            let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                s,
                r#"<circle cx="{x}" cy="{y}" r="{:.1}" fill="{color}"/>"#,
                // Later series smaller, so that points lying on top of each other stay visible.
                (4.5 - 1.0 * i as f64).max(1.5)
            );
        }
    }
    // Legend.
    for (i, se) in plot.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let dash = DASHES[i % DASHES.len()];
        let y = top + 10.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{}" y="{}">{}</text>"#,
            right + 12.0,
            right + 42.0,
            right + 48.0,
            y + 4.0,
            escape(&se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Passed, failed and skipped checks of the rows of one matrix cell.
fn cell(rows: &[Row], suite: &str, backend: &str, world: usize) -> Option<(usize, usize, usize)> {
    let members: Vec<&Row> = rows
        .iter()
        .filter(|r| r.suite == suite && r.backend == backend && r.world_size == world)
        .collect();
    if members.is_empty() {
        return None;
    }
    Some(members.iter().fold((0, 0, 0), |(p, f, k), r| {
        (p + r.passed, f + r.failed, k + r.skipped)
    }))
}

/// The whole page.
pub fn page(rows: &[Row], header: &str, plots: &[Plot]) -> String {
    let mut s = String::from(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Conformance report</title>
<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.pass { background: #c8e6c9; }
td.fail { background: #ffcdd2; }
td.skip { background: #e0e0e0; }
td.none { background: #fafafa; color: #999; }
.totals { font-size: 1.2em; font-weight: bold; }
li { margin: 0.3em 0; }
code { white-space: pre-wrap; word-break: break-word; }
</style></head><body>
<h1>Conformance report</h1>
"#,
    );
    let _ = writeln!(s, "<p>{}</p>", escape(header));
    let (p, f, k) = totals(rows);
    let _ = writeln!(
        s,
        r#"<p class="totals">{p} passed, {f} failed, {k} skipped</p>"#
    );

    // Matrix: suites x (backend, world size).
    let mut suites: Vec<&str> = Vec::new();
    let mut columns: Vec<(&str, usize)> = Vec::new();
    for r in rows {
        if !suites.contains(&r.suite.as_str()) {
            suites.push(&r.suite);
        }
        if !columns.contains(&(r.backend.as_str(), r.world_size)) {
            columns.push((&r.backend, r.world_size));
        }
    }
    let backend_order: Vec<&str> = columns.iter().fold(Vec::new(), |mut v, c| {
        if !v.contains(&c.0) {
            v.push(c.0);
        }
        v
    });
    columns.sort_by_key(|(b, w)| (backend_order.iter().position(|x| x == b), *w));
    s.push_str("<h2>Matrix</h2>\n<table class=\"matrix\"><tr><th>suite</th>");
    for (b, w) in &columns {
        let _ = write!(s, "<th>{} world {w}</th>", escape(b));
    }
    s.push_str("</tr>\n");
    for suite in &suites {
        let _ = write!(s, "<tr><th>{}</th>", escape(suite));
        for (b, w) in &columns {
            match cell(rows, suite, b, *w) {
                None => s.push_str(r#"<td class="none">&mdash;</td>"#),
                Some((p, f, k)) => {
                    let class = if f > 0 {
                        "fail"
                    } else if p > 0 {
                        "pass"
                    } else {
                        "skip"
                    };
                    let _ = write!(
                        s,
                        r#"<td class="{class}">{p} passed, {f} failed, {k} skipped</td>"#
                    );
                }
            }
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</table>\n");

    // Failures.
    let failing: Vec<&Row> = rows.iter().filter(|r| !r.failures.is_empty()).collect();
    if !failing.is_empty() {
        s.push_str("<h2>Failures</h2>\n<ul>\n");
        for r in failing {
            for fl in &r.failures {
                let name = if fl.name == r.name {
                    String::new()
                } else {
                    format!("<b>{}</b>: ", escape(&fl.name))
                };
                let _ = writeln!(
                    s,
                    "<li>{} / {} / world {}: {name}<code>{}</code></li>",
                    escape(&r.label()),
                    escape(&r.backend),
                    r.world_size,
                    escape(&fl.message)
                );
            }
        }
        s.push_str("</ul>\n");
    }

    // Loss curves.
    if !plots.is_empty() {
        s.push_str("<h2>Save / resume training: loss curves</h2>\n");
        for plot in plots {
            s.push_str("<div>\n");
            s.push_str(&svg(plot));
            s.push_str("</div>\n");
        }
    }

    // Every row.
    s.push_str("<h2>Rows</h2>\n<table><tr><th>suite</th><th>backend</th><th>world size</th><th>passed</th><th>failed</th><th>skipped</th><th>time (s)</th><th>note</th></tr>\n");
    for r in rows {
        let class = if r.failed > 0 {
            "fail"
        } else if r.passed > 0 {
            "pass"
        } else {
            "skip"
        };
        let _ = writeln!(
            s,
            r#"<tr><td class="{class}">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td><td>{}</td></tr>"#,
            escape(&r.label()),
            escape(&r.backend),
            r.world_size,
            r.passed,
            r.failed,
            r.skipped,
            r.seconds,
            escape(&r.note)
        );
    }
    s.push_str("</table>\n</body></html>\n");
    s
}
