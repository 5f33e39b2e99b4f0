//! medmine: semi-supervised medical image segmentation by knowledge mining from a large model.
//!
//! The library is the whole pipeline; the `medmine` CLI (and later the GUI) is a view onto it.
//! Imports run downward: `cli` -> `train`/`predict`/`bench` -> `models` -> `ops`; `data`,
//! `metrics`, `device`, `progress` are leaves.
pub mod bench;
pub mod check;
pub mod cli;
pub mod data;
pub mod device;
pub mod evaluate;
pub mod fsutil;
#[cfg(feature = "gui")]
pub mod gui;
pub mod metrics;
pub mod mining;
pub mod models;
pub mod ops;
pub mod predict;
pub mod progress;
pub mod prompts;
pub mod store;
pub mod train;
pub mod weights;
