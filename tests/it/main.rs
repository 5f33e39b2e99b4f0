//! All integration tests in one binary: one link of the crate and its GUI dependencies instead
//! of one per file (CI disk space and build time). Each file is a module; run one with
//! `cargo test --test it sam_parity::`.

mod common;

mod bad_input;
mod cli;
mod cluster_examples;
mod data_dicom;
mod data_loader;
mod experiment;
mod finetune;
mod generic_bench;
mod generic_ops;
mod gradcheck;
mod gui;
mod gui_e2e;
mod gui_project;
mod gui_radiologist;
mod gui_thread;
mod gui_weights;
mod medsam_parity;
mod mining;
mod mining_shards;
mod sam_batch;
mod sam_bench;
mod sam_cache;
mod sam_parity;
mod sam_parity_vit_t;
mod sam_segment;
mod shaders;
mod store_cas;
mod store_cli;
mod store_project;
mod store_queue;
mod store_race;
mod train;
mod weights;
