//! U-Net++ checkpoints: `NAME.safetensors` (weights and BatchNorm running statistics, keys as
//! in PyTorch's `NestedUNet` state dict) plus a JSON sidecar `NAME.json` (model config, input
//! size, epoch, metrics, data fingerprint, medmine version).
//!
//! Both files are written to a temporary name and renamed, weights first, so a killed process
//! never leaves a half-written checkpoint under the final name.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::models::unetpp::{Config, SeededInit, UNetPlusPlus};
use crate::progress::EpochRecord;

pub const FORMAT: &str = "medmine-unetpp";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a readable checkpoint sidecar: {message}", path.display())]
    Meta { path: PathBuf, message: String },
    #[error("{}: damaged or not a safetensors file: {message}", path.display())]
    Weights { path: PathBuf, message: String },
    #[error("{}: does not fit a U-Net++ (base {base}): {problem}", path.display())]
    Mismatch {
        path: PathBuf,
        base: usize,
        problem: String,
    },
    /// Not a U-Net++ checkpoint of medmine (what it looks like instead).
    #[error("{}: {what}", path.display())]
    NotUnet { path: PathBuf, what: String },
    #[error(
        "{}: tensor {tensor} holds {count} NaN or infinite values; the checkpoint cannot be \
         used (a diverged run? train again, or use an earlier checkpoint)",
        path.display()
    )]
    NonFinite {
        path: PathBuf,
        tensor: String,
        count: usize,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// Always [`FORMAT`]; anything else is refused.
    pub format: String,
    pub medmine_version: String,
    pub model: Config,
    /// Square input size the model was trained at.
    pub size: usize,
    /// Completed epochs when saved.
    pub epoch: usize,
    pub metrics: Option<EpochRecord>,
    /// SHA-256 over the training and validation image names, sizes and mask names.
    pub data_fingerprint: String,
    /// Free-form training settings (the `TrainConfig` as JSON).
    #[serde(default)]
    pub train: serde_json::Value,
    /// Best validation Dice so far and its epoch (for resume and early stopping). None
    /// without a validation set: the best epoch is then the one with the lowest training
    /// loss ([`CheckpointMeta::best_train_loss`]), never labelled a Dice.
    #[serde(default)]
    pub best_dice: Option<f64>,
    #[serde(default)]
    pub best_epoch: usize,
    /// Without a validation set: the lowest mean training loss of an epoch so far (the best
    /// epoch's).
    #[serde(default)]
    pub best_train_loss: Option<f64>,
    /// A fine-tuning run's input model's validation Dice (its "epoch 0"): the Dice to beat.
    #[serde(default)]
    pub initial_dice: Option<f64>,
    /// Optimiser (AdamW) steps taken when saved; None in files written before it was kept.
    #[serde(default)]
    pub optimizer_steps: Option<usize>,
    /// Set when the run was cancelled inside epoch `epoch + 1`: how far that epoch got, so a
    /// resume continues at the exact step.
    #[serde(default)]
    pub partial_epoch: Option<PartialEpoch>,
}

/// How far an unfinished epoch got (a run cancelled mid-epoch).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Optimiser steps of this epoch already taken.
    pub steps: usize,
    /// Sum of the batch losses times their sizes, and the samples seen, so far.
    pub loss_sum: f64,
    pub seen: usize,
    /// Seconds spent in this epoch so far.
    pub seconds: f64,
    /// The batch size the steps were taken with (a resume must use the same).
    pub batch: usize,
}

impl CheckpointMeta {
    pub fn new(model: Config, size: usize) -> Self {
        Self {
            format: FORMAT.into(),
            medmine_version: env!("CARGO_PKG_VERSION").into(),
            model,
            size,
            epoch: 0,
            metrics: None,
            data_fingerprint: String::new(),
            train: serde_json::Value::Null,
            best_dice: None,
            best_epoch: 0,
            best_train_loss: None,
            initial_dice: None,
            optimizer_steps: None,
            partial_epoch: None,
        }
    }
}

/// `run/best.safetensors` -> `run/best.json`
pub fn sidecar_path(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` durably (temporary file, fsync, rename; see [`crate::fsutil`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    crate::fsutil::write_durable(path, bytes).map_err(write_err)
}

fn write_err(e: crate::fsutil::WriteError) -> CheckpointError {
    CheckpointError::Io {
        path: e.path,
        source: e.source,
    }
}

/// Saves named tensors as safetensors, durably.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<(), CheckpointError> {
    let tmp = crate::fsutil::temp_path(path);
    if let Err(e) = candle_core::safetensors::save(tensors, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    crate::fsutil::rename_durable(&tmp, path).map_err(write_err)
}

/// Loads named tensors from a safetensors file, naming the file when it is damaged.
pub fn load_tensors(
    path: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, CheckpointError> {
    // a missing or unreadable file says so (the OS error), not "damaged"
    if let Err(source) = std::fs::File::open(path) {
        return Err(CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    let tensors =
        candle_core::safetensors::load(path, device).map_err(|e| CheckpointError::Weights {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    // checked once, here: NaN weights would predict all-0 or all-1 masks without a word
    if let Some((tensor, count)) = crate::models::first_non_finite(&tensors)? {
        return Err(CheckpointError::NonFinite {
            path: path.to_path_buf(),
            tensor,
            count,
        });
    }
    Ok(tensors)
}

/// Saves the weights of `map` to `path` and `meta` beside it.
pub fn save(map: &VarMap, meta: &CheckpointMeta, path: &Path) -> Result<(), CheckpointError> {
    let tensors: HashMap<String, Tensor> = {
        let data = map.data().lock().expect("varmap lock");
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    };
    save_tensors(&tensors, path)?;
    let json = serde_json::to_vec_pretty(meta).map_err(|e| CheckpointError::Meta {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(&sidecar_path(path), &json)
}

/// A freshly initialised U-Net++ (base `base`, input `size`) saved as `dir/init.safetensors`:
/// the starting point of a first training round from the GUI (fine-tuning from it is training
/// from scratch). The weights come from `seed` alone ([`SeededInit`]), on every device.
pub fn fresh_checkpoint(
    dir: &Path,
    base: usize,
    size: usize,
    seed: u64,
    device: &Device,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let map = VarMap::new();
    let cfg = Config::with_base(base);
    let path = dir.join("init.safetensors");
    SeededInit::new(seed)
        .model(&cfg, &map, DType::F32, device)
        .map_err(|e| CheckpointError::Weights {
            path: path.clone(),
            message: e.to_string(),
        })?;
    save(&map, &CheckpointMeta::new(cfg, size), &path)?;
    Ok(path)
}

pub fn load_meta(weights: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let path = sidecar_path(weights);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(explain_missing_sidecar(weights, &path, e))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| CheckpointError::Meta {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if meta.format != FORMAT {
        return Err(CheckpointError::Meta {
            path,
            message: format!("format is {:?}, expected {FORMAT:?}", meta.format),
        });
    }
    Ok(meta)
}

/// Why a checkpoint has no sidecar: the weights file is missing, empty, a SAM checkpoint or
/// some other file.
fn explain_missing_sidecar(weights: &Path, sidecar: &Path, e: std::io::Error) -> CheckpointError {
    let not_unet = |what: String| CheckpointError::NotUnet {
        path: weights.to_path_buf(),
        what,
    };
    let bytes = match std::fs::read(weights) {
        Ok(b) => b,
        Err(e) => return io(weights)(e),
    };
    if bytes.is_empty() {
        return not_unet("empty file (0 bytes), not a U-Net++ checkpoint".into());
    }
    let names: Vec<String> = match safetensors::SafeTensors::read_metadata(&bytes) {
        Ok((_, meta)) => meta.tensors().into_keys().collect(),
        Err(_) => Vec::new(),
    };
    let sam_like = |n: &str| n.contains("image_encoder") || n.contains("mask_decoder");
    let looks_sam = if names.is_empty() {
        // a PyTorch .pth (zip) of SAM names its tensors in the archive's pickle
        bytes.windows(13).any(|w| w == b"image_encoder")
    } else {
        names.iter().any(|n| sam_like(n))
    };
    if looks_sam {
        return not_unet(
            "this is a SAM checkpoint; this command needs a U-Net++ checkpoint (a \
             .safetensors written by `medmine train` or `finetune`, with its .json beside it)"
                .into(),
        );
    }
    not_unet(format!(
        "not a medmine U-Net++ checkpoint: its sidecar {} is missing ({e}); `medmine train` \
         writes both files",
        sidecar.display()
    ))
}

/// Copies the tensors of `path` into `map`, which must hold exactly the same names and
/// shapes (a checkpoint of another model or size is refused with the first difference).
pub fn load_into(map: &VarMap, path: &Path, base: usize) -> Result<(), CheckpointError> {
    let data = map.data().lock().expect("varmap lock");
    let first = data.values().next().map(|v| v.device().clone());
    let device = first.unwrap_or(Device::Cpu);
    let tensors = load_tensors(path, &device)?;
    let mismatch = |problem: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        base,
        problem,
    };
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let t = tensors
            .get(name)
            .ok_or_else(|| mismatch(format!("tensor {name} is missing")))?;
        if t.dims() != var.dims() {
            return Err(mismatch(format!(
                "tensor {name} has shape {:?}, the model expects {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    if let Some(extra) = tensors.keys().find(|k| !data.contains_key(*k)) {
        return Err(mismatch(format!("unexpected tensor {extra}")));
    }
    Ok(())
}

/// A U-Net++ restored from a checkpoint, with its variables and sidecar.
pub struct LoadedModel {
    pub model: UNetPlusPlus,
    pub map: VarMap,
    pub meta: CheckpointMeta,
}

impl LoadedModel {
    /// The same network over plain (detached) copies of the weights, for inference: a forward
    /// pass through `Var`s records its autograd graph and keeps every intermediate alive until
    /// the output is dropped.
    pub fn frozen(&self, device: &Device) -> Result<UNetPlusPlus, CheckpointError> {
        let tensors = crate::models::plain_tensors(&self.map);
        Ok(UNetPlusPlus::new(
            &self.meta.model,
            VarBuilder::from_tensors(tensors, DType::F32, device),
        )?)
    }
}

pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel, CheckpointError> {
    let meta = load_meta(path)?;
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, device);
    let model = UNetPlusPlus::new(&meta.model, vb)?;
    load_into(&map, path, meta.model.base)?;
    Ok(LoadedModel { model, map, meta })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::unetpp::InferenceMode;

    #[test]
    fn other_files_say_what_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let empty = dir.path().join("empty.safetensors");
        std::fs::write(&empty, b"").unwrap();
        let Err(e) = load_model(&empty, &dev) else {
            panic!("loaded an empty file")
        };
        assert!(e.to_string().contains("empty file (0 bytes)"), "{e}");
        let sam = dir.path().join("sam.safetensors");
        let t = HashMap::from([(
            "image_encoder.neck.0.weight".to_string(),
            Tensor::zeros((2, 2), DType::F32, &dev).unwrap(),
        )]);
        candle_core::safetensors::save(&t, &sam).unwrap();
        let Err(e) = load_model(&sam, &dev) else {
            panic!("loaded a SAM checkpoint")
        };
        assert!(e.to_string().contains("this is a SAM checkpoint"), "{e}");
        let other = dir.path().join("random.bin");
        std::fs::write(&other, b"not a checkpoint at all").unwrap();
        let Err(e) = load_model(&other, &dev) else {
            panic!("loaded random bytes")
        };
        let e = e.to_string();
        assert!(
            e.contains("random.bin") && e.contains("not a medmine U-Net++"),
            "{e}"
        );
    }

    #[test]
    fn non_finite_weights_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let path = fresh_checkpoint(dir.path(), 2, 32, 0, &dev).unwrap();
        let mut t = load_tensors(&path, &dev).unwrap();
        let name = t.keys().find(|k| k.ends_with("weight")).unwrap().clone();
        let w = &t[&name];
        let mut v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        v[0] = f32::NAN;
        v[1] = f32::INFINITY;
        t.insert(name.clone(), Tensor::from_vec(v, w.shape(), &dev).unwrap());
        save_tensors(&t, &path).unwrap();
        let Err(e) = load_model(&path, &dev) else {
            panic!("NaN weights were loaded");
        };
        let e = e.to_string();
        assert!(
            e.contains(&name) && e.contains("2 NaN or infinite") && e.contains(".safetensors"),
            "{e}"
        );
    }

    #[test]
    fn frozen_model_gives_the_same_output_without_a_graph() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let path = fresh_checkpoint(dir.path(), 2, 32, 0, &dev).unwrap();
        let loaded = load_model(&path, &dev).unwrap();
        let frozen = loaded.frozen(&dev).unwrap();
        let x = candle_core::Tensor::rand(0f32, 1., (2, 3, 32, 32), &dev).unwrap();
        let a = loaded.model.infer(&x, InferenceMode::Accurate).unwrap();
        let b = frozen.infer(&x, InferenceMode::Accurate).unwrap();
        // through Vars every op records its inputs; the frozen copy records nothing
        assert!(a.track_op());
        assert!(!b.track_op());
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        assert_eq!(d.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
