//! Typed records of the project store and their mapping to and from SQL rows.
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What an image is used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Its ground truth trains the U-Net++.
    Labelled,
    /// The pool that knowledge mining labels (its ground truth, if any, is withheld).
    Unlabelled,
    /// Validation split.
    Val,
    /// Test split.
    Test,
}

/// The review state of an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReviewState {
    /// Not reviewed yet (or a new pseudo-label arrived, or an edit was undone).
    Pending,
    Accepted,
    Rejected,
    /// The reviewer saved a corrected mask (it counts as accepted, with that mask).
    Edited,
}

/// The status of a training run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Done,
    Cancelled,
    Failed,
}

macro_rules! string_enum {
    ($t:ty, $what:literal, $($v:ident => $s:literal),+) => {
        impl $t {
            /// Every value, in declaration order.
            pub const ALL: &'static [$t] = &[$(<$t>::$v),+];
            /// The name stored in the database and shown to users.
            pub fn as_str(self) -> &'static str {
                match self { $(<$t>::$v => $s),+ }
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s.to_ascii_lowercase().as_str() {
                    $($s => Ok(<$t>::$v),)+
                    _ => Err(format!(
                        "{s:?} is not a {} (expected one of: {})",
                        $what,
                        [$($s),+].join(", ")
                    )),
                }
            }
        }
        impl rusqlite::types::FromSql for $t {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                let s = v.as_str()?;
                s.parse().map_err(|e: String| rusqlite::types::FromSqlError::Other(e.into()))
            }
        }
        impl rusqlite::types::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
    };
}

string_enum!(Role, "role", Labelled => "labelled", Unlabelled => "unlabelled", Val => "val", Test => "test");
string_enum!(ReviewState, "review state", Pending => "pending", Accepted => "accepted", Rejected => "rejected", Edited => "edited");
string_enum!(RunStatus, "run status", Running => "running", Done => "done", Cancelled => "cancelled", Failed => "failed");

impl ReviewState {
    /// Accepted or edited: the image's pseudo-label (or edited mask) may be used for training.
    pub fn is_accepted(self) -> bool {
        matches!(self, ReviewState::Accepted | ReviewState::Edited)
    }
}

/// One image of the project.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageRecord {
    pub id: i64,
    /// File name in the dataset, unique in the project (e.g. `abc.jpg`).
    pub name: String,
    /// Where the file is (absolute when imported from an absolute or canonicalisable path).
    pub path: PathBuf,
    /// SHA-256 of the file content at import.
    pub sha256: String,
    pub width: usize,
    pub height: usize,
    pub role: Role,
}

impl ImageRecord {
    /// The name without its extension.
    pub fn stem(&self) -> &str {
        Path::new(&self.name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(&self.name)
    }
}

pub(crate) const IMAGE_SELECT: &str =
    "SELECT id, name, path, sha256, width, height, role FROM images";

pub(crate) fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        path: PathBuf::from(r.get::<_, String>(2)?),
        sha256: r.get(3)?,
        width: r.get::<_, i64>(4)? as usize,
        height: r.get::<_, i64>(5)? as usize,
        role: r.get(6)?,
    })
}

/// A box prompt in image pixel coordinates (`x0 <= x1`, `y0 <= y1`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoxPrompt {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

/// A point prompt in image pixel coordinates; `positive` is SAM's label 1 (foreground),
/// otherwise label 0 (background).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PointPrompt {
    pub x: f32,
    pub y: f32,
    pub positive: bool,
}

/// The prompts SAM was given for a pseudo-label (stored as JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Prompts {
    #[serde(default)]
    pub boxes_in_image: Vec<BoxPrompt>,
    #[serde(default)]
    pub points_in_image: Vec<PointPrompt>,
    /// Whether a mask prompt (the U-Net++ or previous-round logits) was used.
    #[serde(default)]
    pub mask_prompt: bool,
    /// The prompt strategy's name (e.g. `box+points`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
}

/// The quality score of a pseudo-label: `sam_iou × stability × agreement × 1 / (1 + |Δc|)`,
/// where `Δc` is the component count change (pseudo-label minus U-Net++ prediction, see
/// [`crate::mining::quality::component_count`]): a label that split, merged, lost or added an
/// object is less confident. A factor that was not recorded counts as 1; `None` when none of
/// the four was recorded.
pub fn quality_score(
    sam_iou: Option<f64>,
    stability: Option<f64>,
    agreement: Option<f64>,
    component_change: Option<i64>,
) -> Option<f64> {
    let component = component_change.map(component_factor);
    let factors = [sam_iou, stability, agreement, component];
    if factors.iter().all(Option::is_none) {
        return None;
    }
    Some(factors.iter().map(|f| f.unwrap_or(1.0)).product())
}

/// The quality factor of a component count change `Δc`: `1 / (1 + |Δc|)` (1 for no change,
/// 1/2 for one object more or fewer, …).
pub fn component_factor(change: i64) -> f64 {
    1.0 / (1.0 + change.unsigned_abs() as f64)
}

/// `label - unet` when both counts are known.
pub fn component_change(unet: Option<i64>, label: Option<i64>) -> Option<i64> {
    Some(label? - unet?)
}

/// A pseudo-label to store.
#[derive(Clone, Debug, PartialEq)]
pub struct NewPseudoLabel {
    /// Mining round (0 = the first).
    pub round: i64,
    pub mask: crate::data::Mask,
    pub prompts: Prompts,
    /// SAM's predicted IoU.
    pub sam_iou: Option<f64>,
    /// Stability score (IoU of the masks thresholded at logits +1 and -1).
    pub stability: Option<f64>,
    /// Dice agreement between SAM's mask and the U-Net++ prediction.
    pub agreement: Option<f64>,
    /// Connected components of the U-Net++ prediction and of this mask (those of at least the
    /// prompts' minimum area).
    pub unet_components: Option<i64>,
    pub label_components: Option<i64>,
    /// Identifiers (path or hash) of the checkpoints that produced it.
    pub sam_checkpoint: Option<String>,
    pub unet_checkpoint: Option<String>,
    /// SHA-256 (lower-case hex) of the U-Net++ checkpoint file that made it.
    pub unet_hash: Option<String>,
    /// Who labelled it, e.g. `sam:<sha256 of the SAM checkpoint>`, `unet`, `oracle-object`.
    pub labeler: Option<String>,
}

/// A stored pseudo-label.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PseudoLabel {
    pub id: i64,
    pub image: String,
    pub round: i64,
    /// File name in the project's `masks/`.
    pub mask_file: String,
    pub prompts: Prompts,
    pub sam_iou: Option<f64>,
    pub stability: Option<f64>,
    pub agreement: Option<f64>,
    pub unet_components: Option<i64>,
    pub label_components: Option<i64>,
    pub sam_checkpoint: Option<String>,
    pub unet_checkpoint: Option<String>,
    /// SHA-256 of the U-Net++ checkpoint file that made it (`None` before schema v4).
    pub unet_hash: Option<String>,
    /// The labeler's identity (`None` before schema v4).
    pub labeler: Option<String>,
    pub created_at: String,
}

impl PseudoLabel {
    /// `label_components - unet_components`, when both were recorded.
    pub fn component_change(&self) -> Option<i64> {
        component_change(self.unet_components, self.label_components)
    }

    /// See [`quality_score`].
    pub fn quality(&self) -> Option<f64> {
        quality_score(
            self.sam_iou,
            self.stability,
            self.agreement,
            self.component_change(),
        )
    }
}

/// The current review state of one image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Review {
    pub image: String,
    pub state: ReviewState,
    pub reviewer: Option<String>,
    /// RFC 3339 UTC time of the last action.
    pub at: Option<String>,
    pub note: Option<String>,
    /// The current edited mask version, if the mask was edited.
    pub mask_version: Option<i64>,
    /// The image's revision: bumped by every write to its review, by a person or the machine.
    /// A machine write passes the revision it read and is refused when it changed (see
    /// [`crate::store::MachineWrite`]).
    pub revision: i64,
}

/// The review-log actions the machine writes: a new pseudo-label (`pseudo_label`) and an
/// acceptance by quality score (`auto_accept`: `mine --auto-accept`, `review accept
/// --min-score`). Every other action (`review`, `edit`, `undo`, `redo`) is a person's.
pub const MACHINE_ACTIONS: &[&str] = &["pseudo_label", "auto_accept"];

/// One entry of the review log (every action, in order).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReviewEvent {
    pub id: i64,
    pub image: String,
    /// A person's `review`, `edit`, `undo`, `redo`, or the machine's `pseudo_label`,
    /// `auto_accept` ([`MACHINE_ACTIONS`]).
    pub action: String,
    /// The state after the action.
    pub state: ReviewState,
    pub reviewer: Option<String>,
    pub at: String,
    pub note: Option<String>,
    pub pseudo_label_id: Option<i64>,
    pub mask_version_id: Option<i64>,
}

impl ReviewEvent {
    /// Whether the machine wrote this entry (its action is one of [`MACHINE_ACTIONS`]).
    pub fn is_machine(&self) -> bool {
        MACHINE_ACTIONS.contains(&self.action.as_str())
    }
}

/// One version of an image's edited mask; versions form a tree through `parent_id`
/// (undo moves to the parent, redo to the newest child).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MaskVersion {
    pub id: i64,
    pub image: String,
    /// 1, 2, ... per image.
    pub seq: i64,
    pub parent_id: Option<i64>,
    pub mask_file: String,
    pub author: Option<String>,
    pub at: String,
    pub note: Option<String>,
}

/// A model prediction stored for an image.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Prediction {
    pub image: String,
    /// Model version (checkpoint path or hash).
    pub model: String,
    pub mask_file: String,
    pub probs_file: Option<String>,
    pub created_at: String,
}

/// A training run recorded in the project.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainingRun {
    pub id: i64,
    pub name: String,
    pub config: serde_json::Value,
    pub status: RunStatus,
    pub dir: PathBuf,
    pub best_checkpoint: Option<PathBuf>,
    pub last_checkpoint: Option<PathBuf>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), *r);
        }
        for s in ReviewState::ALL {
            assert_eq!(s.as_str().parse::<ReviewState>().unwrap(), *s);
        }
        let e = "maybe".parse::<ReviewState>().unwrap_err();
        assert!(e.contains("pending, accepted, rejected, edited"), "{e}");
    }

    #[test]
    fn quality() {
        assert_eq!(quality_score(None, None, None, None), None);
        assert_eq!(quality_score(Some(0.9), Some(0.5), None, None), Some(0.45));
        let q = quality_score(Some(0.9), Some(0.5), Some(0.5), None).unwrap();
        assert!((q - 0.225).abs() < 1e-12);
        // an unchanged component count leaves the score as it is
        assert_eq!(
            quality_score(Some(0.9), Some(0.5), None, Some(0)),
            Some(0.45)
        );
        // one component more or fewer halves it, two divide it by three
        assert_eq!(
            quality_score(Some(0.9), Some(0.5), None, Some(1)),
            Some(0.225)
        );
        assert_eq!(
            quality_score(Some(0.9), Some(0.5), None, Some(-1)),
            Some(0.225)
        );
        let q = quality_score(Some(0.9), None, None, Some(-2)).unwrap();
        assert!((q - 0.3).abs() < 1e-12);
        // the count change alone is a score
        assert_eq!(quality_score(None, None, None, Some(3)), Some(0.25));
        assert_eq!(component_change(Some(2), Some(1)), Some(-1));
        assert_eq!(component_change(None, Some(1)), None);
        assert_eq!(component_change(Some(1), None), None);
    }

    #[test]
    fn prompts_json() {
        let p = Prompts {
            boxes_in_image: vec![BoxPrompt {
                x0: 1.0,
                y0: 2.0,
                x1: 3.0,
                y1: 4.0,
            }],
            points_in_image: vec![PointPrompt {
                x: 5.0,
                y: 6.0,
                positive: false,
            }],
            mask_prompt: true,
            strategy: Some("box+points+mask".into()),
        };
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Prompts>(&s).unwrap(), p);
        assert_eq!(
            serde_json::from_str::<Prompts>("{}").unwrap(),
            Prompts::default()
        );
    }
}
