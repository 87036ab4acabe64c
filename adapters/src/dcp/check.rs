//! Layout checks of a tensor's saved chunks: each inside the global shape, together covering
//! every element exactly once. The same rules as torch's save-time `_validate_global_plan`
//! (`torch/distributed/checkpoint/default_planner.py`: out-of-bounds chunks, overlapping chunks by
//! a sweep, chunk volume = tensor volume), applied when READING, where torch checks nothing (a
//! gap loads as whatever the destination held).

use placement::chunks::ChunkBox;

fn show(i: usize, b: &ChunkBox) -> String {
    format!("chunk {i} (offsets {:?}, sizes {:?})", b.offsets, b.sizes)
}

/// The first common point of two boxes, when they overlap.
fn overlap(a: &ChunkBox, b: &ChunkBox) -> Option<Vec<usize>> {
    a.offsets
        .iter()
        .zip(&a.sizes)
        .zip(b.offsets.iter().zip(&b.sizes))
        .map(|((&ao, &asz), (&bo, &bsz))| {
            let lo = ao.max(bo);
            (lo < (ao + asz).min(bo + bsz)).then_some(lo)
        })
        .collect()
}

/// What is wrong with the layout of `boxes` as the chunks of a tensor of `shape`: a chunk of the
/// wrong rank or outside the shape, two chunks holding the same element (named, with that
/// element), or elements no chunk holds (a gap: counted). Empty chunks are allowed anywhere inside
/// the shape (torch saves one for a rank whose shard is empty).
pub fn layout_problems(shape: &[usize], boxes: &[ChunkBox]) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = Vec::new();
    for (i, b) in boxes.iter().enumerate() {
        if !b.inside(shape) {
            out.push(format!(
                "{} lies outside the global shape {shape:?}",
                show(i, b)
            ));
        } else if !b.is_empty() {
            inside.push((i, b));
        }
    }
    // Sweep on dim 0 (0-d tensors: every chunk holds the one element).
    let start = |b: &ChunkBox| b.offsets.first().copied().unwrap_or(0);
    let end = |b: &ChunkBox| match (b.offsets.first(), b.sizes.first()) {
        (Some(o), Some(s)) => o + s,
        _ => 1,
    };
    inside.sort_by_key(|(_, b)| start(b));
    'sweep: for (k, &(i, a)) in inside.iter().enumerate() {
        for &(j, b) in &inside[k + 1..] {
            if start(b) >= end(a) {
                break;
            }
            if let Some(at) = overlap(a, b) {
                out.push(format!(
                    "{} overlaps {} (both hold element {at:?})",
                    show(j, b),
                    show(i, a)
                ));
                break 'sweep;
            }
        }
    }
    let numel = shape
        .iter()
        .try_fold(1u128, |a, &s| a.checked_mul(s as u128));
    let held: u128 = inside
        .iter()
        .map(|(_, b)| b.sizes.iter().map(|&s| s as u128).product::<u128>())
        .sum();
    if let Some(n) = numel {
        if held < n && out.is_empty() {
            out.push(format!(
                "chunks hold {held} of the {n} elements of the global shape {shape:?} (a gap)"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(o: &[usize], s: &[usize]) -> ChunkBox {
        ChunkBox {
            offsets: o.to_vec(),
            sizes: s.to_vec(),
        }
    }

    #[test]
    fn exact_cover_passes_and_each_fault_is_named() {
        let shape = [8, 6];
        let good = [
            b(&[0, 0], &[4, 6]),
            b(&[4, 0], &[4, 6]),
            b(&[8, 0], &[0, 6]),
        ];
        assert!(layout_problems(&shape, &good).is_empty());
        let p = layout_problems(&shape, &[b(&[0, 0], &[4, 6]), b(&[3, 0], &[5, 6])]);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("overlaps") && p[0].contains("[3, 0]"),
            "{p:?}"
        );
        let p = layout_problems(&shape, &[b(&[0, 0], &[4, 6])]);
        assert!(
            p[0].contains("hold 24 of the 48") && p[0].contains("gap"),
            "{p:?}"
        );
        let p = layout_problems(&shape, &[b(&[0, 0], &[4, 6]), b(&[4, 0], &[5, 6])]);
        assert!(p[0].contains("outside the global shape [8, 6]"), "{p:?}");
        assert!(layout_problems(&[], &[b(&[], &[])]).is_empty());
        assert!(layout_problems(&[], &[b(&[], &[]), b(&[], &[])])[0].contains("overlaps"));
        assert!(layout_problems(&[3], &[b(&[0, 0], &[3, 1])])[0].contains("outside"));
    }
}
