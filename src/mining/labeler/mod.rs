//! Labelers: who turns a U-Net++ prediction into a pseudo-label. One trait, one implementation
//! each; `mine`, `experiment`, the app and cluster shards pick one by name ([`LabelerKind`],
//! [`open_labeler`]):
//! - `sam` ([`SamLabeler`]): SAM prompted with the prediction's components, refined over rounds;
//! - `unet` ([`SelfTraining`]): the U-Net++'s own thresholded prediction (self-training), no
//!   SAM;
//! - `oracle` / `oracle-box` ([`OracleLabeler`]): the ground truth answering the prompted boxes
//!   (the loop's upper bound; needs ground truth for the unlabelled images).
//!
//! Each labeler has a name (the CLI's) and an id, recorded with every pseudo-label it makes
//! (the store's `labeler` column): with the U-Net++ checkpoint's hash it tells whether an
//! image's current pseudo-label was made by the models of this pass.
pub mod hash;
pub mod oracle;
mod sam;
mod unet;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use candle_core::Device;

pub use oracle::{OracleKind, OracleLabeler};
pub use sam::SamLabeler;
pub use unet::SelfTraining;

use super::{MinedImage, MiningConfig, MiningError};
use crate::data::ImageF32;
use crate::models::sam::Variant;
use crate::predict::ProbMap;

/// What a labeler gets for one image.
pub struct LabelInput<'a> {
    /// The image's name in the project (for errors).
    pub name: &'a str,
    /// The image as the U-Net++ saw it (normalised planes, original size).
    pub image: &'a ImageF32,
    /// The image file (SAM's embedding cache keys on its bytes).
    pub file: &'a Path,
    /// The U-Net++ probability map at the image's size.
    pub probs: &'a ProbMap,
    /// The image's ground-truth mask file, if the project has one (the oracles need it).
    pub ground_truth: Option<&'a Path>,
}

/// Turns a U-Net++ prediction into a pseudo-label.
pub trait Labeler {
    /// The name on the command line: `sam`, `unet`, `oracle` or `oracle-box`.
    fn name(&self) -> &'static str;

    /// The id stored with each pseudo-label (`labeler` column): `sam:<checkpoint sha256>`,
    /// `unet`, `oracle-object`, `oracle-box`.
    fn id(&self) -> &str;

    /// The checkpoint file this labeler runs, if any (stored as `sam_checkpoint`).
    fn checkpoint(&self) -> Option<&Path> {
        None
    }

    /// Labels one image: its rounds (at least one), or `None` when the prediction has no
    /// component of at least `cfg.prompt.min_area` pixels.
    fn label(
        &mut self,
        input: &LabelInput<'_>,
        cfg: &MiningConfig,
    ) -> Result<Option<MinedImage>, MiningError>;
}

/// A labeler chosen by name (`--labeler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LabelerKind {
    /// `sam`
    #[default]
    Sam,
    /// `unet`: self-training.
    Unet,
    /// `oracle` / `oracle-box`.
    Oracle(OracleKind),
}

impl LabelerKind {
    /// Every labeler, in CLI order.
    pub const ALL: [LabelerKind; 4] = [
        LabelerKind::Sam,
        LabelerKind::Unet,
        LabelerKind::Oracle(OracleKind::Objects),
        LabelerKind::Oracle(OracleKind::Box),
    ];
}

impl fmt::Display for LabelerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelerKind::Sam => "sam",
            LabelerKind::Unet => "unet",
            LabelerKind::Oracle(k) => k.name(),
        })
    }
}

impl FromStr for LabelerKind {
    type Err = MiningError;
    fn from_str(s: &str) -> Result<Self, MiningError> {
        LabelerKind::ALL
            .into_iter()
            .find(|k| k.to_string() == s.trim())
            .ok_or_else(|| {
                MiningError::Settings(format!(
                    "unknown labeler '{s}'; expected sam, unet, oracle or oracle-box"
                ))
            })
    }
}

/// Opens the labeler `kind`. `sam` needs the SAM checkpoint (`sam_variant`: `None` detects it);
/// `cache_dir` (a project's cache folder) keeps SAM's embeddings and the checkpoint hashes.
pub fn open_labeler(
    kind: LabelerKind,
    sam: Option<&Path>,
    sam_variant: Option<Variant>,
    device: &Device,
    cache_dir: Option<&Path>,
) -> Result<Box<dyn Labeler>, MiningError> {
    Ok(match kind {
        LabelerKind::Sam => {
            let path = sam.ok_or(MiningError::SamNotGiven)?;
            Box::new(SamLabeler::load(path, sam_variant, device, cache_dir)?)
        }
        LabelerKind::Unet => Box::new(SelfTraining),
        LabelerKind::Oracle(k) => Box::new(OracleLabeler::new(k)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelers_by_name() {
        for k in LabelerKind::ALL {
            assert_eq!(k.to_string().parse::<LabelerKind>().unwrap(), k);
        }
        let e = "medsam".parse::<LabelerKind>().unwrap_err().to_string();
        assert!(e.contains("'medsam'") && e.contains("sam, unet, oracle or oracle-box"));
        let e = open_labeler(LabelerKind::Sam, None, None, &Device::Cpu, None)
            .err()
            .expect("sam needs a checkpoint")
            .to_string();
        assert!(
            e.contains("--sam") && e.contains("medmine weights download"),
            "{e}"
        );
        let unet = open_labeler(LabelerKind::Unet, None, None, &Device::Cpu, None).unwrap();
        assert_eq!((unet.name(), unet.id()), ("unet", "unet"));
        let oracle = "oracle".parse().unwrap();
        let o = open_labeler(oracle, None, None, &Device::Cpu, None).unwrap();
        assert_eq!((o.name(), o.id()), ("oracle", "oracle-object"));
        let b = open_labeler(
            LabelerKind::Oracle(OracleKind::Box),
            None,
            None,
            &Device::Cpu,
            None,
        )
        .unwrap();
        assert_eq!((b.name(), b.id()), ("oracle-box", "oracle-box"));
    }
}
