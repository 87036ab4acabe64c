//! Placement kinds (`Shard`, `Replicate`, `Partial`, `_StridedShard`) and their text forms.
//!
//! Source: `torch/distributed/tensor/placement_types.py` (`__str__` / `__repr__` of each class).
//! `str()` forms: `S(0)`, `R`, `P(sum)`, `_S(0, 2)`. `repr()` forms: `Shard(dim=0)`, `Replicate()`,
//! `Partial(sum)` (older) or `Partial(reduce_op=sum)`, `_StridedShard(dim=0, sf=2)` (older:
//! `split_factor=2`). Users paste both from logs, so both parse.

use std::fmt;
use std::str::FromStr;

use crate::error::{PlacementError, Result};

/// Reduce op of a `Partial` placement. Text as PyTorch prints it: `sum`, `avg`, `min`, `max`,
/// `product`, `band`, `bor`, `bxor` (c10d `ReduceOp` names, lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PartialOp {
    /// `sum`
    Sum,
    /// `avg`
    Avg,
    /// `min`
    Min,
    /// `max`
    Max,
    /// `product`
    Product,
    /// `band` (bitwise and)
    BAnd,
    /// `bor` (bitwise or)
    BOr,
    /// `bxor` (bitwise xor)
    BXor,
}

impl PartialOp {
    /// Every op, in the order above.
    pub const ALL: [PartialOp; 8] = [
        PartialOp::Sum,
        PartialOp::Avg,
        PartialOp::Min,
        PartialOp::Max,
        PartialOp::Product,
        PartialOp::BAnd,
        PartialOp::BOr,
        PartialOp::BXor,
    ];

    /// The name PyTorch prints (`"sum"`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            PartialOp::Sum => "sum",
            PartialOp::Avg => "avg",
            PartialOp::Min => "min",
            PartialOp::Max => "max",
            PartialOp::Product => "product",
            PartialOp::BAnd => "band",
            PartialOp::BOr => "bor",
            PartialOp::BXor => "bxor",
        }
    }
}

impl fmt::Display for PartialOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PartialOp {
    type Err = PlacementError;

    /// Case-insensitive; accepts a `ReduceOp.` / `RedOpType.` prefix and `prod` for `product`.
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        let t = t
            .strip_prefix("redoptype.")
            .or_else(|| t.strip_prefix("reduceop."))
            .unwrap_or(&t);
        let op = match t {
            "sum" => PartialOp::Sum,
            "avg" => PartialOp::Avg,
            "min" => PartialOp::Min,
            "max" => PartialOp::Max,
            "product" | "prod" => PartialOp::Product,
            "band" => PartialOp::BAnd,
            "bor" => PartialOp::BOr,
            "bxor" => PartialOp::BXor,
            _ => return Err(PlacementError::Parse {
                text: s.to_string(),
                reason:
                    "unknown reduce op (expected sum, avg, min, max, product, band, bor or bxor)"
                        .to_string(),
            }),
        };
        Ok(op)
    }
}

/// How a tensor is laid out along one mesh dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// `S(d)`: split tensor dim `d` by the torch.chunk rule (see [`crate::chunk`]).
    Shard(usize),
    /// `R`: every rank holds the whole tensor.
    Replicate,
    /// `P(op)`: every rank holds a full-shape term; the tensor is the `op`-reduction of the terms.
    Partial(PartialOp),
    /// `_S(d, sf)`: split tensor dim `d` into `split_factor` pieces, chunk each piece over the mesh dim
    /// and concatenate (see [`crate::strided_shard_indices`]). Not equal to `S(d)`, even for sf 1.
    StridedShard {
        /// Tensor dim.
        dim: usize,
        /// Number of pieces the dim is cut into before sharding.
        split_factor: usize,
    },
}

impl Placement {
    /// True for `S(d)` and `_S(d, sf)`.
    pub fn is_shard(&self) -> bool {
        matches!(self, Placement::Shard(_) | Placement::StridedShard { .. })
    }

    /// True for `R`.
    pub fn is_replicate(&self) -> bool {
        matches!(self, Placement::Replicate)
    }

    /// True for `P(op)`.
    pub fn is_partial(&self) -> bool {
        matches!(self, Placement::Partial(_))
    }

    /// True for `_S(d, sf)`.
    pub fn is_strided_shard(&self) -> bool {
        matches!(self, Placement::StridedShard { .. })
    }

    /// Tensor dim of `S(d)` / `_S(d, sf)`; `None` for `R` and `P`.
    pub fn shard_dim(&self) -> Option<usize> {
        match self {
            Placement::Shard(d) => Some(*d),
            Placement::StridedShard { dim, .. } => Some(*dim),
            _ => None,
        }
    }

    /// `split_factor` of `_S(d, sf)`; `None` otherwise.
    pub fn split_factor(&self) -> Option<usize> {
        match self {
            Placement::StridedShard { split_factor, .. } => Some(*split_factor),
            _ => None,
        }
    }

    /// Reduce op of `P(op)`; `None` otherwise.
    pub fn partial_op(&self) -> Option<PartialOp> {
        match self {
            Placement::Partial(op) => Some(*op),
            _ => None,
        }
    }

    /// The same placement on another tensor dim (`S(d)` -> `S(new)`, `_S(d, sf)` -> `_S(new, sf)`);
    /// `R` and `P` are returned unchanged.
    pub fn with_shard_dim(&self, new_dim: usize) -> Placement {
        match self {
            Placement::Shard(_) => Placement::Shard(new_dim),
            Placement::StridedShard { split_factor, .. } => Placement::StridedShard {
                dim: new_dim,
                split_factor: *split_factor,
            },
            other => *other,
        }
    }

    /// PyTorch `repr()` form: `Shard(dim=0)`, `Replicate()`, `Partial(sum)`,
    /// `_StridedShard(dim=0, sf=2)`.
    pub fn repr(&self) -> String {
        match self {
            Placement::Shard(d) => format!("Shard(dim={d})"),
            Placement::Replicate => "Replicate()".to_string(),
            Placement::Partial(op) => format!("Partial({op})"),
            Placement::StridedShard { dim, split_factor } => {
                format!("_StridedShard(dim={dim}, sf={split_factor})")
            }
        }
    }
}

impl fmt::Display for Placement {
    /// Exactly PyTorch's `str()`: `S(0)`, `R`, `P(sum)`, `_S(0, 2)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::Shard(d) => write!(f, "S({d})"),
            Placement::Replicate => f.write_str("R"),
            Placement::Partial(op) => write!(f, "P({op})"),
            Placement::StridedShard { dim, split_factor } => write!(f, "_S({dim}, {split_factor})"),
        }
    }
}

fn parse_err(text: &str, reason: impl Into<String>) -> PlacementError {
    PlacementError::Parse {
        text: text.to_string(),
        reason: reason.into(),
    }
}

/// Binds `args` (comma separated, `value` or `key=value`) to the parameters `params`; each
/// parameter is a list of accepted keyword spellings. Returns one value per parameter.
fn bind_args(text: &str, args: &str, params: &[&[&str]]) -> Result<Vec<Option<String>>> {
    let mut out: Vec<Option<String>> = vec![None; params.len()];
    if args.is_empty() {
        return Ok(out);
    }
    let mut next_positional = 0usize;
    let mut seen_keyword = false;
    for part in args.split(',') {
        if part.is_empty() {
            return Err(parse_err(text, "empty argument"));
        }
        let (slot, value) = match part.split_once('=') {
            Some((key, value)) => {
                seen_keyword = true;
                let slot = params
                    .iter()
                    .position(|names| names.contains(&key))
                    .ok_or_else(|| parse_err(text, format!("unknown argument `{key}`")))?;
                (slot, value)
            }
            None => {
                if seen_keyword {
                    return Err(parse_err(
                        text,
                        "positional argument after keyword argument",
                    ));
                }
                let slot = next_positional;
                next_positional += 1;
                if slot >= params.len() {
                    return Err(parse_err(
                        text,
                        format!("too many arguments (at most {})", params.len()),
                    ));
                }
                (slot, part)
            }
        };
        if out[slot].is_some() {
            return Err(parse_err(
                text,
                format!("argument `{}` given twice", params[slot][0]),
            ));
        }
        out[slot] = Some(value.to_string());
    }
    Ok(out)
}

fn parse_dim_value(text: &str, value: Option<String>, what: &str) -> Result<usize> {
    let v = value.ok_or_else(|| parse_err(text, format!("missing {what}")))?;
    match v.parse::<i64>() {
        Ok(n) if n < 0 => Err(parse_err(
            text,
            format!("negative {what} {n}: normalize it against the tensor rank first (see normalize_dim)"),
        )),
        Ok(_) => v
            .parse::<usize>()
            .map_err(|e| parse_err(text, format!("{what} `{v}`: {e}"))),
        Err(e) => Err(parse_err(text, format!("{what} `{v}` is not an integer: {e}"))),
    }
}

impl FromStr for Placement {
    type Err = PlacementError;

    /// Parses `S(0)`, `R`, `P(sum)`, `_S(0, 2)` and the repr forms `Shard(dim=0)`, `Replicate()`,
    /// `Partial(sum)`, `Partial(reduce_op=sum)`, `_StridedShard(dim=0, sf=2)`,
    /// `_StridedShard(dim=0, split_factor=2)`. Whitespace anywhere is ignored. `Partial()` means
    /// `P(sum)` (the constructor default). Negative dims are rejected (they need the tensor rank).
    fn from_str(s: &str) -> Result<Self> {
        let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        if t.is_empty() {
            return Err(parse_err(s, "empty placement"));
        }
        let (name, args) = match t.find('(') {
            None => (t.as_str(), None),
            Some(open) => {
                let inner = t[open + 1..]
                    .strip_suffix(')')
                    .ok_or_else(|| parse_err(s, "missing closing `)`"))?;
                if inner.contains('(') || inner.contains(')') {
                    return Err(parse_err(s, "nested parentheses"));
                }
                (&t[..open], Some(inner))
            }
        };
        match (name, args) {
            ("R", None) | ("R" | "Replicate", Some("")) => Ok(Placement::Replicate),
            ("S" | "Shard", Some(a)) => {
                let v = bind_args(s, a, &[&["dim"]])?;
                let dim = parse_dim_value(s, v.into_iter().next().flatten(), "dim")?;
                Ok(Placement::Shard(dim))
            }
            ("P" | "Partial", Some(a)) => {
                let v = bind_args(s, a, &[&["reduce_op", "op"]])?;
                match v.into_iter().next().flatten() {
                    None => Ok(Placement::Partial(PartialOp::Sum)),
                    Some(op) => Ok(Placement::Partial(
                        op.trim_matches(|c| c == '\'' || c == '"').parse()?,
                    )),
                }
            }
            ("_S" | "_StridedShard" | "StridedShard", Some(a)) => {
                let v = bind_args(s, a, &[&["dim"], &["sf", "split_factor"]])?;
                let mut it = v.into_iter();
                let dim = parse_dim_value(s, it.next().flatten(), "dim")?;
                let split_factor = parse_dim_value(s, it.next().flatten(), "split_factor")?;
                if split_factor == 0 {
                    return Err(parse_err(s, "split_factor must be >= 1"));
                }
                Ok(Placement::StridedShard { dim, split_factor })
            }
            _ => Err(parse_err(
                s,
                "expected one of S(d), R, P(op), _S(d, sf) or their repr forms Shard(dim=d), \
                 Replicate(), Partial(op), _StridedShard(dim=d, sf=n)",
            )),
        }
    }
}

impl serde::Serialize for Placement {
    /// Serialized as its `str()` text, e.g. `"_S(0, 2)"`.
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Placement {
    /// Any text [`Placement::from_str`] accepts.
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for PartialOp {
    /// Serialized as its name, e.g. `"sum"`.
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for PartialOp {
    /// Any text [`PartialOp::from_str`] accepts.
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a placement list: `[S(0), R]` (Python list), `(S(0), _S(1, 2))` (tuple, trailing comma
/// allowed), or bare `S(0),R`. `[]` and `()` give an empty list.
///
/// Errors: unbalanced brackets, an empty element, or any element [`Placement::from_str`] rejects.
pub fn parse_placements(s: &str) -> Result<Vec<Placement>> {
    let t = s.trim();
    let inner = if let Some(rest) = t.strip_prefix('[') {
        rest.strip_suffix(']')
            .ok_or_else(|| parse_err(s, "`[` without closing `]`"))?
    } else if let Some(rest) = t.strip_prefix('(') {
        // A placement never starts with `(`: this is a tuple.
        rest.strip_suffix(')')
            .ok_or_else(|| parse_err(s, "`(` without closing `)`"))?
    } else {
        t
    };
    let mut parts = Vec::new();
    let mut depth = 0i64;
    let mut start = 0usize;
    for (i, c) in inner.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(parse_err(s, "unbalanced `)`"));
                }
            }
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(parse_err(s, "unbalanced `(`"));
    }
    if inner.trim().is_empty() {
        return Ok(Vec::new());
    }
    let last = &inner[start..];
    // A Python one-element tuple ends with a comma: `(S(0),)`.
    let trailing_comma = !parts.is_empty() && last.trim().is_empty();
    if !trailing_comma {
        parts.push(last);
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.trim().is_empty() {
                Err(parse_err(s, format!("element {i} is empty")))
            } else {
                p.parse()
            }
        })
        .collect()
}

/// Formats placements as a Python list of their `str()` forms: `[S(0), R]`.
pub fn format_placements(p: &[Placement]) -> String {
    let items: Vec<String> = p.iter().map(|x| x.to_string()).collect();
    format!("[{}]", items.join(", "))
}

/// Python-style dim normalization: `-1` -> `ndim - 1`. Errors unless `-ndim <= dim < ndim`
/// (so always for `ndim == 0`). Source: `torch._prims_common.canonicalize_dim` semantics for ndim >= 1.
pub fn normalize_dim(dim: i64, ndim: usize) -> Result<usize> {
    let err = PlacementError::DimOutOfRange { dim, ndim };
    let n = i128::try_from(ndim).map_err(|_| err.clone())?;
    let d = i128::from(dim);
    let d = if d < 0 { d + n } else { d };
    if d < 0 || d >= n {
        return Err(err);
    }
    usize::try_from(d).map_err(|_| err)
}

/// Checks the Partial ops of a placement list can coexist: all the same op, except that `sum` and
/// `avg` may be mixed (PyTorch rejects other mixes). Source: `assert_no_mixed_partial_types` in
/// `torch/distributed/tensor/_utils.py` and `_optimize_transform_infos`' sum/avg merge.
pub fn check_partial_ops(placements: &[Placement]) -> Result<()> {
    let mut first: Option<PartialOp> = None;
    for op in placements.iter().filter_map(Placement::partial_op) {
        match first {
            None => first = Some(op),
            Some(f) if f == op => {}
            Some(f) => {
                let sum_avg = matches!(
                    (f, op),
                    (PartialOp::Sum, PartialOp::Avg) | (PartialOp::Avg, PartialOp::Sum)
                );
                if !sum_avg {
                    return Err(PlacementError::IncompatiblePartials {
                        placements: format_placements(placements),
                        first: f.to_string(),
                        second: op.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_matches_torch_str() {
        assert_eq!(Placement::Shard(0).to_string(), "S(0)");
        assert_eq!(Placement::Replicate.to_string(), "R");
        assert_eq!(Placement::Partial(PartialOp::Sum).to_string(), "P(sum)");
        assert_eq!(Placement::Partial(PartialOp::BXor).to_string(), "P(bxor)");
        let ss = Placement::StridedShard {
            dim: 0,
            split_factor: 2,
        };
        assert_eq!(ss.to_string(), "_S(0, 2)");
        assert_eq!(ss.repr(), "_StridedShard(dim=0, sf=2)");
    }

    #[test]
    fn parses_every_form() {
        let ss = Placement::StridedShard {
            dim: 0,
            split_factor: 2,
        };
        let cases: Vec<(&str, Placement)> = vec![
            ("S(0)", Placement::Shard(0)),
            (" S( 3 ) ", Placement::Shard(3)),
            ("Shard(dim=0)", Placement::Shard(0)),
            ("Shard(dim = 2)", Placement::Shard(2)),
            ("Shard(1)", Placement::Shard(1)),
            ("R", Placement::Replicate),
            ("Replicate()", Placement::Replicate),
            ("P(sum)", Placement::Partial(PartialOp::Sum)),
            ("P(avg)", Placement::Partial(PartialOp::Avg)),
            ("Partial(sum)", Placement::Partial(PartialOp::Sum)),
            ("Partial(reduce_op=max)", Placement::Partial(PartialOp::Max)),
            (
                "Partial(reduce_op = product)",
                Placement::Partial(PartialOp::Product),
            ),
            ("Partial()", Placement::Partial(PartialOp::Sum)),
            ("P(band)", Placement::Partial(PartialOp::BAnd)),
            ("P(bor)", Placement::Partial(PartialOp::BOr)),
            ("P(min)", Placement::Partial(PartialOp::Min)),
            ("_S(0, 2)", ss),
            ("_S(0,2)", ss),
            ("_StridedShard(dim=0, sf=2)", ss),
            ("_StridedShard(dim=0, split_factor=2)", ss),
            ("_StridedShard(split_factor=2, dim=0)", ss),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<Placement>(), Ok(want), "parsing {text:?}");
        }
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "S",
            "S()",
            "S(-1)",
            "S(x)",
            "Q(0)",
            "P(mean)",
            "_S(0)",
            "_S(0, 0)",
            "S(0",
            "R(1)",
            "Shard(dim=0, dim=1)",
            "Shard(foo=1)",
            "_S(dim=0, 2)",
            "S((0))",
        ] {
            assert!(
                bad.parse::<Placement>().is_err(),
                "{bad:?} should not parse"
            );
        }
        let msg = "S(-1)".parse::<Placement>().unwrap_err().to_string();
        assert!(msg.contains("negative"), "{msg}");
    }

    #[test]
    fn placement_lists() {
        let want = vec![Placement::Shard(0), Placement::Replicate];
        assert_eq!(parse_placements("[S(0), R]").unwrap(), want);
        assert_eq!(parse_placements("S(0),R").unwrap(), want);
        assert_eq!(
            parse_placements("(Shard(dim=0), Replicate())").unwrap(),
            want
        );
        assert_eq!(
            parse_placements("(S(0), _S(1, 2))").unwrap(),
            vec![
                Placement::Shard(0),
                Placement::StridedShard {
                    dim: 1,
                    split_factor: 2
                }
            ]
        );
        assert_eq!(
            parse_placements("(S(0),)").unwrap(),
            vec![Placement::Shard(0)]
        );
        assert_eq!(parse_placements("[]").unwrap(), vec![]);
        assert_eq!(parse_placements("()").unwrap(), vec![]);
        assert_eq!(format_placements(&want), "[S(0), R]");
        for bad in ["[S(0), R", "[S(0),,R]", "S(0)),R", "(S(0), R", "[,]"] {
            assert!(parse_placements(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn serde_as_text() {
        let p = vec![
            Placement::StridedShard {
                dim: 0,
                split_factor: 2,
            },
            Placement::Partial(PartialOp::Avg),
        ];
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, r#"["_S(0, 2)","P(avg)"]"#);
        let back: Vec<Placement> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        let repr: Placement = serde_json::from_str(r#""Shard(dim=4)""#).unwrap();
        assert_eq!(repr, Placement::Shard(4));
        assert!(serde_json::from_str::<Placement>(r#""S(-1)""#).is_err());
    }

    #[test]
    fn normalize() {
        assert_eq!(normalize_dim(-1, 3), Ok(2));
        assert_eq!(normalize_dim(-3, 3), Ok(0));
        assert_eq!(normalize_dim(2, 3), Ok(2));
        assert!(normalize_dim(3, 3).is_err());
        assert!(normalize_dim(-4, 3).is_err());
        assert!(normalize_dim(0, 0).is_err());
        assert!(normalize_dim(i64::MIN, 3).is_err());
    }

    #[test]
    fn partial_mixing() {
        use PartialOp::*;
        let p = |o| Placement::Partial(o);
        assert!(check_partial_ops(&[p(Sum), p(Avg), Placement::Shard(0)]).is_ok());
        assert!(check_partial_ops(&[p(Max), p(Max)]).is_ok());
        let e = check_partial_ops(&[p(Sum), p(Max)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sum") && e.contains("max"), "{e}");
    }
}
