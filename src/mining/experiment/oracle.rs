//! The oracle labelers in the experiment: [`crate::mining::labeler::oracle`] holds them (one
//! [`crate::mining::Labeler`] implementation each); [`oracle_mine`] is
//! [`crate::mining::mine_project`] with one of them.
use std::path::Path;
use std::sync::atomic::AtomicBool;

use candle_core::Device;

use super::ExperimentError;
use crate::mining::labeler::OracleLabeler;
use crate::mining::{mine_project, MiningConfig, MiningError};
use crate::store::Project;

pub use crate::mining::labeler::oracle::{oracle_mask, oracle_objects, OracleKind};

/// Mining with the oracle labeler `kind` ([`mine_project`] with an [`OracleLabeler`]):
/// pseudo-labels with quality 1, accepted by `cfg.auto_accept`. Returns `(stored, accepted)`.
/// An unlabelled image the oracle could not answer (no ground truth) is an error.
pub fn oracle_mine(
    project: &mut Project,
    kind: OracleKind,
    unet_checkpoint: &Path,
    cfg: &MiningConfig,
    device: &Device,
    cancel: &AtomicBool,
) -> Result<(usize, usize), ExperimentError> {
    let mut labeler = OracleLabeler::new(kind);
    let s = mine_project(
        project,
        unet_checkpoint,
        &mut labeler,
        cfg,
        device,
        &mut |_, _| {},
        cancel,
    )?;
    if s.cancelled {
        return Err(ExperimentError::Cancelled);
    }
    if let Some((image, reason)) = s.failed.into_iter().next() {
        return Err(MiningError::Invalid { image, reason }.into());
    }
    Ok((s.mined.len(), s.auto_accepted.len()))
}
