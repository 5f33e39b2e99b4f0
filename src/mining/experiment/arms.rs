//! What makes a long experiment resumable: each finished arm of a run leaves a record
//! (`RUN_DIR/<arm>.json`, written durably), a run's projects are imported under a temporary
//! name and renamed when complete, and `OUT/settings.json` holds the settings the records were
//! made with, so that a later `experiment` with the same `--out` picks up the finished arms and
//! refuses to mix in records made with other settings.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ExperimentError;
use crate::fsutil;
use crate::metrics::Scores;
use crate::store::{ImportOptions, Project};

/// The arms of one fraction and seed, in the order they run.
pub const ARMS: [&str; 4] = ["baseline", "mined", "control", "selftrain"];

/// One finished arm.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmRecord {
    pub arm: String,
    /// Mean per-image scores on the test split, and the number of test images.
    pub test: Scores,
    pub test_images: usize,
    /// Best validation Dice of the arm's training (what picked its checkpoint).
    pub val_dice: Option<f64>,
    pub checkpoint: PathBuf,
    /// Optimiser steps the arm's training took.
    pub optimizer_steps: usize,
    /// Images used: labelled (ground truth) and pseudo-labelled.
    pub labelled: usize,
    pub pseudo: usize,
    /// Mining arms: pseudo-labels the labeler made and how many the threshold accepted.
    #[serde(default)]
    pub mined: usize,
    #[serde(default)]
    pub accepted: usize,
    /// Wall time of the arm (training, mining and scoring).
    pub seconds: f64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExperimentError + '_ {
    move |source| ExperimentError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ExperimentError> {
    let json = serde_json::to_vec_pretty(value).expect("records serialise");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    fsutil::write_durable(path, &json).map_err(|e| ExperimentError::Io {
        path: e.path,
        source: e.source,
    })
}

/// The record of `arm` in `run_dir`, if that arm finished (its checkpoint still there).
pub fn read_arm(run_dir: &Path, arm: &str) -> Result<Option<ArmRecord>, ExperimentError> {
    let path = run_dir.join(format!("{arm}.json"));
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let rec: ArmRecord = serde_json::from_slice(&bytes).map_err(|e| {
        ExperimentError::Settings(format!(
            "{}: not a finished arm's record ({e}); delete it to run that arm again",
            path.display()
        ))
    })?;
    Ok(rec.checkpoint.is_file().then_some(rec))
}

/// Records a finished arm (durably: a killed process leaves the old record or the new one).
pub fn write_arm(run_dir: &Path, rec: &ArmRecord) -> Result<(), ExperimentError> {
    write_json(&run_dir.join(format!("{}.json", rec.arm)), rec)
}

/// Compares `settings` with `OUT/settings.json` (written on the first run): records made with
/// other settings are never mixed into one table. Fractions and seeds are not settings: a
/// later run may add some.
pub fn check_settings(out: &Path, settings: &serde_json::Value) -> Result<(), ExperimentError> {
    let path = out.join("settings.json");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let earlier: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                ExperimentError::Settings(format!("{}: unreadable ({e})", path.display()))
            })?;
            if &earlier == settings {
                return Ok(());
            }
            let differ: Vec<String> = match (earlier.as_object(), settings.as_object()) {
                (Some(a), Some(b)) => a
                    .keys()
                    .chain(b.keys())
                    .filter(|k| a.get(*k) != b.get(*k))
                    .map(|k| k.to_string())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                _ => vec!["all".into()],
            };
            Err(ExperimentError::Settings(format!(
                "{} holds an experiment made with other settings ({} differ, see {}); \
                 give another --out, or delete that folder to start again",
                out.display(),
                differ.join(", "),
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_json(&path, settings),
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Opens the project `dir`, or imports it: into `dir` + `.importing` first (removed if a killed
/// run left it), renamed to `dir` when the import is complete.
pub fn open_or_import(dir: &Path, opts: &ImportOptions) -> Result<Project, ExperimentError> {
    if dir.exists() {
        return Ok(Project::open(dir)?);
    }
    let mut tmp = dir.as_os_str().to_owned();
    tmp.push(".importing");
    let tmp = PathBuf::from(tmp);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    {
        let mut project = Project::init(&tmp)?;
        project.import(opts)?;
    }
    std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
    Ok(Project::open(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path, arm: &str) -> ArmRecord {
        let checkpoint = dir.join(format!("{arm}.safetensors"));
        std::fs::write(&checkpoint, b"x").unwrap();
        ArmRecord {
            arm: arm.into(),
            test: Scores {
                dice: 0.5,
                iou: 0.4,
                ..Scores::default()
            },
            test_images: 3,
            val_dice: Some(0.6),
            checkpoint,
            optimizer_steps: 12,
            labelled: 4,
            pseudo: 2,
            mined: 3,
            accepted: 2,
            seconds: 1.5,
        }
    }

    #[test]
    fn records_round_trip_and_need_their_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_arm(dir.path(), "mined").unwrap(), None);
        let rec = record(dir.path(), "mined");
        write_arm(dir.path(), &rec).unwrap();
        assert_eq!(read_arm(dir.path(), "mined").unwrap(), Some(rec.clone()));
        std::fs::remove_file(&rec.checkpoint).unwrap();
        assert_eq!(read_arm(dir.path(), "mined").unwrap(), None, "redo the arm");
        std::fs::write(dir.path().join("control.json"), b"{ half").unwrap();
        let err = read_arm(dir.path(), "control").unwrap_err().to_string();
        assert!(
            err.contains("control.json") && err.contains("delete it"),
            "{err}"
        );
    }

    #[test]
    fn settings_are_written_once_and_compared() {
        let dir = tempfile::tempdir().unwrap();
        let a = serde_json::json!({"size": 96, "labeler": "oracle"});
        check_settings(dir.path(), &a).unwrap();
        check_settings(dir.path(), &a).unwrap();
        let b = serde_json::json!({"size": 128, "labeler": "oracle"});
        let err = check_settings(dir.path(), &b).unwrap_err().to_string();
        assert!(err.contains("other settings (size differ"), "{err}");
        assert!(!err.contains("labeler"), "{err}");
    }
}
