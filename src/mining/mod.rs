//! Knowledge mining (issue 5): a U-Net++ trained on the labelled images predicts each
//! unlabelled image; its connected components become SAM prompts ([`crate::prompts`]); SAM's
//! masks (one decoder call per component, batched on one embedding) are united, refined for up
//! to K rounds ([`refine`]) and scored ([`quality`]: SAM's predicted IoU, stability, Dice
//! agreement with the U-Net++ and the connected-component counts of both masks, combined by
//! [`crate::store::quality_score`]); every round is stored in the project as a pseudo-label
//! pending review, the last round being the one reviewed.
//!
//! Store rounds: the `round` of a pseudo-label row is a per-image sequence. A mining pass
//! writes its rounds as `base, base + 1, …` where `base` is one past the image's highest
//! stored round (0 on first mining), so the newest row is always the newest pass's final mask
//! and a re-mine never mixes with, or overwrites, an older pass. Round 0 of a pass has the
//! strategy's name in `prompts.strategy`, later rounds `refine K`.
//!
//! Which images: those with role `unlabelled`. An image that already has a pseudo-label is
//! skipped unless [`MiningConfig::remine`]; even then, an image a reviewer accepted or edited
//! is never re-mined (its decision stands). An image whose prediction has no component of at
//! least `min_area` pixels gets nothing and is counted.
pub mod experiment;
pub mod finetune;
pub mod quality;
pub mod refine;
mod round;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use image::{ImageDecoder, ImageReader, RgbImage};

pub use round::{mine_image, MinedImage, RoundResult};

use crate::data::ImageF32;
use crate::models::sam::{load_sam, EmbeddingCache, SamError, SamPredictor, Variant};
use crate::models::unetpp::InferenceMode;
use crate::predict::Predictor;
use crate::prompts::{PromptConfig, PromptError};
use crate::store::{quality_score, Actor, MachineWrite, NewPseudoLabel, Project, Role, StoreError};
use crate::train::checkpoint::CheckpointError;

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
    #[error("SAM checkpoint: {0}")]
    LoadSam(#[source] SamError),
    #[error("U-Net++ checkpoint {}: {source}", .path.display())]
    LoadUnet {
        path: PathBuf,
        #[source]
        source: CheckpointError,
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
    #[error("{image}: {reason}")]
    Invalid { image: String, reason: String },
    #[error("{image}: {source}")]
    Store {
        image: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Project(#[from] StoreError),
}

/// How a project is mined.
#[derive(Clone, Debug, PartialEq)]
pub struct MiningConfig {
    /// Prompt derivation, including the strategy (`prompt.strategy`).
    pub prompt: PromptConfig,
    /// SAM rounds per image (K >= 1): round 0 from the U-Net++ prompts, then K - 1 refinements.
    pub rounds: usize,
    /// Stop refining once the IoU of two successive rounds' masks reaches this.
    pub stop_iou: f64,
    /// Ask SAM for three masks per prompt and keep the one with the highest predicted IoU.
    pub multimask: bool,
    /// Accept the images mined now whose quality score is at least this.
    pub auto_accept: Option<f64>,
    /// Also re-mine images that already have a pseudo-label (pending or rejected ones).
    pub remine: bool,
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
            remine: false,
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

/// What a mining pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MiningSummary {
    /// Unlabelled images in the project.
    pub unlabelled: usize,
    /// Images that got a pseudo-label now.
    pub mined: Vec<String>,
    /// Components prompted over the mined images.
    pub components: usize,
    /// SAM rounds run over the mined images.
    pub rounds: usize,
    /// Mined images whose refinement stopped because successive masks agreed.
    pub converged: usize,
    /// Images whose prediction had no component (nothing recorded).
    pub no_component: Vec<String>,
    /// Images skipped because they already have a pseudo-label (without `remine`) or a
    /// reviewer accepted or edited them.
    pub already_mined: Vec<String>,
    /// Images that could not be read, with the error; the others were still mined.
    pub failed: Vec<(String, String)>,
    /// Means over the mined images' final rounds.
    pub mean_quality: Option<f64>,
    pub mean_sam_iou: Option<f64>,
    pub mean_stability: Option<f64>,
    pub mean_agreement: Option<f64>,
    /// Mined images whose final mask has another component count than the U-Net++
    /// prediction (a changed count lowers the quality score).
    pub component_count_changed: usize,
    /// Images accepted by `auto_accept`.
    pub auto_accepted: Vec<String>,
    /// Images a person reviewed while this pass worked on them ("skipped: reviewed
    /// meanwhile"): their pseudo-label or their auto-acceptance was not stored (see
    /// [`crate::store::MachineWrite`]).
    pub skipped_reviewed: Vec<String>,
    /// Stopped by the cancel flag before the end.
    pub cancelled: bool,
}

/// An 8-bit image to SAM, from our normalised planes (values in [0, 1]).
pub fn to_rgb(img: &ImageF32) -> RgbImage {
    let n = img.width * img.height;
    let px = |c: usize, i: usize| (img.data[c * n + i].clamp(0.0, 1.0) * 255.0).round() as u8;
    RgbImage::from_fn(img.width as u32, img.height as u32, |x, y| {
        let i = y as usize * img.width + x as usize;
        image::Rgb([px(0, i), px(1, i), px(2, i)])
    })
}

/// Whether the `image` crate reads the file as 8 bits per channel (then SAM sees the same
/// pixels through the embedding cache as in `medmine segment` and the GUI).
fn is_eight_bit(path: &Path) -> bool {
    let Ok(reader) = ImageReader::open(path).and_then(|r| r.with_guessed_format()) else {
        return false;
    };
    reader.into_decoder().is_ok_and(|d| {
        use image::ColorType::*;
        matches!(d.color_type(), L8 | La8 | Rgb8 | Rgba8)
    })
}

/// Mines every unlabelled image of `project` (see the module doc for which ones and how
/// rounds are stored). `progress(0, total)` once the images are selected, then
/// `progress(done, total)` after each candidate image; `cancel` is checked before each one
/// (what is stored stays stored). Each image's pseudo-labels, and its auto-acceptance, are
/// stored only if no person changed the image since it was selected
/// ([`Project::add_pseudo_labels_if`], [`Project::accept_if`]); otherwise it is counted in
/// [`MiningSummary::skipped_reviewed`].
pub fn mine_project(
    project: &mut Project,
    unet_checkpoint: &Path,
    sam_checkpoint: &Path,
    cfg: &MiningConfig,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
    cancel: &AtomicBool,
) -> Result<MiningSummary, MiningError> {
    cfg.check()?;
    if !sam_checkpoint.is_file() {
        return Err(MiningError::NoSamCheckpoint {
            path: sam_checkpoint.to_path_buf(),
        });
    }
    let unet = Predictor::load(unet_checkpoint, device, cfg.unet_mode).map_err(|source| {
        MiningError::LoadUnet {
            path: unet_checkpoint.to_path_buf(),
            source,
        }
    })?;
    let sam = SamPredictor::new(
        load_sam(sam_checkpoint, cfg.sam_variant, device).map_err(MiningError::LoadSam)?,
    );
    let cache = EmbeddingCache::new(
        Some(&project.cache_dir().join("sam-embeddings")),
        2,
        sam_checkpoint,
    )
    .map_err(MiningError::LoadSam)?;
    let sam_id = sam_checkpoint.display().to_string();
    let unet_id = unet_checkpoint.display().to_string();

    let mut summary = MiningSummary::default();
    let mut todo: Vec<(String, i64)> = Vec::new(); // (image, revision when selected)
    for rec in project.images()? {
        if rec.role != Role::Unlabelled {
            continue;
        }
        summary.unlabelled += 1;
        let at = |source| MiningError::Store {
            image: rec.name.clone(),
            source,
        };
        let review = project.review(&rec.name).map_err(at)?;
        if project
            .latest_pseudo_label(&rec.name)
            .map_err(at)?
            .is_some()
            && (!cfg.remine || review.state.is_accepted())
        {
            summary.already_mined.push(rec.name);
            continue;
        }
        todo.push((rec.name, review.revision));
    }

    let total = todo.len();
    progress(0, total);
    // name, revision after the write, q, iou, stab, agr
    let mut finals: Vec<(String, i64, f64, f64, f64, f64)> = Vec::new();
    for (done, (name, selected_revision)) in todo.into_iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            summary.cancelled = true;
            break;
        }
        let at = |source| MiningError::Store {
            image: name.clone(),
            source,
        };
        let (img, path) = match project
            .load_image(&name)
            .and_then(|img| Ok((img, project.image_file(&name)?)))
        {
            Ok(v) => v,
            Err(e) => {
                summary.failed.push((name, e.to_string()));
                progress(done + 1, total);
                continue;
            }
        };
        let probs = unet
            .predict(&[&img])
            .map_err(|source| MiningError::Predict {
                image: name.clone(),
                source,
            })?
            .pop()
            .ok_or_else(|| MiningError::Invalid {
                image: name.clone(),
                reason: "the U-Net++ returned no prediction".into(),
            })?;
        // Prompts first: an image without components costs no SAM encoder run.
        let no_component = crate::prompts::prompts_from_probs(
            &probs.data,
            probs.width,
            probs.height,
            &PromptConfig {
                strategy: crate::prompts::Strategy::Box,
                ..cfg.prompt.clone()
            },
        )
        .map_err(|source| MiningError::Prompts {
            image: name.clone(),
            source,
        })?
        .components
        .is_empty();
        if no_component {
            summary.no_component.push(name);
            progress(done + 1, total);
            continue;
        }
        let emb = if is_eight_bit(&path) {
            cache.get_or_compute(&path, &sam)
        } else {
            sam.set_image(&to_rgb(&img))
        }
        .map_err(|source| MiningError::Sam {
            image: name.clone(),
            source,
        })?;
        let Some(mined) = mine_image(
            &name,
            &sam,
            &emb,
            &probs.data,
            probs.width,
            probs.height,
            cfg,
        )?
        else {
            summary.no_component.push(name);
            progress(done + 1, total);
            continue;
        };
        let labels: Vec<NewPseudoLabel> = mined
            .rounds
            .iter()
            .enumerate()
            .map(|(k, r)| NewPseudoLabel {
                round: k as i64,
                mask: r.mask.clone(),
                prompts: r.prompts.clone(),
                sam_iou: Some(r.sam_iou),
                stability: Some(r.stability),
                agreement: Some(r.agreement),
                unet_components: Some(r.unet_components as i64),
                label_components: Some(r.label_components as i64),
                sam_checkpoint: Some(sam_id.clone()),
                unet_checkpoint: Some(unet_id.clone()),
                unet_hash: None,
                labeler: None,
            })
            .collect();
        let revision = match project
            .add_pseudo_labels_if(&name, selected_revision, &labels)
            .map_err(at)?
        {
            MachineWrite::Written { revision } => revision,
            MachineWrite::Skipped { .. } => {
                summary.skipped_reviewed.push(name);
                progress(done + 1, total);
                continue;
            }
        };
        let last = mined.last();
        let change = last.label_components as i64 - last.unet_components as i64;
        let q = quality_score(
            Some(last.sam_iou),
            Some(last.stability),
            Some(last.agreement),
            Some(change),
        )
        .unwrap_or(0.0);
        summary.component_count_changed += usize::from(change != 0);
        summary.components += mined.components;
        summary.rounds += mined.rounds.len();
        summary.converged += usize::from(mined.converged);
        finals.push((
            name.clone(),
            revision,
            q,
            last.sam_iou,
            last.stability,
            last.agreement,
        ));
        summary.mined.push(name);
        progress(done + 1, total);
    }
    summary.mean_quality = quality::mean(finals.iter().map(|f| f.2));
    summary.mean_sam_iou = quality::mean(finals.iter().map(|f| f.3));
    summary.mean_stability = quality::mean(finals.iter().map(|f| f.4));
    summary.mean_agreement = quality::mean(finals.iter().map(|f| f.5));

    if let Some(min) = cfg.auto_accept {
        let note = format!("auto-accepted: quality >= {min}");
        let actor = Actor {
            reviewer: Some("medmine mine"),
            note: Some(&note),
        };
        for (name, revision, q, ..) in finals.into_iter().filter(|f| f.2 >= min) {
            let write = project
                .accept_if(&name, revision, actor)
                .map_err(|source| MiningError::Store {
                    image: name.clone(),
                    source,
                })?;
            match write {
                MachineWrite::Written { .. } => summary.auto_accepted.push(name),
                MachineWrite::Skipped { .. } => {
                    tracing::debug!("{name}: reviewed meanwhile, not auto-accepted (quality {q})");
                    summary.skipped_reviewed.push(name);
                }
            }
        }
    }
    Ok(summary)
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
