//! "Score images": the U-Net++ Dice and uncertainty of every image for the image list's sort,
//! as a background job on the model thread ([`crate::predict::score_project`]).
use std::path::PathBuf;

use candle_core::Device;

use super::worker::CustomJob;
use crate::store::Project;

/// What the job is called in the UI.
pub const SCORING: &str = "scoring";

pub fn score_job(project: PathBuf, model: PathBuf, device: Device) -> CustomJob {
    CustomJob {
        what: SCORING.into(),
        run: Box::new(move |ctx| {
            let mut p = Project::open(&project)?;
            let s = crate::predict::score_project(
                &mut p,
                &model,
                &device,
                &mut *ctx.progress,
                ctx.cancel,
            )?;
            let verb = if s.cancelled {
                "cancelled after scoring"
            } else {
                "scored"
            };
            Ok(format!(
                "{verb} {} images with the U-Net++ ({} failed)",
                s.scored,
                s.failed.len()
            ))
        }),
    }
}
