//! The synthetic data: tokens from a ChaCha8 stream whose word position is the data position, and
//! the teacher targets.

use super::*;

/// The synthetic data stream: ChaCha8 from a fixed seed; its word position is the data position.
pub(super) struct Data {
    pub(super) rng: ChaCha8Rng,
    pub(super) teacher: Array2<f32>,
}

impl Data {
    pub(super) fn new(word_pos: u128) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(SEED_DATA);
        rng.set_word_pos(word_pos);
        let mut t = ChaCha8Rng::seed_from_u64(SEED_TEACHER);
        Data {
            rng,
            teacher: random(&mut t, (HIDDEN, CLASSES), 1.0),
        }
    }

    /// The next global batch: `x` `[B, H]` and its target `tanh(x W_t)` `[B, C]`.
    pub(super) fn next_batch(&mut self) -> (Array2<f32>, Array2<f32>) {
        let x: Array2<f32> = random(&mut self.rng, (BATCH, HIDDEN), 1.0);
        let y = x.dot(&self.teacher).mapv(f32::tanh);
        (x, y)
    }
}
