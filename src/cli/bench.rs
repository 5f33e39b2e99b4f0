//! `medmine bench train|infer|sam`: the speed of the pipeline, with the last lines that the
//! PyTorch reference scripts print too (`images_per_s`, `encoder_ms … decoder_ms …`).
use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Full U-Net++ training steps on random data; last line `images_per_s <float>`.
    Train {
        #[arg(long, default_value_t = 128)]
        size: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 32)]
        base: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// U-Net++ inference (eval mode, mean of the heads) on random data; last line
    /// `images_per_s <float>`.
    Infer {
        #[arg(long, default_value_t = 256)]
        size: usize,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 32)]
        base: usize,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// SAM image encoder and per-prompt decoder timing; last line `encoder_ms <f> decoder_ms <f>`.
    /// Without --sam, seeded random weights of the variant (runs anywhere).
    Sam {
        #[arg(long)]
        sam: Option<PathBuf>,
        /// vit_b | vit_l | vit_h | vit_t | medsam | litemedsam (with --sam: auto-detected unless
        /// given).
        #[arg(long)]
        variant: Option<String>,
        /// An image (default: a synthetic 1024x1024 one).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Timed encoder runs.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Timed decoder runs (clicks), after one warm-up.
        #[arg(long, default_value_t = 20)]
        clicks: usize,
        /// The clicks' prompts: alternate (a box, then a point), box, or box-points (the box
        /// plus a positive and a negative point).
        #[arg(long, default_value = "alternate")]
        prompts: String,
    },
}

/// Which kernels U-Net++'s convolutions run on the CPU fast path (`extra`: what else).
fn conv_kernels(device: &candle_core::Device, extra: &str) {
    if device.is_cpu() && crate::ops::path_name() == "fast" {
        println!(
            "convolutions: {extra}3x3 with >= 16 input channels (forward, input gradient) by \
             Winograd F(2x2, 3x3), the RGB stem by shifted-plane gemms"
        );
    }
}

pub fn bench_cmd(c: BenchCommand, device: candle_core::Device) -> Result<()> {
    println!("kernels: {}", crate::device::kernels(&device));
    match c {
        BenchCommand::Train {
            size,
            batch,
            base,
            steps,
            warmup,
        } => {
            let b = crate::bench::TrainBench {
                size,
                batch,
                base,
                steps,
                warmup,
                seed: 0,
            };
            println!("bench train: size {size} batch {batch} base {base} steps {steps}");
            conv_kernels(&device, "kernel gradients on im2col tiles; ");
            let ips =
                crate::bench::bench_train(&b, &device, |i, s| println!("step {i}: {s:.3} s"))?;
            println!("images_per_s {ips:.4}");
            Ok(())
        }
        BenchCommand::Infer {
            size,
            batch,
            base,
            steps,
            warmup,
        } => {
            let b = crate::bench::InferBench {
                size,
                batch,
                base,
                steps,
                warmup,
            };
            println!("bench infer: size {size} batch {batch} base {base} steps {steps}");
            conv_kernels(&device, "BatchNorm + ReLU folded in; ");
            let ips =
                crate::bench::bench_infer(&b, &device, |i, s| println!("step {i}: {s:.3} s"))?;
            println!("images_per_s {ips:.4}");
            Ok(())
        }
        BenchCommand::Sam {
            sam,
            variant,
            image,
            runs,
            clicks,
            prompts,
        } => {
            use crate::models::sam::bench::{bench_sam, ClickKind, SamBenchOptions};
            let variant = match variant.as_deref() {
                Some(v) => crate::models::sam::Variant::parse(v)?,
                None => None,
            };
            let opts = SamBenchOptions {
                variant,
                checkpoint: sam,
                image,
                runs: runs.max(1),
                decoder_runs: clicks.max(1),
                clicks: ClickKind::parse(&prompts)?,
                ..Default::default()
            };
            let report = bench_sam(&opts, &device, &mut |line| println!("{line}"))?;
            if let Some(m) = report.peak_rss_mib {
                println!("peak_rss_mib {m:.1}");
            }
            for line in report.summary_lines() {
                println!("{line}");
            }
            println!("{}", report.contract_line());
            Ok(())
        }
    }
}
