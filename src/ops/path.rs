//! Which code an op runs: the CPU fast path (our kernels, for CPU tensors) or the
//! device-generic path (candle's own ops: exactly what a CUDA or Metal tensor takes).
//!
//! `MEDMINE_OPS=generic` forces the generic path for the whole process (CI runs the gradient
//! check, the overfit test and the SAM parity suites that way); [`force_generic`] forces it
//! for the calling thread while its guard lives (tests that compare both paths in one
//! process). Every op asks [`fast`] once, at its public entry; an op built for the fast path
//! never sees a tensor of another device.
use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::Tensor;

/// The environment variable that chooses the op path: `generic` or `fast` (the default).
pub const OPS_ENV: &str = "MEDMINE_OPS";

fn env_generic() -> bool {
    static GENERIC: OnceLock<bool> = OnceLock::new();
    *GENERIC.get_or_init(|| {
        std::env::var(OPS_ENV).is_ok_and(|v| v.trim().eq_ignore_ascii_case("generic"))
    })
}

thread_local! {
    static THREAD_GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread takes the device-generic path even for CPU tensors.
pub fn generic_forced() -> bool {
    env_generic() || THREAD_GENERIC.with(Cell::get)
}

/// Whether `t` takes the CPU fast path: a CPU tensor, and the generic path not forced.
pub fn fast(t: &Tensor) -> bool {
    t.device().is_cpu() && !generic_forced()
}

/// The path CPU tensors take now, for the line that names the device: `fast` or `generic`.
pub fn path_name() -> &'static str {
    if generic_forced() {
        "generic"
    } else {
        "fast"
    }
}

/// Forces the generic path on this thread until the guard is dropped.
#[must_use = "the generic path is forced only while the guard lives"]
pub fn force_generic() -> GenericGuard {
    let before = THREAD_GENERIC.with(|c| c.replace(true));
    GenericGuard { before }
}

pub struct GenericGuard {
    before: bool,
}

impl Drop for GenericGuard {
    fn drop(&mut self) {
        THREAD_GENERIC.with(|c| c.set(self.before));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_forces_the_generic_path_on_its_thread_only() {
        let t = Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        if env_generic() {
            assert!(!fast(&t));
            return;
        }
        assert!(fast(&t));
        {
            let _g = force_generic();
            assert!(!fast(&t));
            assert_eq!(path_name(), "generic");
            let other = std::thread::spawn(move || fast(&t)).join().unwrap();
            assert!(other, "other threads keep the fast path");
            let t2 = Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
            {
                let _nested = force_generic();
                assert!(!fast(&t2));
            }
            assert!(!fast(&t2), "the outer guard still holds");
        }
        let t = Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(fast(&t));
        assert_eq!(path_name(), "fast");
    }
}
