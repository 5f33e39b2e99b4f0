//! `medmine bench sam`: times the image encoder (`set_image`: preprocessing + encoder on the
//! 1024x1024 input) and the decoder per prompt (`predict`: prompt encoder, mask decoder and
//! upscaling of the masks to the original size), for a checkpoint or for seeded random weights
//! of a variant. `scripts/bench_sam_torch.py` does the same with the official PyTorch code.
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::distributions::{Distribution, Uniform};
use rand::SeedableRng;

use super::{load_sam, Config, Prompt, Result, Sam, SamError, SamPredictor, Variant, LOW_RES_SIZE};

/// What to benchmark.
#[derive(Clone, Debug)]
pub struct SamBenchOptions {
    /// The variant of the random weights; with `checkpoint`, forces it (`None`: detect).
    pub variant: Option<Variant>,
    /// An official checkpoint; `None`: seeded random weights of `variant` (vit_b if unset).
    pub checkpoint: Option<PathBuf>,
    /// An image; `None`: a synthetic 1024x1024 RGB image (no resize, masks upscaled to 1024^2).
    pub image: Option<PathBuf>,
    /// Timed encoder runs (no warm-up: one ViT-B run is many seconds).
    pub runs: usize,
    /// Timed decoder runs, after one warm-up, with the prompts of `clicks`;
    /// `multimask_output=True` as the official predictor's default (MedSAM / LiteMedSAM: one
    /// mask each, as their official scripts).
    pub decoder_runs: usize,
    /// The prompts of the decoder runs.
    pub clicks: ClickKind,
    /// Seed of the random weights.
    pub seed: u64,
}

impl Default for SamBenchOptions {
    fn default() -> Self {
        Self {
            variant: None,
            checkpoint: None,
            image: None,
            runs: 3,
            decoder_runs: 20,
            clicks: ClickKind::Alternate,
            seed: 0,
        }
    }
}

/// Which prompts the timed decoder runs use (`scripts/bench_sam_ort.py --clicks` has the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClickKind {
    /// A box and a point, alternating (MedSAM / LiteMedSAM: two boxes).
    Alternate,
    /// The box `[0.25 w, 0.25 h, 0.7 w, 0.75 h]` every time.
    Box,
    /// That box plus a positive point at (0.5 w, 0.5 h) and a negative one at (0.3 w, 0.3 h).
    BoxPoints,
}

impl ClickKind {
    /// `alternate` | `box` | `box-points`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "alternate" => Ok(Self::Alternate),
            "box" => Ok(Self::Box),
            "box-points" => Ok(Self::BoxPoints),
            other => Err(SamError::Prompt(format!(
                "unknown click kind {other:?} (alternate, box or box-points)"
            ))),
        }
    }

    /// The prompts, cycled over the runs, for an image of `w` x `h`.
    fn prompts(self, w: f32, h: f32, box_only: bool) -> Result<Vec<Prompt>> {
        let bbox = Some([0.25 * w, 0.25 * h, 0.7 * w, 0.75 * h]);
        let boxed = Prompt {
            bbox,
            ..Default::default()
        };
        Ok(match self {
            Self::Alternate => {
                let second = if box_only {
                    Prompt {
                        bbox: Some([0.4 * w, 0.3 * h, 0.6 * w, 0.6 * h]),
                        ..Default::default()
                    }
                } else {
                    Prompt {
                        points: vec![(0.5 * w, 0.5 * h, 1)],
                        ..Default::default()
                    }
                };
                vec![boxed, second]
            }
            Self::Box => vec![boxed],
            Self::BoxPoints if box_only => {
                return Err(SamError::Prompt(
                    "this variant takes boxes only (no box-points clicks)".into(),
                ))
            }
            Self::BoxPoints => vec![Prompt {
                bbox,
                points: vec![(0.5 * w, 0.5 * h, 1), (0.3 * w, 0.3 * h, 0)],
                ..Default::default()
            }],
        })
    }
}

/// Timings of one bench.
#[derive(Clone, Debug)]
pub struct SamBenchReport {
    /// `vit_b`, `vit_t`, … (`custom` for other sizes).
    pub variant: String,
    pub random_weights: bool,
    /// (H, W) of the image.
    pub image_size: (usize, usize),
    /// Seconds per `set_image`.
    pub encoder_s: Vec<f64>,
    /// Milliseconds per `predict` (incl. upscaling to the original size).
    pub decoder_ms: Vec<f64>,
    /// Milliseconds of the upscaling alone (the variant's postprocessing of the M low-res masks
    /// to the original size, on the host), one per decoder run: part of `decoder_ms`.
    pub upscale_ms: Vec<f64>,
    /// Peak resident memory of the process (Linux `VmHWM`), MiB.
    pub peak_rss_mib: Option<f64>,
}

/// Median (the machine may be shared: robust to a stray slow run).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

impl SamBenchReport {
    pub fn encoder_median_s(&self) -> f64 {
        median(&self.encoder_s)
    }

    pub fn decoder_median_ms(&self) -> f64 {
        median(&self.decoder_ms)
    }

    /// The last two lines the torch script prints too: `encoder_s <f>` and `decoder_ms <f>`.
    pub fn summary_lines(&self) -> [String; 2] {
        [
            format!("encoder_s {:.4}", self.encoder_median_s()),
            format!("decoder_ms {:.3}", self.decoder_median_ms()),
        ]
    }

    /// One line in issue 3's CLI contract: `encoder_ms <f> decoder_ms <f>`.
    pub fn contract_line(&self) -> String {
        format!(
            "encoder_ms {:.1} decoder_ms {:.3}",
            1e3 * self.encoder_median_s(),
            self.decoder_median_ms()
        )
    }
}

/// A SAM of `cfg` with seeded random weights (same seed, same weights): weights uniform in
/// ±1/sqrt(fan_in) (PyTorch's default Linear/Conv bound), position embeddings and tokens with
/// std 0.02, norms' weights 1, biases 0, and BatchNorm running statistics shaped like a
/// trained checkpoint's (TinyViT's `Conv2d_BN`: `running_var` uniform in [0.5, 1.5], positive
/// as a variance is; `running_mean` uniform in ±0.1). For timing; not a model. Every value is
/// finite, so the folded weights and the outputs are too.
pub fn random_sam(cfg: &Config, seed: u64, device: &Device) -> Result<Sam> {
    let varmap = VarMap::new();
    // a first build only creates the variables (names, shapes)
    Sam::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for name in names {
        let var = &vars[name];
        let dims = var.dims().to_vec();
        let is_norm = dims.len() == 1 && name.ends_with("weight");
        let value = if name.ends_with("running_var") {
            uniform(&mut rng, 0.5, 1.5, &dims, device)?
        } else if name.ends_with("running_mean") {
            uniform(&mut rng, -0.1, 0.1, &dims, device)?
        } else if name.ends_with("bias") {
            Tensor::zeros(dims.as_slice(), DType::F32, device)?
        } else if is_norm {
            Tensor::ones(dims.as_slice(), DType::F32, device)?
        } else {
            let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
            let b = if dims.len() >= 2 && !name.contains("pos") {
                (1.0 / fan_in as f32).sqrt()
            } else {
                0.02 * 3f32.sqrt() // position embeddings, tokens: std 0.02
            };
            uniform(&mut rng, -b, b, &dims, device)?
        };
        var.set(&value)?;
    }
    // The model proper reads the seeded values as plain tensors, like a loaded checkpoint: what
    // it derives at load time (BatchNorm folded into convolutions, cached positional encodings,
    // transposed weights) must see them, and `Var`s would make every forward pass record its
    // graph (all intermediates kept alive: vit_b's encoder grew to 8 GB that way).
    drop(vars);
    let tensors = crate::models::plain_tensors(&varmap);
    Ok(Sam::new(
        cfg,
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )?)
}

/// A tensor of `dims` with values drawn uniformly from [lo, hi].
fn uniform(
    rng: &mut rand_chacha::ChaCha8Rng,
    lo: f32,
    hi: f32,
    dims: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let u = Uniform::new_inclusive(lo, hi);
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| u.sample(rng)).collect();
    Ok(Tensor::from_vec(v, dims, device)?)
}

/// A smooth synthetic RGB image (no file needed).
fn synthetic_image(h: u32, w: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let r = (255 * x / w.max(1)) as u8;
        let g = (255 * y / h.max(1)) as u8;
        let b = ((x / 32 + y / 32) % 2 * 200) as u8;
        image::Rgb([r, g, b])
    })
}

/// Runs the bench; `log` gets one line per run (`encoder run 1: 11.234 s`, …).
pub fn bench_sam(
    opts: &SamBenchOptions,
    device: &Device,
    log: &mut dyn FnMut(String),
) -> Result<SamBenchReport> {
    let t = Instant::now();
    let (sam, random_weights) = match &opts.checkpoint {
        Some(p) => (load_sam(p, opts.variant, device)?, false),
        None => {
            let cfg = Config::of_variant(opts.variant.unwrap_or(Variant::VitB));
            (random_sam(&cfg, opts.seed, device)?, true)
        }
    };
    let variant = sam.config().name().to_string();
    log(format!(
        "sam {variant} ({}) on {device:?}: built in {:.2} s",
        if random_weights {
            format!("random weights, seed {}", opts.seed)
        } else {
            "checkpoint".to_string()
        },
        t.elapsed().as_secs_f64()
    ));
    let image = match &opts.image {
        Some(p) => image::open(p)
            .map_err(|e| SamError::File {
                path: p.clone(),
                reason: e.to_string(),
            })?
            .to_rgb8(),
        None => synthetic_image(1024, 1024),
    };
    let (h, w) = (image.height() as usize, image.width() as usize);
    let predictor = SamPredictor::new(sam);

    let mut encoder_s = Vec::new();
    let mut emb = None;
    for i in 0..opts.runs.max(1) {
        let t = Instant::now();
        let e = predictor.set_image(&image)?;
        e.features.device().synchronize()?;
        let s = t.elapsed().as_secs_f64();
        check_finite("image embedding", &e.features)?;
        log(format!("encoder run {}: {s:.3} s", i + 1));
        encoder_s.push(s);
        emb = Some(e);
    }
    let emb = emb.expect("at least one encoder run");

    let (fw, fh) = (w as f32, h as f32);
    let rules = predictor.sam.config().rules;
    let prompts = opts.clicks.prompts(fw, fh, rules.box_only())?;
    let multimask = !rules.box_only();
    predictor.predict(&emb, &prompts[0], multimask)?; // warm-up
    let mut decoder_ms = Vec::new();
    let mut upscale_ms = Vec::new();
    for i in 0..opts.decoder_runs.max(1) {
        let t = Instant::now();
        let pred = predictor.predict(&emb, &prompts[i % prompts.len()], multimask)?;
        pred.masks.device().synchronize()?;
        let ms = 1e3 * t.elapsed().as_secs_f64();
        check_finite("mask logits (upscaled)", &pred.logits)?;
        let low: Vec<f32> = pred.low_res_logits.flatten_all()?.to_vec1()?;
        check_finite_values("low-res mask logits", &low)?;
        let t = Instant::now();
        for plane in low.chunks_exact(LOW_RES_SIZE * LOW_RES_SIZE) {
            std::hint::black_box(rules.postprocess(plane, emb.input_size, emb.original_size));
        }
        let up = 1e3 * t.elapsed().as_secs_f64();
        log(format!(
            "decoder run {}: {ms:.2} ms (upscaling {up:.2} ms)",
            i + 1
        ));
        decoder_ms.push(ms);
        upscale_ms.push(up);
    }
    Ok(SamBenchReport {
        variant,
        random_weights,
        image_size: (h, w),
        encoder_s,
        decoder_ms,
        upscale_ms,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Fails with [`SamError::NonFiniteOutput`] unless every value of `t` is finite.
pub fn check_finite(what: &str, t: &Tensor) -> Result<()> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    check_finite_values(what, &v)
}

fn check_finite_values(what: &str, v: &[f32]) -> Result<()> {
    let count = v.iter().filter(|x| !x.is_finite()).count();
    if count == 0 {
        Ok(())
    } else {
        Err(SamError::NonFiniteOutput {
            what: what.to_string(),
            count,
            total: v.len(),
        })
    }
}

/// `VmHWM` of `/proc/self/status`, MiB (None off Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
