//! A minimal pickle writer (protocol 2 opcodes, readable by every Python 3 `pickle.load` and by
//! [`super::pickle`]): enough to write the `.metadata` of a torch DCP and the `data.pkl` of a
//! `torch.save` archive. Globals are written once and then fetched from the memo.
//!
//! Source: CPython `Lib/pickle.py` (`_Pickler`), opcode table in `Lib/pickletools.py`.

use std::collections::HashMap;

/// Builds a pickle opcode by opcode (stack order: push arguments, then the operation).
pub struct Pickler {
    out: Vec<u8>,
    globals: HashMap<(String, String), u32>,
    next_memo: u32,
}

impl Pickler {
    /// `PROTO protocol`.
    pub fn new(protocol: u8) -> Self {
        Pickler {
            out: vec![0x80, protocol],
            globals: HashMap::new(),
            next_memo: 0,
        }
    }

    /// `STOP`: the finished pickle.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }

    fn memo_get(&mut self, k: u32) {
        if k < 256 {
            self.out.extend_from_slice(&[b'h', k as u8]);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&k.to_le_bytes());
        }
    }

    fn memo_put(&mut self) -> u32 {
        let k = self.next_memo;
        self.next_memo += 1;
        if k < 256 {
            self.out.extend_from_slice(&[b'q', k as u8]);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&k.to_le_bytes());
        }
        k
    }

    /// Pushes the global `module.name` (`GLOBAL`, memoized).
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        let key = (module.to_string(), name.to_string());
        if let Some(&k) = self.globals.get(&key) {
            self.memo_get(k);
        } else {
            self.out.push(b'c');
            self.out.extend_from_slice(module.as_bytes());
            self.out.push(b'\n');
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b'\n');
            let k = self.memo_put();
            self.globals.insert(key, k);
        }
        self
    }

    /// Pushes `None`.
    pub fn none(&mut self) -> &mut Self {
        self.out.push(b'N');
        self
    }

    /// Pushes a bool.
    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.out.push(if b { 0x88 } else { 0x89 });
        self
    }

    /// Pushes an integer (`BININT1` / `BININT2` / `BININT` / `LONG1`).
    pub fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // Shortest little-endian two's complement, as pickle's encode_long.
            let b = v.to_le_bytes();
            let mut n = 8;
            while n > 1 {
                let top = b[n - 1];
                let next_sign = b[n - 2] & 0x80;
                if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                    n -= 1;
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, n as u8]);
            self.out.extend_from_slice(&b[..n]);
        }
        self
    }

    /// Pushes a non-negative integer given as `u64` (an error above `i64::MAX` is the caller's).
    pub fn uint(&mut self, v: u64) -> &mut Self {
        self.int(v as i64)
    }

    /// Pushes a `str` (`BINUNICODE`).
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
        self
    }

    /// Pushes a tuple of what `f` pushes (`MARK ... TUPLE`, or `EMPTY_TUPLE`).
    pub fn tuple(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self {
        let at = self.out.len();
        self.out.push(b'(');
        f(self);
        if self.out.len() == at + 1 {
            self.out[at] = b')';
        } else {
            self.out.push(b't');
        }
        self
    }

    /// Pushes a tuple of integers.
    pub fn int_tuple(&mut self, v: &[usize]) -> &mut Self {
        self.tuple(|p| {
            for &x in v {
                p.uint(x as u64);
            }
        })
    }

    /// `empty` (an empty container), then, when `f` pushes anything, `MARK ... fill`.
    fn filled(&mut self, empty: u8, fill: u8, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.out.push(empty);
        let at = self.out.len();
        self.out.push(b'(');
        f(self);
        if self.out.len() == at + 1 {
            self.out.pop();
        } else {
            self.out.push(fill);
        }
        self
    }

    /// Pushes a list of what `f` pushes (`EMPTY_LIST MARK ... APPENDS`).
    pub fn list(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.filled(b']', b'e', f)
    }

    /// Pushes a dict of the key / value pairs `f` pushes (`EMPTY_DICT MARK ... SETITEMS`).
    pub fn dict(&mut self, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.filled(b'}', b'u', f)
    }

    /// `REDUCE`: calls the callable below the argument tuple on the stack.
    pub fn reduce(&mut self) -> &mut Self {
        self.out.push(b'R');
        self
    }

    /// `module.name(*args)` where `f` pushes the arguments.
    pub fn call(&mut self, module: &str, name: &str, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.global(module, name);
        self.tuple(f);
        self.reduce()
    }

    /// An instance of `module.name` made as pickle makes a dataclass: `cls.__new__(cls)`
    /// (`EMPTY_TUPLE NEWOBJ`); follow with the state and [`Pickler::build`] to set its fields.
    pub fn object(&mut self, module: &str, name: &str) -> &mut Self {
        self.global(module, name);
        self.out.extend_from_slice(&[b')', 0x81]);
        self
    }

    /// `BUILD`: sets the state on the stack on the object below it.
    pub fn build(&mut self) -> &mut Self {
        self.out.push(b'b');
        self
    }

    /// `BINPERSID`: the value on the stack becomes a persistent id.
    pub fn persistent_id(&mut self) -> &mut Self {
        self.out.push(b'Q');
        self
    }
}

#[cfg(test)]
mod tests {
    use super::super::pickle::{parse, View};
    use super::*;

    const INTS: [i64; 11] = [
        0,
        255,
        256,
        65535,
        65536,
        -1,
        -129,
        1 << 31,
        -(1 << 40),
        i64::MAX,
        i64::MIN,
    ];

    #[test]
    fn what_is_written_reads_back() {
        let mut p = Pickler::new(2);
        p.dict(|p| {
            for v in INTS {
                p.str(&format!("k{v}")).int(v);
            }
            p.str("t").int_tuple(&[]);
            p.str("u").int_tuple(&[1, 2, 3, 4]);
            p.str("l").list(|p| {
                p.none().bool(true);
            });
            p.str("g").global("torch", "Size");
            p.str("g2").global("torch", "Size");
            p.str("c").call("torch", "Size", |p| {
                p.int_tuple(&[8, 65]);
            });
        });
        let bytes = p.finish();
        let parsed = parse(&bytes, &|m, n| (m, n) == ("torch", "Size")).unwrap();
        let r = View::root(&parsed);
        for v in INTS {
            assert_eq!(r.get(&format!("k{v}")).unwrap().unwrap().int().unwrap(), v);
        }
        assert!(r.get("t").unwrap().unwrap().seq().unwrap().is_empty());
        assert_eq!(r.get("u").unwrap().unwrap().seq().unwrap().len(), 4);
        assert_eq!(
            r.get("g2").unwrap().unwrap().global(),
            Some(("torch", "Size"))
        );
        let c = r.get("c").unwrap().unwrap().call().unwrap().unwrap();
        assert_eq!((c.module, c.name), ("torch", "Size"));
        assert_eq!(c.args[0].seq().unwrap()[1].int().unwrap(), 65);
    }
}
