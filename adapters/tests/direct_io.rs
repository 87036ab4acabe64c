//! The converter's output file (`O_DIRECT` where allowed, staged through an aligned buffer):
//! any mix of `write_all` and `append_with` pieces, small, unaligned, empty and larger than the
//! 8 MiB staging chunk (the buffer grows), gives exactly the concatenated bytes.

use adapters::direct_io::OutFile;

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u8
        })
        .collect()
}

#[test]
fn pieces_of_any_size_concatenate_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.bin");
    let sizes = [
        8,
        1001,
        0,
        4096,
        (8 << 20) - 3,
        5,
        (20 << 20) + 17,
        3,
        (8 << 20) + 4096,
        77,
    ];
    let mut want = Vec::new();
    let mut w = OutFile::create(&path).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let piece = bytes(i as u64 + 1, n);
        if i % 2 == 0 {
            w.write_all(&piece).unwrap();
        } else {
            w.append_with(n, |buf| {
                buf.copy_from_slice(&piece);
                Ok::<(), std::io::Error>(())
            })
            .unwrap();
        }
        want.extend_from_slice(&piece);
    }
    w.finish().unwrap();
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want);
}

#[test]
fn a_failing_fill_reports_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = OutFile::create(&dir.path().join("x")).unwrap();
    let e = w
        .append_with(10, |_| Err(std::io::Error::other("fill failed")))
        .unwrap_err();
    assert!(e.to_string().contains("fill failed"));
}
