//! A restricted unpickler: it builds a tree of the values a pickle describes and executes nothing.
//!
//! `torch.distributed.checkpoint` stores `.metadata` with `pickle.dump` and each tensor item as a
//! `torch.save` archive whose `data.pkl` is a pickle. Neither may be run: a pickle can call any
//! Python function. This reader interprets the opcodes of protocols 0-5 that build data (numbers,
//! strings, bytes, tuples, lists, dicts, sets, memo references) and records class construction
//! (`GLOBAL` / `STACK_GLOBAL` + `REDUCE` / `NEWOBJ` / `NEWOBJ_EX` + `BUILD`, dict and list
//! items set on the object) as [`Node::Call`] nodes for the caller to interpret. Every `GLOBAL` is
//! checked against the caller's allow-list the moment it is read; anything else is an error
//! naming it. Not supported (an error naming the opcode): `INST`, `OBJ`, `PERSID` (text),
//! `EXT1/2/4`, out-of-band buffers.
//!
//! Why not a crate (evaluated: `serde-pickle` 1.2, `pickled` 2.0.0-alpha9, `repugnant-pickle`
//! 0.0.1, candle-core 0.11's `pickle` module): `serde-pickle` and `pickled` resolve globals into
//! serde values and replace or refuse unknown ones, losing the class names and the
//! `REDUCE` / `NEWOBJ` arguments DCP's `MetadataIndex`, `torch.Size` and `_StorageInfo` are made
//! of, and neither reads persistent ids (`BINPERSID`, how `data.pkl` names its storage);
//! `repugnant-pickle` is a single unmaintained 0.0.1 release; candle's reader is a module of a whole
//! ML framework and clones a value on every memo read, so a small crafted pickle (`x = (x, x)` a
//! few dozen times) allocates without bound. Here values live in one arena and memo reads share
//! them, so memory is linear in the input size, and nothing recurses on drop.
//!
//! Sources: CPython `Lib/pickle.py` (`_Unpickler`, opcode table in `Lib/pickletools.py`).

use std::collections::HashMap;

/// Index of a node in [`Pickle::nodes`].
pub type Id = usize;

/// A value of the pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `None`.
    None,
    /// `True` / `False`.
    Bool(bool),
    /// An integer that fits in `i64`.
    Int(i64),
    /// A larger integer (`LONG1` / `LONG4` / text `L`): little-endian two's complement bytes.
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A `str` (or a protocol-0/2 byte string decoded as latin-1: only used for names).
    Str(String),
    /// `bytes` / `bytearray`.
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Id>),
    /// A list.
    List(Vec<Id>),
    /// A dict, in insertion order.
    Dict(Vec<(Id, Id)>),
    /// A set or frozenset.
    Set(Vec<Id>),
    /// A global (class or function) `module.name`, already checked against the allow-list.
    Global {
        /// Module path (`torch.distributed.checkpoint.metadata`).
        module: String,
        /// Qualified name (`Metadata`).
        name: String,
    },
    /// `func(*args)` (`REDUCE`) or `cls.__new__(cls, *args)` (`NEWOBJ`), then `BUILD` with `state`,
    /// dict items (`SETITEM(S)`) and list items (`APPEND(S)`) applied to the result.
    Call {
        /// The callable (a [`Node::Global`] for anything this crate accepts).
        func: Id,
        /// The positional arguments (a tuple).
        args: Id,
        /// Keyword arguments of `NEWOBJ_EX` (a dict), if any.
        kwargs: Option<Id>,
        /// The `BUILD` state, if any (the last one wins).
        state: Option<Id>,
        /// Items set with `SETITEM(S)`.
        items: Vec<(Id, Id)>,
        /// Items appended with `APPEND(S)`.
        appends: Vec<Id>,
    },
    /// `persistent_load(pid)` (`BINPERSID`): how `torch.save` names a storage.
    PersId(Id),
}

/// A parsed pickle: every value in an arena, and the root (the value `STOP` returned).
#[derive(Debug, Clone)]
pub struct Pickle {
    /// All values; children are indices into this list.
    pub nodes: Vec<Node>,
    /// The returned value.
    pub root: Id,
}

enum Slot {
    Mark,
    Val(Id),
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Slot>,
    memo: HashMap<u64, Id>,
    allowed: &'a dyn Fn(&str, &str) -> bool,
}

/// Parses `data` as a pickle. `allowed(module, name)` decides every global; a refused one is an
/// error `global 'module.name' is not allowed` (the caller adds the file name and what the
/// allowed ones are). Other errors name the opcode and its byte position.
pub fn parse(data: &[u8], allowed: &dyn Fn(&str, &str) -> bool) -> Result<Pickle, String> {
    let mut m = Machine {
        data,
        pos: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
        allowed,
    };
    let root = m.run()?;
    Ok(Pickle {
        nodes: m.nodes,
        root,
    })
}

impl Machine<'_> {
    fn err<T>(&self, at: usize, msg: impl std::fmt::Display) -> Result<T, String> {
        Err(format!("pickle byte {at}: {msg}"))
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => self.err(
                self.pos,
                format!(
                    "truncated: {n} bytes needed, {} left",
                    self.data.len() - self.pos
                ),
            ),
        }
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        b.copy_from_slice(self.take(N)?);
        Ok(b)
    }

    /// A length of `n` bytes that must fit in the rest of the input.
    fn len_of(&mut self, n: u64) -> Result<usize, String> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return self.err(
                self.pos,
                format!("length {n} exceeds the {left} bytes left"),
            );
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<&[u8], String> {
        let start = self.pos;
        match self.data[start..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos = start + i + 1;
                Ok(&self.data[start..start + i])
            }
            None => self.err(start, "truncated: no end of line"),
        }
    }

    fn push(&mut self, n: Node) -> Id {
        self.nodes.push(n);
        let id = self.nodes.len() - 1;
        self.stack.push(Slot::Val(id));
        id
    }

    fn pop(&mut self, at: usize) -> Result<Id, String> {
        match self.stack.pop() {
            Some(Slot::Val(v)) => Ok(v),
            Some(Slot::Mark) => self.err(at, "a MARK where a value was expected"),
            None => self.err(at, "stack underflow"),
        }
    }

    fn top(&self, at: usize) -> Result<Id, String> {
        match self.stack.last() {
            Some(Slot::Val(v)) => Ok(*v),
            _ => self.err(at, "no value on the stack"),
        }
    }

    /// The values since the last MARK (which is removed).
    fn pop_mark(&mut self, at: usize) -> Result<Vec<Id>, String> {
        let Some(m) = self.stack.iter().rposition(|s| matches!(s, Slot::Mark)) else {
            return self.err(at, "no MARK on the stack");
        };
        let vals = self
            .stack
            .drain(m..)
            .skip(1)
            .map(|s| match s {
                Slot::Val(v) => v,
                Slot::Mark => unreachable!("rposition found the last mark"),
            })
            .collect();
        Ok(vals)
    }

    fn global(&mut self, at: usize, module: String, name: String) -> Result<(), String> {
        if !(self.allowed)(&module, &name) {
            return self.err(at, format!("global '{module}.{name}' is not allowed"));
        }
        self.push(Node::Global { module, name });
        Ok(())
    }

    fn str_node(&self, at: usize, id: Id) -> Result<String, String> {
        match &self.nodes[id] {
            Node::Str(s) => Ok(s.clone()),
            _ => self.err(at, "STACK_GLOBAL needs two strings"),
        }
    }

    fn utf8(&self, at: usize, b: &[u8]) -> Result<String, String> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => self.err(at, "string is not UTF-8"),
        }
    }

    fn int_text(&self, at: usize, b: &[u8]) -> Result<Node, String> {
        let s = std::str::from_utf8(b).unwrap_or("").trim_end_matches('L');
        match s {
            "00" => return Ok(Node::Bool(false)),
            "01" => return Ok(Node::Bool(true)),
            _ => {}
        }
        match s.parse::<i64>() {
            Ok(v) => Ok(Node::Int(v)),
            Err(_)
                if !s.is_empty()
                    && s.trim_start_matches('-')
                        .bytes()
                        .all(|c| c.is_ascii_digit()) =>
            {
                self.err(at, format!("integer {s} does not fit in 64 bits"))
            }
            Err(_) => self.err(at, format!("bad integer literal '{s}'")),
        }
    }

    fn long_bytes(b: &[u8]) -> Node {
        if b.is_empty() {
            return Node::Int(0);
        }
        if b.len() <= 8 {
            let neg = b[b.len() - 1] & 0x80 != 0;
            let mut buf = [if neg { 0xff } else { 0 }; 8];
            buf[..b.len()].copy_from_slice(b);
            return Node::Int(i64::from_le_bytes(buf));
        }
        Node::BigInt(b.to_vec())
    }

    fn call_mut(&mut self, at: usize, target: Id) -> Result<&mut Node, String> {
        if matches!(self.nodes[target], Node::Call { .. }) {
            Ok(&mut self.nodes[target])
        } else {
            self.err(
                at,
                "BUILD / SETITEM / APPEND on a value that is not an object",
            )
        }
    }

    fn set_items(&mut self, at: usize, target: Id, kv: Vec<Id>) -> Result<(), String> {
        if !kv.len().is_multiple_of(2) {
            return self.err(at, "SETITEMS with an odd number of values");
        }
        let pairs: Vec<(Id, Id)> = kv.chunks(2).map(|c| (c[0], c[1])).collect();
        match &mut self.nodes[target] {
            Node::Dict(d) => d.extend(pairs),
            Node::Call { items, .. } => items.extend(pairs),
            _ => return self.err(at, "SETITEM(S) on a value that is not a dict"),
        }
        Ok(())
    }

    fn append(&mut self, at: usize, target: Id, vals: Vec<Id>) -> Result<(), String> {
        match &mut self.nodes[target] {
            Node::List(l) => l.extend(vals),
            Node::Set(s) => s.extend(vals),
            Node::Call { appends, .. } => appends.extend(vals),
            _ => return self.err(at, "APPEND(S) / ADDITEMS on a value that is not a list"),
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Id, String> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return self.err(at, format!("pickle protocol {p} (at most 5 is known)"));
                    }
                }
                0x95 => {
                    let n = u64::from_le_bytes(self.le::<8>()?);
                    self.len_of(n)?;
                }
                b'.' => {
                    let v = self.pop(at)?;
                    return Ok(v);
                }
                b'(' => self.stack.push(Slot::Mark),
                b'0' => {
                    self.stack.pop();
                }
                b'1' => {
                    self.pop_mark(at)?;
                }
                b'2' => {
                    let v = self.top(at)?;
                    self.stack.push(Slot::Val(v));
                }
                b'N' => {
                    self.push(Node::None);
                }
                0x88 => {
                    self.push(Node::Bool(true));
                }
                0x89 => {
                    self.push(Node::Bool(false));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le::<2>()?);
                    self.push(Node::Int(v.into()));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le::<4>()?);
                    self.push(Node::Int(v.into()));
                }
                0x8a => {
                    let n = self.u8()? as u64;
                    let n = self.len_of(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push(Self::long_bytes(&b));
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.le::<4>()?);
                    if n < 0 {
                        return self.err(at, "LONG4 with a negative length");
                    }
                    let n = self.len_of(n as u64)?;
                    let b = self.take(n)?.to_vec();
                    self.push(Self::long_bytes(&b));
                }
                b'I' | b'L' => {
                    let l = self.line()?.to_vec();
                    let node = self.int_text(at, &l)?;
                    self.push(node);
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le::<8>()?);
                    self.push(Node::Float(v));
                }
                b'F' => {
                    let l = self.line()?.to_vec();
                    let s = String::from_utf8_lossy(&l).into_owned();
                    match s.trim().parse::<f64>() {
                        Ok(v) => {
                            self.push(Node::Float(v));
                        }
                        Err(_) => return self.err(at, format!("bad float literal '{s}'")),
                    }
                }
                0x8c | b'X' | 0x8d => {
                    let n = match op {
                        0x8c => self.u8()? as u64,
                        b'X' => u32::from_le_bytes(self.le::<4>()?) as u64,
                        _ => u64::from_le_bytes(self.le::<8>()?),
                    };
                    let n = self.len_of(n)?;
                    let b = self.take(n)?.to_vec();
                    let s = self.utf8(at, &b)?;
                    self.push(Node::Str(s));
                }
                b'V' => {
                    // raw-unicode-escape; names and keys are ASCII in practice.
                    let l = self.line()?.to_vec();
                    let s = self.utf8(at, &l)?;
                    self.push(Node::Str(s));
                }
                b'S' => {
                    let l = self.line()?.to_vec();
                    let t = String::from_utf8_lossy(&l).into_owned();
                    let t = t.trim();
                    let inner = t
                        .strip_prefix('\'')
                        .and_then(|x| x.strip_suffix('\''))
                        .or_else(|| t.strip_prefix('"').and_then(|x| x.strip_suffix('"')));
                    match inner {
                        Some(x) if !x.contains('\\') => {
                            self.push(Node::Str(x.to_string()));
                        }
                        _ => return self.err(at, "STRING literal with escapes is not supported"),
                    }
                }
                b'T' | b'U' => {
                    let n = if op == b'U' {
                        self.u8()? as u64
                    } else {
                        u32::from_le_bytes(self.le::<4>()?) as u64
                    };
                    let n = self.len_of(n)?;
                    let b = self.take(n)?;
                    // Python 2 str, read as latin-1 (pickle's default encoding="ASCII" for names).
                    let s: String = b.iter().map(|&c| c as char).collect();
                    self.push(Node::Str(s));
                }
                b'C' | b'B' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.u8()? as u64,
                        b'B' => u32::from_le_bytes(self.le::<4>()?) as u64,
                        _ => u64::from_le_bytes(self.le::<8>()?),
                    };
                    let n = self.len_of(n)?;
                    let b = self.take(n)?.to_vec();
                    self.push(Node::Bytes(b));
                }
                b')' => {
                    self.push(Node::Tuple(Vec::new()));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        v.push(self.pop(at)?);
                    }
                    v.reverse();
                    self.push(Node::Tuple(v));
                }
                b't' => {
                    let v = self.pop_mark(at)?;
                    self.push(Node::Tuple(v));
                }
                b']' => {
                    self.push(Node::List(Vec::new()));
                }
                b'l' => {
                    let v = self.pop_mark(at)?;
                    self.push(Node::List(v));
                }
                b'}' => {
                    self.push(Node::Dict(Vec::new()));
                }
                b'd' => {
                    let v = self.pop_mark(at)?;
                    if !v.len().is_multiple_of(2) {
                        return self.err(at, "DICT with an odd number of values");
                    }
                    self.push(Node::Dict(v.chunks(2).map(|c| (c[0], c[1])).collect()));
                }
                0x8f => {
                    self.push(Node::Set(Vec::new()));
                }
                0x91 => {
                    let v = self.pop_mark(at)?;
                    self.push(Node::Set(v));
                }
                0x90 => {
                    let v = self.pop_mark(at)?;
                    let t = self.top(at)?;
                    self.append(at, t, v)?;
                }
                b'a' => {
                    let v = self.pop(at)?;
                    let t = self.top(at)?;
                    self.append(at, t, vec![v])?;
                }
                b'e' => {
                    let v = self.pop_mark(at)?;
                    let t = self.top(at)?;
                    self.append(at, t, v)?;
                }
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    let t = self.top(at)?;
                    self.set_items(at, t, vec![k, v])?;
                }
                b'u' => {
                    let kv = self.pop_mark(at)?;
                    let t = self.top(at)?;
                    self.set_items(at, t, kv)?;
                }
                b'c' => {
                    let module = String::from_utf8_lossy(self.line()?).into_owned();
                    let name = String::from_utf8_lossy(self.line()?).into_owned();
                    self.global(at, module, name)?;
                }
                0x93 => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    let (module, name) = (self.str_node(at, module)?, self.str_node(at, name)?);
                    self.global(at, module, name)?;
                }
                b'R' | 0x81 => {
                    let args = self.pop(at)?;
                    let func = self.pop(at)?;
                    if !matches!(self.nodes[args], Node::Tuple(_)) {
                        return self.err(at, "REDUCE / NEWOBJ arguments are not a tuple");
                    }
                    self.push(Node::Call {
                        func,
                        args,
                        kwargs: None,
                        state: None,
                        items: Vec::new(),
                        appends: Vec::new(),
                    });
                }
                0x92 => {
                    let kwargs = self.pop(at)?;
                    let args = self.pop(at)?;
                    let func = self.pop(at)?;
                    self.push(Node::Call {
                        func,
                        args,
                        kwargs: Some(kwargs),
                        state: None,
                        items: Vec::new(),
                        appends: Vec::new(),
                    });
                }
                b'b' => {
                    let st = self.pop(at)?;
                    let t = self.top(at)?;
                    if let Node::Call { state, .. } = self.call_mut(at, t)? {
                        *state = Some(st);
                    }
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    self.push(Node::PersId(pid));
                }
                0x94 => {
                    let v = self.top(at)?;
                    let k = self.memo.len() as u64;
                    self.memo.insert(k, v);
                }
                b'q' | b'r' | b'p' => {
                    let k = match op {
                        b'q' => self.u8()? as u64,
                        b'r' => u32::from_le_bytes(self.le::<4>()?) as u64,
                        _ => {
                            let l = self.line()?.to_vec();
                            match std::str::from_utf8(&l).ok().and_then(|s| s.parse().ok()) {
                                Some(k) => k,
                                None => return self.err(at, "bad PUT index"),
                            }
                        }
                    };
                    let v = self.top(at)?;
                    self.memo.insert(k, v);
                }
                b'h' | b'j' | b'g' => {
                    let k = match op {
                        b'h' => self.u8()? as u64,
                        b'j' => u32::from_le_bytes(self.le::<4>()?) as u64,
                        _ => {
                            let l = self.line()?.to_vec();
                            match std::str::from_utf8(&l).ok().and_then(|s| s.parse().ok()) {
                                Some(k) => k,
                                None => return self.err(at, "bad GET index"),
                            }
                        }
                    };
                    match self.memo.get(&k) {
                        Some(&v) => self.stack.push(Slot::Val(v)),
                        None => return self.err(at, format!("memo key {k} was never stored")),
                    }
                }
                other => {
                    let name = match other {
                        b'i' => "INST",
                        b'o' => "OBJ",
                        b'P' => "PERSID",
                        0x82..=0x84 => "EXT",
                        0x97 => "NEXT_BUFFER",
                        0x98 => "READONLY_BUFFER",
                        _ => "",
                    };
                    return self.err(
                        at,
                        if name.is_empty() {
                            format!("unknown opcode 0x{other:02x}")
                        } else {
                            format!("opcode {name} is not supported")
                        },
                    );
                }
            }
        }
    }
}

/// Read access to a parsed pickle with a depth limit: every step into a child counts, so a
/// cyclic or absurdly nested value is an error, not a hang or a stack overflow.
#[derive(Clone, Copy)]
pub struct View<'a> {
    p: &'a Pickle,
    id: Id,
    depth: u32,
}

/// Deepest nesting [`View`] follows (DCP metadata nests about 8 levels).
pub const MAX_DEPTH: u32 = 64;

impl<'a> View<'a> {
    /// The root value of `p`.
    pub fn root(p: &'a Pickle) -> Self {
        View {
            p,
            id: p.root,
            depth: 0,
        }
    }

    /// The node.
    pub fn node(&self) -> &'a Node {
        &self.p.nodes[self.id]
    }

    fn child(&self, id: Id) -> Result<View<'a>, String> {
        if self.depth >= MAX_DEPTH {
            return Err(format!(
                "values nested deeper than {MAX_DEPTH} levels (a cycle?)"
            ));
        }
        Ok(View {
            p: self.p,
            id,
            depth: self.depth + 1,
        })
    }

    /// A short description of the node kind (for errors).
    pub fn kind(&self) -> String {
        match self.node() {
            Node::None => "None".into(),
            Node::Bool(_) => "a bool".into(),
            Node::Int(_) | Node::BigInt(_) => "an int".into(),
            Node::Float(_) => "a float".into(),
            Node::Str(_) => "a str".into(),
            Node::Bytes(_) => "bytes".into(),
            Node::Tuple(_) => "a tuple".into(),
            Node::List(_) => "a list".into(),
            Node::Dict(_) => "a dict".into(),
            Node::Set(_) => "a set".into(),
            Node::Global { module, name } => format!("the global {module}.{name}"),
            Node::Call { func, .. } => match &self.p.nodes[*func] {
                Node::Global { module, name } => format!("a {module}.{name} object"),
                _ => "an object".into(),
            },
            Node::PersId(_) => "a persistent id".into(),
        }
    }

    /// True for `None`.
    pub fn is_none(&self) -> bool {
        matches!(self.node(), Node::None)
    }

    /// The string, or an error naming what it is.
    pub fn str(&self) -> Result<&'a str, String> {
        match self.node() {
            Node::Str(s) => Ok(s),
            _ => Err(format!("expected a str, found {}", self.kind())),
        }
    }

    /// The integer (a bool counts as 0 / 1, as in Python).
    pub fn int(&self) -> Result<i64, String> {
        match self.node() {
            Node::Int(v) => Ok(*v),
            Node::Bool(b) => Ok(i64::from(*b)),
            _ => Err(format!("expected an int, found {}", self.kind())),
        }
    }

    /// A non-negative integer as `usize`.
    pub fn usize(&self) -> Result<usize, String> {
        let v = self.int()?;
        usize::try_from(v).map_err(|_| format!("expected a non-negative int, found {v}"))
    }

    /// The bool.
    pub fn bool(&self) -> Result<bool, String> {
        match self.node() {
            Node::Bool(b) => Ok(*b),
            _ => Err(format!("expected a bool, found {}", self.kind())),
        }
    }

    /// Elements of a tuple or list.
    pub fn seq(&self) -> Result<Vec<View<'a>>, String> {
        match self.node() {
            Node::Tuple(v) | Node::List(v) => v.iter().map(|&i| self.child(i)).collect(),
            _ => Err(format!("expected a tuple or list, found {}", self.kind())),
        }
    }

    /// Items of a dict, or of an object filled with `SETITEMS` (`OrderedDict()`).
    pub fn items(&self) -> Result<Vec<(View<'a>, View<'a>)>, String> {
        let v = match self.node() {
            Node::Dict(v) => v,
            Node::Call { items, .. } => items,
            _ => return Err(format!("expected a dict, found {}", self.kind())),
        };
        v.iter()
            .map(|&(k, x)| Ok((self.child(k)?, self.child(x)?)))
            .collect()
    }

    /// Value of string key `key` in a dict (`None` when absent).
    pub fn get(&self, key: &str) -> Result<Option<View<'a>>, String> {
        for (k, v) in self.items()? {
            if k.str().ok() == Some(key) {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// `(module, name)` of a global.
    pub fn global(&self) -> Option<(&'a str, &'a str)> {
        match self.node() {
            Node::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }

    /// For an object: the `(module, name)` of its class or function, its arguments and its
    /// `BUILD` state. `None` for any other value.
    pub fn call(&self) -> Result<Option<Call<'a>>, String> {
        match self.node() {
            Node::Call {
                func, args, state, ..
            } => {
                let f = self.child(*func)?;
                let Some((module, name)) = f.global() else {
                    return Ok(None);
                };
                Ok(Some(Call {
                    module,
                    name,
                    args: self.child(*args)?.seq()?,
                    state: state.map(|s| self.child(s)).transpose()?,
                }))
            }
            _ => Ok(None),
        }
    }

    /// The id of a persistent-id value.
    pub fn pers_id(&self) -> Result<View<'a>, String> {
        match self.node() {
            Node::PersId(i) => self.child(*i),
            _ => Err(format!("expected a persistent id, found {}", self.kind())),
        }
    }
}

/// An object construction read from a pickle.
pub struct Call<'a> {
    /// Module of the class / function.
    pub module: &'a str,
    /// Its name.
    pub name: &'a str,
    /// Positional arguments.
    pub args: Vec<View<'a>>,
    /// `BUILD` state.
    pub state: Option<View<'a>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(_: &str, _: &str) -> bool {
        true
    }

    #[test]
    fn protocol_2_and_4_values() {
        // pickle.dumps({'a': (1, -2, 70000, 2**40, 'x', b'yz', True, None, 1.5, [3])}, protocol=4)
        let data = b"\x80\x04\x958\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94(K\x01J\xfe\xff\xff\xffJp\x11\x01\x00\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x01x\x94C\x02yz\x94\x88NG?\xf8\x00\x00\x00\x00\x00\x00]\x94K\x03at\x94s.";
        let p = parse(data, &any).unwrap();
        let r = View::root(&p);
        let t = r.get("a").unwrap().unwrap().seq().unwrap();
        assert_eq!(t[0].int().unwrap(), 1);
        assert_eq!(t[1].int().unwrap(), -2);
        assert_eq!(t[2].int().unwrap(), 70000);
        assert_eq!(t[3].int().unwrap(), 1 << 40);
        assert_eq!(t[4].str().unwrap(), "x");
        assert_eq!(t[5].node(), &Node::Bytes(b"yz".to_vec()));
        assert!(t[6].bool().unwrap());
        assert!(t[7].is_none());
        assert_eq!(t[8].node(), &Node::Float(1.5));
        assert_eq!(t[9].seq().unwrap()[0].int().unwrap(), 3);
    }

    #[test]
    fn globals_are_checked_when_read() {
        // pickle.dumps(os.system, protocol=2) == b'\x80\x02cposix\nsystem\nq\x00.'
        let e = parse(b"\x80\x02cposix\nsystem\nq\x00.", &|m, _| m == "torch").unwrap_err();
        assert!(e.contains("global 'posix.system' is not allowed"), "{e}");
        let p = parse(b"\x80\x02cposix\nsystem\nq\x00.", &any).unwrap();
        assert_eq!(View::root(&p).global(), Some(("posix", "system")));
    }

    #[test]
    fn memo_shares_values_and_cycles_hit_the_depth_limit() {
        // x = []; x.append(x)  ->  pickle.dumps(x, protocol=2)
        let p = parse(b"\x80\x02]q\x00h\x00a.", &any).unwrap();
        let mut v = View::root(&p);
        let mut steps = 0;
        let e = loop {
            match v.seq() {
                Ok(s) => {
                    v = s[0];
                    steps += 1;
                }
                Err(e) => break e,
            }
        };
        assert_eq!(steps, MAX_DEPTH);
        assert!(e.contains("deeper than"), "{e}");
        // 2^30 leaves through memo reuse stay 31 nodes.
        let mut data = b"\x80\x02K\x01".to_vec();
        for _ in 0..30 {
            data.extend_from_slice(b"q\x00h\x00\x86");
        }
        data.push(b'.');
        assert!(parse(&data, &any).unwrap().nodes.len() <= 31);
    }

    #[test]
    fn malformed_input_is_an_error_naming_the_byte() {
        for (bad, want) in [
            (&b"\x80\x02X\xff\xff\xff\x7f"[..], "exceeds"),
            (&b"\x80\x02K"[..], "truncated"),
            (&b"\x80\x02t."[..], "no MARK"),
            (&b"\x80\x02."[..], "underflow"),
            (&b"\x80\x02h\x05."[..], "never stored"),
            (&b"\x80\x02\xff"[..], "unknown opcode 0xff"),
            (&b"\x80\x02(i__main__\nX\n."[..], "INST"),
            (&b"\x80\x09."[..], "protocol 9"),
        ] {
            let e = parse(bad, &any).unwrap_err();
            assert!(e.starts_with("pickle byte ") && e.contains(want), "{e}");
        }
    }
}
