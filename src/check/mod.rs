//! `medmine check`: does this device compute what the CPU computes? One prepared run that a
//! user with a new GPU (or a session lent one) starts to trust it before training on it:
//! * U-Net++: the whole model's gradients against central finite differences (f64), the
//!   train-mode loss and every parameter's gradient, inference, and a short training run's
//!   loss curve against the CPU's fast path, and an overfit run that must reach a Dice;
//! * SAM (with the parity fixtures of `tests/fixtures`, made by the official PyTorch code):
//!   the image embedding, low-resolution logits, IoU predictions and masks of both fixture
//!   models (vit_b-style and vit_t) against the official outputs;
//! * MedSAM and LiteMedSAM (fixtures of bowang-lab's inference scripts): embeddings,
//!   low-resolution logits and masks of a portrait and a landscape image.
//!
//! "Tested" is the chosen device; on the CPU it is the device-generic op path (exactly the
//! code a CUDA or Metal tensor takes), so `medmine check --device cpu` proves the generic
//! path against the fast one on any machine.
pub mod medsam;
pub mod sam;
pub mod unetpp;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Sam(#[from] crate::models::sam::SamError),
    #[error("{}: {reason}", .path.display())]
    Fixture { path: PathBuf, reason: String },
}

/// One check's outcome: `value` must be finite and at most `limit`.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckRow {
    pub name: String,
    /// What `value` measures, e.g. "max rel. diff".
    pub measure: &'static str,
    pub value: f64,
    pub limit: f64,
    pub seconds: f64,
    /// Where the value came from (e.g. the parameter with the largest difference); may be empty.
    pub note: String,
}

impl CheckRow {
    pub fn passed(&self) -> bool {
        self.value.is_finite() && self.value <= self.limit
    }
}

/// What to check.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// The parity fixtures folder (`tests/fixtures`: `sam/` and `sam_vit_t/`); `None` skips
    /// the SAM checks.
    pub fixtures: Option<PathBuf>,
    /// Training steps of the overfit run (0: [`unetpp::DEFAULT_OVERFIT_STEPS`]).
    pub overfit_steps: usize,
}

/// Runs `f` the way the tested side runs: on `device`, with the generic op path forced where
/// `device` is the CPU.
pub fn on_tested<T>(device: &Device, f: impl FnOnce(&Device) -> T) -> T {
    let _generic = device.is_cpu().then(crate::ops::force_generic);
    f(device)
}

/// What the tested side is, for the report's first line.
pub fn tested_name(device: &Device) -> String {
    if device.is_cpu() {
        "the CPU's device-generic op path (what CUDA and Metal tensors take)".into()
    } else {
        format!("{device:?}")
    }
}

/// Runs every check, calling `report` after each; returns the rows.
pub fn run_checks(
    device: &Device,
    opts: &CheckOptions,
    report: &mut dyn FnMut(&CheckRow),
) -> Result<Vec<CheckRow>, CheckError> {
    let mut rows = Vec::new();
    let mut push = |row: CheckRow, rows: &mut Vec<CheckRow>| {
        report(&row);
        rows.push(row);
    };
    type Check = fn(&Device, &CheckOptions) -> Result<Vec<CheckRow>, CheckError>;
    let checks: [Check; 3] = [unetpp::checks, sam::checks, medsam::checks];
    for check in checks {
        for row in check(device, opts)? {
            push(row, &mut rows);
        }
    }
    Ok(rows)
}

/// Times `f` and makes its row.
pub(crate) fn timed(
    name: impl Into<String>,
    measure: &'static str,
    limit: f64,
    f: impl FnOnce() -> Result<f64, CheckError>,
) -> Result<CheckRow, CheckError> {
    let start = Instant::now();
    let value = f()?;
    Ok(CheckRow {
        name: name.into(),
        measure,
        value,
        limit,
        seconds: start.elapsed().as_secs_f64(),
        note: String::new(),
    })
}

/// `max |a - b|` over all elements (any devices, any float dtype; shapes must agree).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64, CheckError> {
    if a.dims() != b.dims() {
        return Err(candle_core::Error::Msg(format!(
            "shapes differ: {:?} vs {:?}",
            a.dims(),
            b.dims()
        ))
        .into());
    }
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// `max |t|`.
pub fn max_abs(t: &Tensor) -> Result<f64, CheckError> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// The rows as a Markdown table, with a last line that says whether all passed.
pub fn table(rows: &[CheckRow]) -> String {
    let mut s = String::from(
        "| check | measure | value | limit | s | result |\n|---|---|---:|---:|---:|---|\n",
    );
    for r in rows {
        let note = if r.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.note)
        };
        s.push_str(&format!(
            "| {}{note} | {} | {:.3e} | {:.1e} | {:.1} | {} |\n",
            r.name,
            r.measure,
            r.value,
            r.limit,
            r.seconds,
            if r.passed() { "pass" } else { "FAIL" }
        ));
    }
    let failed = rows.iter().filter(|r| !r.passed()).count();
    s.push_str(&format!(
        "\n{} of {} checks passed\n",
        rows.len() - failed,
        rows.len()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_pass_only_when_finite_and_within_the_limit() {
        let row = |value: f64| CheckRow {
            name: "x".into(),
            measure: "max abs. diff",
            value,
            limit: 1e-3,
            seconds: 0.0,
            note: String::new(),
        };
        assert!(row(1e-4).passed() && row(1e-3).passed());
        assert!(!row(2e-3).passed() && !row(f64::NAN).passed() && !row(f64::INFINITY).passed());
        let mut noted = row(f64::NAN);
        noted.note = "largest: w".into();
        let t = table(&[row(1e-4), noted]);
        assert!(t.contains("| x (largest: w) | max abs. diff |"), "{t}");
        assert!(t.contains("| pass |") && t.contains("| FAIL |"), "{t}");
        assert!(t.ends_with("1 of 2 checks passed\n"), "{t}");
    }

    #[test]
    fn diffs_across_dtypes() {
        let a = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f64, 2.5, 2.75], &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.5);
        assert_eq!(max_abs(&b).unwrap(), 2.75);
        let c = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
        assert!(max_abs_diff(&a, &c).is_err());
    }
}
