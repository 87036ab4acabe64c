//! Deliberate faults in the fast float32 path of `golden` (`conformance golden --mutate NAME`):
//! each is a real bug of an MoE implementation, and each must fail a named check of the float32
//! bar while the reference paths (no fault) keep passing. They show that the bar of
//! [`crate::bar`] still catches faults far smaller than a wrong layout.
//!
//! | fault | what it models | applied to |
//! |---|---|---|
//! | `swap-experts` | an adapter that maps expert 0's weights to slot 1 and back | `gate_and_up_projs`, `down_projs` and expert biases of experts 0 and 1 |
//! | `drop-bias` | a loader or kernel that ignores the biases | every bias the family has set to 0 (router bias, score-correction bias, expert biases) |
//! | `transpose-expert-weight` | a missed `transpose(1, 2)` that no shape check sees because `H == 2I` | every expert's `[H, 2I]` gate/up matrix transposed |
//! | `scale-one-expert` | a systematic `1e-4` relative error in one expert (a wrong scale, a lossy cast) | `down_projs` and `down_proj_bias` of the expert with the most tokens times `1 + 1e-4` |
//! | `drop-routing-weight` | a combine that sums the expert outputs without the routing weights | the fast forward chained from its stages with `w = 1` |

use crate::family::BlockWeights;
use adapters::NativeMoeKeys;
use moe_kernels::fast::{self, stages};
use moe_kernels::{MoeConfig, MoeForward, MoeParams, Permutation};
use ndarray::{Array2, ArrayView2, Axis};

/// A fault of the fast float32 path (module docs; CLI names as [`Fault::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Experts 0 and 1 exchanged.
    SwapExperts,
    /// Every bias zeroed.
    DropBias,
    /// Each expert's square `[H, 2I]` gate/up matrix transposed.
    TransposeExpertWeight,
    /// The busiest expert's down projection off by a relative `1e-4`.
    ScaleOneExpert,
    /// Routing weights replaced by 1 in the combine.
    DropRoutingWeight,
}

/// Relative error of [`Fault::ScaleOneExpert`].
pub const SCALE_ONE_EXPERT: f32 = 1e-4;

impl Fault {
    /// Every fault, in the order of the module table.
    pub const ALL: [Fault; 5] = [
        Fault::SwapExperts,
        Fault::DropBias,
        Fault::TransposeExpertWeight,
        Fault::ScaleOneExpert,
        Fault::DropRoutingWeight,
    ];

    /// The CLI name (`swap-experts`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Fault::SwapExperts => "swap-experts",
            Fault::DropBias => "drop-bias",
            Fault::TransposeExpertWeight => "transpose-expert-weight",
            Fault::ScaleOneExpert => "scale-one-expert",
            Fault::DropRoutingWeight => "drop-routing-weight",
        }
    }

    /// Changes the fast path's weights (`tokens_per_expert` from the truth's routing picks the
    /// expert of [`Fault::ScaleOneExpert`]). Errors when the fixture cannot show the fault (no
    /// bias, `H != 2I`, fewer than 2 experts).
    pub fn apply(
        self,
        w: &mut BlockWeights,
        keys: &NativeMoeKeys,
        tokens_per_expert: &[usize],
    ) -> Result<(), String> {
        let expert_keys = [
            Some(keys.gate_and_up_projs.clone()),
            Some(keys.down_projs.clone()),
            keys.gate_up_proj_bias.clone(),
            keys.down_proj_bias.clone(),
        ];
        let need = |w: &mut BlockWeights, k: &str| -> Result<(), String> {
            w.array_mut(k)
                .map(|_| ())
                .ok_or_else(|| format!("native key '{k}' missing"))
        };
        match self {
            Fault::SwapExperts => {
                for k in expert_keys.iter().flatten() {
                    need(w, k)?;
                    let a = w.array_mut(k).ok_or("unreachable")?;
                    if a.shape()[0] < 2 {
                        return Err(format!("{}: needs 2 experts", self.name()));
                    }
                    let e0 = a.index_axis(Axis(0), 0).to_owned();
                    let e1 = a.index_axis(Axis(0), 1).to_owned();
                    a.index_axis_mut(Axis(0), 0).assign(&e1);
                    a.index_axis_mut(Axis(0), 1).assign(&e0);
                }
            }
            Fault::DropBias => {
                let biases: Vec<&String> = [
                    &keys.gate_bias,
                    &keys.e_score_correction_bias,
                    &keys.gate_up_proj_bias,
                    &keys.down_proj_bias,
                ]
                .into_iter()
                .flatten()
                .collect();
                if biases.is_empty() {
                    return Err(format!("{}: this family has no bias", self.name()));
                }
                for k in biases {
                    need(w, k)?;
                    w.array_mut(k).ok_or("unreachable")?.fill(0.0);
                }
            }
            Fault::TransposeExpertWeight => {
                let k = &keys.gate_and_up_projs;
                need(w, k)?;
                let a = w.array_mut(k).ok_or("unreachable")?;
                let (h, two_i) = (a.shape()[1], a.shape()[2]);
                if h != two_i {
                    return Err(format!(
                        "{}: the fixture has H = {h} != 2I = {two_i} (a shape check would catch it)",
                        self.name()
                    ));
                }
                for mut m in a.outer_iter_mut() {
                    let t = m.t().to_owned();
                    m.assign(&t);
                }
            }
            Fault::ScaleOneExpert => {
                let e = (0..tokens_per_expert.len())
                    .max_by_key(|&e| (tokens_per_expert[e], std::cmp::Reverse(e)))
                    .ok_or("no experts")?;
                let factor = 1.0 + SCALE_ONE_EXPERT;
                for k in [Some(keys.down_projs.clone()), keys.down_proj_bias.clone()]
                    .iter()
                    .flatten()
                {
                    need(w, k)?;
                    let a = w.array_mut(k).ok_or("unreachable")?;
                    a.index_axis_mut(Axis(0), e).mapv_inplace(|v| v * factor);
                }
            }
            Fault::DropRoutingWeight => {}
        }
        Ok(())
    }
}

/// The fast forward with every routing weight replaced by 1 in the combine
/// ([`Fault::DropRoutingWeight`]): `fast::moe_forward`, then the output recombined from the fast
/// stages (permute, experts, combine, shared expert) with `w = 1`. The saved activations are the
/// forward's own, so `fast::moe_backward` stays correct and the fault shows in the output.
pub fn forward_without_routing_weights(
    x: ArrayView2<f32>,
    p: &MoeParams<f32>,
    cfg: &MoeConfig,
) -> moe_kernels::Result<MoeForward<f32>> {
    let mut fwd = fast::moe_forward(x, p, cfg)?;
    let experts = p.gate_and_up_projs.shape()[0];
    let perm = Permutation::from_top_k_index(fwd.routing.top_k_index.view(), experts)?;
    let xp = stages::permute_forward(x, &perm.token_of_rows())?;
    let w = stages::ExpertWeights::from_params(p);
    let acts = stages::experts_forward(xp.view(), &perm.offsets, &w, &cfg.activation)?;
    let ones = Array2::<f32>::ones(fwd.routing.top_k_weights.raw_dim());
    let mut output =
        stages::combine_forward(acts.y.view(), ones.view(), perm.row_of_slot_matrix().view())?;
    if let Some(s) = &p.shared {
        output += &fast::shared_expert_forward(x, s)?.0;
    }
    fwd.output = output;
    Ok(fwd)
}
