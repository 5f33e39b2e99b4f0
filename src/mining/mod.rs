//! Knowledge mining (issue 5): a U-Net++ trained on the labelled images predicts each
//! unlabelled image; a [`Labeler`] turns the prediction into a pseudo-label: SAM prompted with
//! its connected components ([`crate::prompts`], one mask prompt per object), refined for up to
//! K rounds ([`refine`]) and scored ([`quality`]: SAM's predicted IoU, stability, Dice
//! agreement with the U-Net++ and the connected-component counts of both masks, combined by
//! [`crate::store::quality_score`]); or the U-Net++'s own prediction (self-training); or the
//! ground truth (the oracles). Every round is stored in the project as a pseudo-label pending
//! review; the round with the best quality score is the one reviewed.
//!
//! Store rounds: the `round` of a pseudo-label row is a per-image sequence. A mining pass
//! writes its rounds as `base, base + 1, …` where `base` is one past the image's highest
//! stored round (0 on first mining), so a re-mine never mixes with, or overwrites, an older
//! pass. The rounds are written in the order they were made except the best one, which is
//! written last: the newest row is always the newest pass's pseudo-label. Its
//! `prompts.strategy` keeps its round's name (the strategy's name for round 0, `refine K`
//! for later rounds).
//!
//! Which images ([`Remine`]): those with role `unlabelled`. Each pseudo-label records the
//! U-Net++ checkpoint's SHA-256 and the labeler's id ([`Labeler::id`], e.g. `sam:<sha256>`);
//! by default a pass mines every image without a pseudo-label and re-mines every pending or
//! rejected one whose current pseudo-label was made by another (U-Net++, labeler) pair, so
//! every round after a fine-tuning mines. An image a reviewer accepted or edited is never
//! re-mined (its decision stands). An image whose prediction has no component of at least
//! `min_area` pixels gets nothing and is counted.
pub mod experiment;
pub mod finetune;
pub mod labeler;
pub mod quality;
pub mod refine;
mod round;
mod select;
pub mod shard;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

pub use labeler::{open_labeler, LabelInput, Labeler, LabelerKind};
pub use round::{best_round, mine_image, MinedImage, RoundResult};
pub use select::{plan_image, Plan};

use crate::data::ImageF32;
use crate::models::sam::{SamError, Variant};
use crate::models::unetpp::InferenceMode;
use crate::predict::{Predictor, ProbMap};
use crate::prompts::{PromptConfig, PromptError};
use crate::store::{Actor, NewPseudoLabel, Project, StoreError};
use crate::train::checkpoint::CheckpointError;
use select::Candidate;

/// Where to get SAM weights, for the "no checkpoint" message.
pub const SAM_DOWNLOAD_HINT: &str = "put an official SAM checkpoint in the weights/ folder: run \
`medmine weights download vit_b` on a machine with internet access (it saves into weights/; \
`medmine weights list` shows the variants), or download \
https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth (MobileSAM: mobile_sam.pt \
from https://github.com/ChaoningZhang/MobileSAM) where you can and copy it into weights/; then \
pass its path with --sam (e.g. --sam weights/sam_vit_b_01ec64.pth); see weights/README.md";

/// Errors of mining; each names the image or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum MiningError {
    #[error("{}: no SAM checkpoint there; {SAM_DOWNLOAD_HINT}", .path.display())]
    NoSamCheckpoint { path: PathBuf },
    #[error(
        "the sam labeler needs a SAM checkpoint (--sam FILE); {SAM_DOWNLOAD_HINT}; or mine \
             without SAM: --labeler unet (self-training)"
    )]
    SamNotGiven,
    #[error("SAM checkpoint: {0}")]
    LoadSam(#[source] SamError),
    #[error("U-Net++ checkpoint {}: {source}", .path.display())]
    LoadUnet {
        path: PathBuf,
        #[source]
        source: CheckpointError,
    },
    #[error("{}: cannot hash the checkpoint: {source}", .path.display())]
    Hash {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid mining settings: {0}")]
    Settings(String),
    #[error("{image}: U-Net++ prediction failed: {source}")]
    Predict {
        image: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("{image}: prompts: {source}")]
    Prompts {
        image: String,
        #[source]
        source: PromptError,
    },
    #[error("{image}: SAM: {source}")]
    Sam {
        image: String,
        #[source]
        source: SamError,
    },
    #[error("{image}: no ground truth for the oracle labeler (it answers with the image's mask)")]
    NoGroundTruth { image: String },
    #[error("{image}: {reason}")]
    Invalid { image: String, reason: String },
    #[error("{image}: {source}")]
    Store {
        image: String,
        #[source]
        source: StoreError,
    },
    #[error("{0}")]
    Shard(String),
    #[error(transparent)]
    Project(#[from] StoreError),
}

/// Which images with a pseudo-label a pass mines again (never accepted or edited ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Remine {
    /// `changed`: pending and rejected images whose current pseudo-label was made by another
    /// U-Net++ checkpoint or labeler (by content hash; rows without hashes count as other).
    #[default]
    Changed,
    /// `all`: every pending and rejected image.
    All,
    /// `none`: only images without a pseudo-label.
    None,
}

impl Remine {
    /// Every policy, in CLI order.
    pub const ALL: [Remine; 3] = [Remine::Changed, Remine::All, Remine::None];
}

impl fmt::Display for Remine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Remine::Changed => "changed",
            Remine::All => "all",
            Remine::None => "none",
        })
    }
}

impl FromStr for Remine {
    type Err = MiningError;
    fn from_str(s: &str) -> Result<Self, MiningError> {
        Remine::ALL
            .into_iter()
            .find(|r| r.to_string() == s.trim())
            .ok_or_else(|| {
                MiningError::Settings(format!(
                    "unknown --remine value '{s}'; expected changed, all or none"
                ))
            })
    }
}

/// How a project is mined.
#[derive(Clone, Debug, PartialEq)]
pub struct MiningConfig {
    /// Prompt derivation, including the strategy (`prompt.strategy`); its threshold and
    /// `min_area` also make the self-training label.
    pub prompt: PromptConfig,
    /// SAM rounds per image (K >= 1): round 0 from the U-Net++ prompts, then K - 1 refinements.
    pub rounds: usize,
    /// Stop refining once the IoU of two successive rounds' masks reaches this.
    pub stop_iou: f64,
    /// Ask SAM for three masks per prompt and keep the one with the highest predicted IoU.
    pub multimask: bool,
    /// Accept the images mined now whose quality score is at least this.
    pub auto_accept: Option<f64>,
    /// Which images that already have a pseudo-label are mined again.
    pub remine: Remine,
    /// SAM variant; `None` detects it from the checkpoint.
    pub sam_variant: Option<Variant>,
    /// U-Net++ inference mode.
    pub unet_mode: InferenceMode,
}

impl Default for MiningConfig {
    fn default() -> Self {
        Self {
            prompt: PromptConfig::default(),
            rounds: 3,
            stop_iou: 0.95,
            multimask: false,
            auto_accept: None,
            remine: Remine::default(),
            sam_variant: None,
            unet_mode: InferenceMode::Accurate,
        }
    }
}

impl MiningConfig {
    fn check(&self) -> Result<(), MiningError> {
        let bad = |m: String| Err(MiningError::Settings(m));
        if self.rounds == 0 {
            return bad("rounds must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.stop_iou) {
            return bad(format!("stop IoU {} is not in [0, 1]", self.stop_iou));
        }
        if let Some(s) = self.auto_accept {
            if !s.is_finite() {
                return bad(format!("auto-accept threshold {s} is not a number"));
            }
        }
        Ok(())
    }
}

/// What a mining pass did. Every unlabelled image lands in exactly one of `mined`,
/// `unchanged`, `kept`, `skipped_reviewed`, `no_component` and `failed` (or in none when the
/// pass was cancelled before it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MiningSummary {
    /// Unlabelled images in the project.
    pub unlabelled: usize,
    /// Images selected for mining by the [`Remine`] policy.
    pub selected: usize,
    /// SHA-256 of the U-Net++ checkpoint and the labeler's id, recorded with every
    /// pseudo-label of this pass.
    pub unet_hash: String,
    pub labeler: String,
    /// Images that got a pseudo-label now.
    pub mined: Vec<String>,
    /// Pending or rejected images not mined again (their pseudo-label was made by the same
    /// models, or the policy re-mines nothing).
    pub unchanged: Vec<String>,
    /// Images a reviewer accepted or edited: never re-mined.
    pub kept: Vec<String>,
    /// Images a person reviewed while the pass ran: their decision stands, nothing written.
    pub skipped_reviewed: Vec<String>,
    /// Images whose prediction had no component (nothing recorded).
    pub no_component: Vec<String>,
    /// Images that could not be mined, with the error; the others were still mined.
    pub failed: Vec<(String, String)>,
    /// Components prompted over the mined images.
    pub components: usize,
    /// Rounds run over the mined images.
    pub rounds: usize,
    /// Mined images whose refinement stopped because successive masks agreed.
    pub converged: usize,
    /// Mined images whose pseudo-label is not their last round (a refinement lowered the
    /// quality).
    pub earlier_round_chosen: usize,
    /// Means over the mined images' pseudo-labels (their best rounds).
    pub mean_quality: Option<f64>,
    pub mean_sam_iou: Option<f64>,
    pub mean_stability: Option<f64>,
    pub mean_agreement: Option<f64>,
    /// Mined images whose pseudo-label has another component count than the U-Net++
    /// prediction (a changed count lowers the quality score).
    pub component_count_changed: usize,
    /// Images accepted by `auto_accept`.
    pub auto_accepted: Vec<String>,
    /// Stopped by the cancel flag before the end.
    pub cancelled: bool,
}

/// An 8-bit image to SAM, from our normalised planes (values in [0, 1]).
pub use crate::data::to_rgb8 as to_rgb;

/// The models of a pass, as recorded with its pseudo-labels.
struct Provenance {
    unet_hash: String,
    unet_path: String,
    labeler_id: String,
    /// `sam_checkpoint` column: the labeler's checkpoint path, or its id.
    labeler_source: String,
}

/// The pseudo-label of one mined image, for the means and the auto-accept.
struct Chosen {
    name: String,
    quality: f64,
    sam_iou: Option<f64>,
    stability: Option<f64>,
    agreement: Option<f64>,
    /// The image's revision after the write (the auto-accept's compare-and-set).
    revision: i64,
}

/// What happened to one selected image.
enum Outcome {
    Mined(MinedImage, Chosen),
    NoComponent,
    SkippedReviewed,
    Failed(String),
}

/// Mines the unlabelled images of `project` that the [`Remine`] policy selects (see the
/// module doc) with `labeler`, from the predictions of the U-Net++ `unet_checkpoint`.
/// `progress(done, total)` once the images are selected (`done` 0) and after each one;
/// `cancel` is checked before each one (what is stored stays stored). Each image's
/// pseudo-labels, and its auto-acceptance, are stored only if no person changed the image
/// since it was selected ([`Project::add_pseudo_labels_if`], [`Project::accept_if`]);
/// otherwise it is counted in [`MiningSummary::skipped_reviewed`].
pub fn mine_project(
    project: &mut Project,
    unet_checkpoint: &Path,
    labeler: &mut dyn Labeler,
    cfg: &MiningConfig,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
    cancel: &AtomicBool,
) -> Result<MiningSummary, MiningError> {
    cfg.check()?;
    let (unet, who) = load_unet(
        unet_checkpoint,
        &*labeler,
        cfg,
        device,
        &project.cache_dir(),
    )?;
    let (todo, mut summary) = select::select_images(project, cfg.remine, &who, None)?;
    let total = todo.len();
    progress(0, total);
    let mut chosen: Vec<Chosen> = Vec::new();
    for (done, cand) in todo.into_iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            summary.cancelled = true;
            break;
        }
        let name = cand.name.clone();
        match mine_one(project, &unet, labeler, cfg, &who, cand)? {
            Outcome::Mined(mined, c) => {
                summary.components += mined.components;
                summary.rounds += mined.rounds.len();
                summary.converged += usize::from(mined.converged);
                summary.earlier_round_chosen += usize::from(mined.best() + 1 < mined.rounds.len());
                let change = mined.chosen().component_change();
                summary.component_count_changed += usize::from(change.is_some_and(|c| c != 0));
                summary.mined.push(name);
                chosen.push(c);
            }
            Outcome::NoComponent => summary.no_component.push(name),
            Outcome::SkippedReviewed => summary.skipped_reviewed.push(name),
            Outcome::Failed(reason) => summary.failed.push((name, reason)),
        }
        progress(done + 1, total);
    }
    summary.mean_quality = quality::mean(chosen.iter().map(|c| c.quality));
    summary.mean_sam_iou = quality::mean(chosen.iter().filter_map(|c| c.sam_iou));
    summary.mean_stability = quality::mean(chosen.iter().filter_map(|c| c.stability));
    summary.mean_agreement = quality::mean(chosen.iter().filter_map(|c| c.agreement));
    if let Some(min) = cfg.auto_accept {
        auto_accept(project, min, &chosen, &mut summary)?;
    }
    Ok(summary)
}

/// One image labelled, not yet stored.
enum Labelled {
    /// Its rounds, and the rows to store (the pseudo-label last).
    Mined(MinedImage, Vec<NewPseudoLabel>),
    NoComponent,
    Failed(String),
}

/// Predicts and labels one image (reads the project only).
fn label_one(
    project: &Project,
    unet: &Predictor,
    labeler: &mut dyn Labeler,
    cfg: &MiningConfig,
    who: &Provenance,
    name: &str,
) -> Result<Labelled, MiningError> {
    let read = project.load_image(name).and_then(|img| {
        let file = project.image_file(name)?;
        Ok((img, file, project.ground_truth(name)?))
    });
    let (img, file, truth) = match read {
        Ok(v) => v,
        Err(e) => return Ok(Labelled::Failed(e.to_string())),
    };
    let probs = predict(unet, name, &img)?;
    let input = LabelInput {
        name,
        image: &img,
        file: &file,
        probs: &probs,
        ground_truth: truth.as_deref(),
    };
    let mined = match labeler.label(&input, cfg) {
        Ok(Some(m)) if !m.rounds.is_empty() => m,
        Ok(_) => return Ok(Labelled::NoComponent),
        Err(e @ MiningError::NoGroundTruth { .. }) => return Ok(Labelled::Failed(e.to_string())),
        Err(e) => return Err(e),
    };
    let labels = mined
        .store_order()
        .into_iter()
        .enumerate()
        .map(|(k, r)| new_pseudo_label(r, k as i64, who))
        .collect();
    Ok(Labelled::Mined(mined, labels))
}

/// The pass's U-Net++ and the provenance its pseudo-labels record (the checkpoint's hash is
/// cached in `cache_dir`).
fn load_unet(
    unet_checkpoint: &Path,
    labeler: &dyn Labeler,
    cfg: &MiningConfig,
    device: &Device,
    cache_dir: &Path,
) -> Result<(Predictor, Provenance), MiningError> {
    let unet = Predictor::load(unet_checkpoint, device, cfg.unet_mode).map_err(|source| {
        MiningError::LoadUnet {
            path: unet_checkpoint.to_path_buf(),
            source,
        }
    })?;
    let hash_cache = labeler::hash::hash_cache_in(cache_dir);
    let who = Provenance {
        unet_hash: labeler::hash::cached_sha256(unet_checkpoint, Some(&hash_cache))?,
        unet_path: unet_checkpoint.display().to_string(),
        labeler_id: labeler.id().to_string(),
        labeler_source: labeler
            .checkpoint()
            .map_or_else(|| labeler.id().to_string(), |p| p.display().to_string()),
    };
    Ok((unet, who))
}

/// Predicts, labels and stores one image.
fn mine_one(
    project: &mut Project,
    unet: &Predictor,
    labeler: &mut dyn Labeler,
    cfg: &MiningConfig,
    who: &Provenance,
    cand: Candidate,
) -> Result<Outcome, MiningError> {
    let (mined, labels) = match label_one(project, unet, labeler, cfg, who, &cand.name)? {
        Labelled::Mined(m, l) => (m, l),
        Labelled::NoComponent => return Ok(Outcome::NoComponent),
        Labelled::Failed(e) => return Ok(Outcome::Failed(e)),
    };
    let Some(revision) = select::write_rounds(project, &cand, &labels)? else {
        return Ok(Outcome::SkippedReviewed);
    };
    let best = mined.chosen();
    let c = Chosen {
        name: cand.name.clone(),
        quality: best.quality().unwrap_or(0.0),
        sam_iou: best.sam_iou,
        stability: best.stability,
        agreement: best.agreement,
        revision,
    };
    Ok(Outcome::Mined(mined, c))
}

/// The U-Net++ probability map of one image.
fn predict(unet: &Predictor, name: &str, img: &ImageF32) -> Result<ProbMap, MiningError> {
    unet.predict(&[img])
        .map_err(|source| MiningError::Predict {
            image: name.to_string(),
            source,
        })?
        .pop()
        .ok_or_else(|| MiningError::Invalid {
            image: name.to_string(),
            reason: "the U-Net++ returned no prediction".into(),
        })
}

/// One round as the store's row (`round` is the position in this pass's write; the store
/// appends after the image's newest round).
fn new_pseudo_label(r: &RoundResult, round: i64, who: &Provenance) -> NewPseudoLabel {
    NewPseudoLabel {
        round,
        mask: r.mask.clone(),
        prompts: r.prompts.clone(),
        sam_iou: r.sam_iou,
        stability: r.stability,
        agreement: r.agreement,
        unet_components: r.unet_components.map(|n| n as i64),
        label_components: r.label_components.map(|n| n as i64),
        sam_checkpoint: Some(who.labeler_source.clone()),
        unet_checkpoint: Some(who.unet_path.clone()),
        unet_hash: Some(who.unet_hash.clone()),
        labeler: Some(who.labeler_id.clone()),
    }
}

/// Accepts the images mined now whose pseudo-label scores at least `min`, each only if no
/// person reviewed it since it was written.
fn auto_accept(
    project: &mut Project,
    min: f64,
    chosen: &[Chosen],
    summary: &mut MiningSummary,
) -> Result<(), MiningError> {
    let note = format!("auto-accepted: quality >= {min}");
    let actor = Actor {
        reviewer: Some("medmine mine"),
        note: Some(&note),
    };
    for c in chosen.iter().filter(|c| c.quality >= min) {
        if select::accept(project, &c.name, c.revision, actor)? {
            summary.auto_accepted.push(c.name.clone());
        } else {
            summary.skipped_reviewed.push(c.name.clone());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_checked() {
        let ok = MiningConfig::default();
        assert!(ok.check().is_ok());
        let e = MiningConfig {
            rounds: 0,
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("rounds"), "{e}");
        let e = MiningConfig {
            stop_iou: 1.5,
            ..ok.clone()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("stop IoU"), "{e}");
        let e = MiningConfig {
            auto_accept: Some(f64::NAN),
            ..ok
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("auto-accept"), "{e}");
    }

    #[test]
    fn remine_policies_by_name() {
        for r in Remine::ALL {
            assert_eq!(r.to_string().parse::<Remine>().unwrap(), r);
        }
        assert_eq!(Remine::default(), Remine::Changed);
        let e = "always".parse::<Remine>().unwrap_err().to_string();
        assert!(
            e.contains("'always'") && e.contains("changed, all or none"),
            "{e}"
        );
    }

    #[test]
    fn rgb_conversion_scales_and_clamps() {
        let img = ImageF32 {
            width: 2,
            height: 1,
            data: vec![0.0, 1.0, 0.5, 2.0, -1.0, 0.2],
        };
        let rgb = to_rgb(&img);
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 128, 0]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 255, 51]);
    }

    #[test]
    fn missing_sam_checkpoint_says_where_to_get_one() {
        let e = MiningError::NoSamCheckpoint {
            path: PathBuf::from("weights/sam_vit_b_01ec64.pth"),
        };
        let m = e.to_string();
        assert!(
            m.starts_with("weights/sam_vit_b_01ec64.pth: no SAM checkpoint"),
            "{m}"
        );
        for hint in [
            "medmine weights download vit_b",
            "weights/",
            "--sam",
            "README",
        ] {
            assert!(m.contains(hint), "{hint}: {m}");
        }
    }
}
