//! Training and fine-tuning of the U-Net++: AdamW, warm-up + cosine learning rate, BCE + soft
//! Dice over the deep-supervision heads with per-sample weights, per-epoch validation, best and
//! last checkpoints, early stopping, resume, cancellation and a NaN guard.
//!
//! A run directory holds `best.safetensors` (+ `best.json`), `last.safetensors` (+ `last.json`,
//! `last.optim.safetensors`: the optimiser state for `resume`) and `metrics.jsonl` (one
//! [`EpochRecord`] per line).
pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod schedule;
mod trainer;

pub use trainer::{
    batch_tensors, train, trainable_vars, validate, TrainConfig, TrainOutcome, TrainRun,
    TrainStatus,
};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "loss became {loss} at epoch {epoch}, step {step}: training stopped; the last good \
         checkpoint is kept in {} (lower the learning rate or check the data)", dir.display()
    )]
    NonFinite {
        epoch: usize,
        step: usize,
        loss: f64,
        dir: PathBuf,
    },
    #[error("invalid training setup: {0}")]
    Config(String),
}

/// SHA-256 over the image names, image file sizes and mask names of the training and
/// validation samples and the input size: tells whether two runs saw the same data.
pub fn fingerprint(
    train: &[crate::data::Sample],
    val: &[crate::data::Sample],
    size: usize,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(format!("size {size}\n"));
    for (tag, set) in [("train", train), ("val", val)] {
        for s in set {
            let len = std::fs::metadata(&s.image).map(|m| m.len()).unwrap_or(0);
            let mask = s
                .mask
                .as_ref()
                .and_then(|m| m.file_name())
                .map(|m| m.to_string_lossy().into_owned())
                .unwrap_or_default();
            h.update(format!("{tag} {} {len} {mask}\n", s.name));
        }
    }
    format!("{:x}", h.finalize())
}
