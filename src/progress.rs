//! One small observer trait through which training reports progress: the CLI prints it as a
//! progress bar, the GUI will plot the same events.
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`: what an epoch achieved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    /// Mean validation Dice / IoU at the training size (None without a validation set).
    pub val_dice: Option<f64>,
    pub val_iou: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_s: f64,
    /// Whether this epoch became the best checkpoint.
    pub best: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TrainEvent {
    Started {
        first_epoch: usize,
        epochs: usize,
        steps_per_epoch: usize,
    },
    Step {
        epoch: usize,
        step: usize,
        steps_per_epoch: usize,
        loss: f64,
        lr: f64,
    },
    Epoch(EpochRecord),
    /// A free-form note (early stop, cancel, checkpoint written).
    Message(String),
}

pub trait Progress {
    fn event(&mut self, event: &TrainEvent);
}

/// Ignores every event.
pub struct NoProgress;

impl Progress for NoProgress {
    fn event(&mut self, _: &TrainEvent) {}
}

/// Keeps every event (tests, GUI plots).
#[derive(Default)]
pub struct Recorder(pub Vec<TrainEvent>);

impl Progress for Recorder {
    fn event(&mut self, event: &TrainEvent) {
        self.0.push(event.clone());
    }
}

impl Recorder {
    pub fn epochs(&self) -> Vec<&EpochRecord> {
        self.0
            .iter()
            .filter_map(|e| match e {
                TrainEvent::Epoch(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}
