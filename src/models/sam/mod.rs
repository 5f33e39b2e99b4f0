//! Segment Anything (SAM, Kirillov et al. 2023) and MobileSAM in candle, loading the official
//! checkpoints (`.pth` state dicts or `.safetensors`, keys exactly as Meta's / MobileSAM's).
//!
//! The ViT image encoder (ViT-B/L/H, `vit.rs`: attention over blocks of query rows), MobileSAM's
//! TinyViT, the prompt encoder (points, boxes, mask input) and the mask decoder are our own
//! (candle-transformers' crash on boxes, use the tanh GELU where SAM uses the exact one, have only
//! the TinyViT-5M size and hold whole 4096x4096 attention matrices), and so is the decoder's
//! two-way transformer (`two_way.rs`: reassociated for a few prompt tokens).
//! `tests/it/sam_parity.rs` checks all of it against the official PyTorch code.
pub mod bench;
pub mod cache;
pub mod checkpoint;
pub mod cv_area;
mod image_to_tokens;
mod linear;
pub mod mask_decoder;
mod neck;
pub mod postprocess;
pub mod predictor;
pub mod preprocess;
pub mod prompt_encoder;
pub mod rules;
pub mod segment;
pub mod skimage;
pub mod tiny_vit;
mod tokens_to_image;
pub mod two_way;
mod upscaling;
pub mod vit;

use std::path::PathBuf;

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use cache::{CacheStats, EmbeddingCache, PrecomputeReport};
pub use checkpoint::{detect_config, load_sam};
pub use mask_decoder::MaskDecoder;
pub use predictor::{Embedding, Prediction, Prompt, SamPredictor};
pub use prompt_encoder::PromptEncoder;
pub use rules::InputRules;
pub use segment::{segment, SegmentReport, SegmentRequest};
pub use tiny_vit::TinyVitConfig;

/// Side of the square the encoder sees.
pub const IMAGE_SIZE: usize = 1024;
/// ViT patch size (the encoder output is `IMAGE_SIZE / PATCH_SIZE` square).
pub const PATCH_SIZE: usize = 16;
/// Side of the image embedding grid.
pub const EMBED_SIZE: usize = IMAGE_SIZE / PATCH_SIZE;
/// Side of the decoder's low-resolution masks (and of `mask_input`).
pub const LOW_RES_SIZE: usize = 4 * EMBED_SIZE;

/// Errors of SAM loading and prediction; each names the file or the prompt at fault.
#[derive(Debug, thiserror::Error)]
pub enum SamError {
    #[error("{path}: cannot read the checkpoint ({reason}); is it a complete download?")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path}: expected a SAM checkpoint (image_encoder.*, prompt_encoder.*, mask_decoder.* tensors), found {found}")]
    NotSam { path: PathBuf, found: String },
    #[error("{path}: the checkpoint does not match SAM {variant}: {source}")]
    Mismatch {
        path: PathBuf,
        variant: String,
        source: Box<candle_core::Error>,
    },
    #[error(
        "{path}: tensor {tensor} holds {count} NaN or infinite values; the checkpoint cannot be \
         used (download it again, or use another checkpoint)"
    )]
    NonFinite {
        path: PathBuf,
        tensor: String,
        count: usize,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A model output with NaN or infinite values (the bench checks its embedding and masks).
    #[error(
        "the {what} holds {count} NaN or infinite values of {total}: the weights or the \
         kernels are broken, and a time measured on them means nothing"
    )]
    NonFiniteOutput {
        what: String,
        count: usize,
        total: usize,
    },
    #[error("{path}: --sam-variant {asked} does not fit this checkpoint, which is {found}")]
    WrongVariant {
        path: PathBuf,
        asked: String,
        found: String,
    },
    #[error(
        "{path}: the name says MedSAM, but MedSAM and SAM vit_b have identical tensors and need \
         different pre- and postprocessing, so `auto` cannot choose: pass --sam-variant medsam \
         (or vit_b to run it the SAM way on purpose)"
    )]
    Ambiguous { path: PathBuf },
    /// An image the data layer could not decode (the message names the file).
    #[error(transparent)]
    Image(Box<crate::data::DataError>),
    #[error(
        "unknown SAM variant `{0}` (expected auto, vit_b, vit_l, vit_h, vit_t, medsam or \
         litemedsam)"
    )]
    UnknownVariant(String),
    #[error("invalid prompt: {0}")]
    Prompt(String),
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
}

impl From<candle_core::Error> for SamError {
    fn from(e: candle_core::Error) -> Self {
        SamError::Candle(Box::new(e))
    }
}

impl From<crate::data::DataError> for SamError {
    fn from(e: crate::data::DataError) -> Self {
        SamError::Image(Box::new(e))
    }
}

pub type Result<T> = std::result::Result<T, SamError>;

/// The official model variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    VitB,
    VitL,
    VitH,
    /// MobileSAM (TinyViT-5M encoder).
    VitT,
    /// MedSAM (bowang-lab): SAM ViT-B fine-tuned on medical images, with its own pre- and
    /// postprocessing ([`InputRules::MedSam`]). Its tensors are exactly SAM vit_b's, so a
    /// checkpoint cannot tell: this variant must be asked for.
    MedSam,
    /// LiteMedSAM: a TinyViT at 256 px distilled from MedSAM ([`InputRules::LiteMedSam`]).
    LiteMedSam,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::VitB => "vit_b",
            Variant::VitL => "vit_l",
            Variant::VitH => "vit_h",
            Variant::VitT => "vit_t",
            Variant::MedSam => "medsam",
            Variant::LiteMedSam => "litemedsam",
        }
    }

    /// Every variant, in the order the CLI help lists them.
    pub const ALL: [Variant; 6] = [
        Variant::VitB,
        Variant::VitL,
        Variant::VitH,
        Variant::VitT,
        Variant::MedSam,
        Variant::LiteMedSam,
    ];

    /// The variant a file's name asks for where its tensors cannot tell: `medsam` for a name
    /// containing `medsam` but not `lite` (`medsam_vit_b.pth`), else `None` (detect). The app
    /// uses this where the command line has `--sam-variant`; detection refuses such a file.
    pub fn from_file_name(path: &std::path::Path) -> Option<Variant> {
        checkpoint::named_medsam(path).then_some(Variant::MedSam)
    }

    /// `auto` gives `None` (detect from the checkpoint's keys).
    pub fn parse(s: &str) -> Result<Option<Variant>> {
        Ok(Some(match s {
            "auto" => return Ok(None),
            "vit_b" => Variant::VitB,
            "vit_l" => Variant::VitL,
            "vit_h" => Variant::VitH,
            "vit_t" => Variant::VitT,
            "medsam" => Variant::MedSam,
            "litemedsam" => Variant::LiteMedSam,
            other => return Err(SamError::UnknownVariant(other.to_string())),
        }))
    }
}

/// The image encoder's architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EncoderConfig {
    /// SAM's ViT (`ImageEncoderViT`, patch 16, relative positions, absolute `pos_embed`).
    Vit {
        embed_dim: usize,
        depth: usize,
        num_heads: usize,
        global_attn_indexes: Vec<usize>,
        window_size: usize,
    },
    /// MobileSAM's TinyViT (TinyViT-5M in the official model).
    TinyVit(TinyVitConfig),
}

/// Every size of a SAM; the official variants are presets, and [`detect_config`] reads any
/// (e.g. the small parity fixtures) from a checkpoint's tensor shapes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub encoder: EncoderConfig,
    /// Channels of the image embedding and the prompt tokens (256 in the official models).
    pub prompt_embed_dim: usize,
    pub mask_in_chans: usize,
    pub decoder_mlp_dim: usize,
    pub decoder_num_heads: usize,
    pub iou_head_hidden_dim: usize,
    /// Whose pre- and postprocessing (SAM's, MedSAM's, LiteMedSAM's).
    pub rules: InputRules,
}

impl Config {
    fn vit(embed_dim: usize, depth: usize, num_heads: usize, global: [usize; 4]) -> Config {
        Config {
            encoder: EncoderConfig::Vit {
                embed_dim,
                depth,
                num_heads,
                global_attn_indexes: global.to_vec(),
                window_size: 14,
            },
            ..Config::vit_t()
        }
    }

    pub fn vit_b() -> Config {
        Config::vit(768, 12, 12, [2, 5, 8, 11])
    }

    pub fn vit_l() -> Config {
        Config::vit(1024, 24, 16, [5, 11, 17, 23])
    }

    pub fn vit_h() -> Config {
        Config::vit(1280, 32, 16, [7, 15, 23, 31])
    }

    pub fn vit_t() -> Config {
        Config {
            encoder: EncoderConfig::TinyVit(TinyVitConfig::mobile_sam()),
            prompt_embed_dim: 256,
            mask_in_chans: 16,
            decoder_mlp_dim: 2048,
            decoder_num_heads: 8,
            iou_head_hidden_dim: 256,
            rules: InputRules::Sam,
        }
    }

    /// MedSAM: SAM vit_b's sizes with MedSAM's rules.
    pub fn medsam() -> Config {
        Config {
            rules: InputRules::MedSam,
            ..Config::vit_b()
        }
    }

    /// LiteMedSAM (`CVPR24_LiteMedSAM_infer.py`): TinyViT-5M's widths with a 1x1 patch
    /// embedding at 256 px, SAM's prompt encoder and decoder sizes.
    pub fn lite_medsam() -> Config {
        Config {
            encoder: EncoderConfig::TinyVit(TinyVitConfig::lite_medsam()),
            rules: InputRules::LiteMedSam,
            ..Config::vit_t()
        }
    }

    /// Side of the square the encoder sees (1024, LiteMedSAM 256).
    pub fn image_size(&self) -> usize {
        self.rules.image_size()
    }

    pub fn of_variant(v: Variant) -> Config {
        match v {
            Variant::VitB => Config::vit_b(),
            Variant::VitL => Config::vit_l(),
            Variant::VitH => Config::vit_h(),
            Variant::VitT => Config::vit_t(),
            Variant::MedSam => Config::medsam(),
            Variant::LiteMedSam => Config::lite_medsam(),
        }
    }

    /// The official variant with exactly these sizes, if any.
    pub fn variant(&self) -> Option<Variant> {
        Variant::ALL
            .into_iter()
            .find(|v| Config::of_variant(*v) == *self)
    }

    /// `vit_b` … or `custom` (e.g. the test fixtures).
    pub fn name(&self) -> &'static str {
        self.variant().map_or("custom", Variant::name)
    }
}

enum ImageEncoder {
    Vit(Box<vit::ImageEncoderViT>),
    Tiny(Box<tiny_vit::TinyViT>),
}

/// A whole SAM: image encoder, prompt encoder, mask decoder (`Sam` in the official code).
pub struct Sam {
    cfg: Config,
    image_encoder: ImageEncoder,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
    device: Device,
}

impl Sam {
    /// Builds the model from `vb` with the official key names (`image_encoder.*`, …).
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Sam> {
        let vb_e = vb.pp("image_encoder");
        let image_encoder = match &cfg.encoder {
            EncoderConfig::Vit {
                embed_dim,
                depth,
                num_heads,
                global_attn_indexes,
                window_size,
            } => ImageEncoder::Vit(Box::new(vit::ImageEncoderViT::new(
                &vit::VitConfig {
                    embed_dim: *embed_dim,
                    depth: *depth,
                    num_heads: *num_heads,
                    global_attn_indexes: global_attn_indexes.clone(),
                    window_size: *window_size,
                    out_chans: cfg.prompt_embed_dim,
                },
                vb_e,
            )?)),
            EncoderConfig::TinyVit(c) => ImageEncoder::Tiny(Box::new(tiny_vit::TinyViT::new(
                c,
                cfg.prompt_embed_dim,
                cfg.image_size(),
                vb_e,
            )?)),
        };
        let prompt_encoder = PromptEncoder::new(
            cfg.prompt_embed_dim,
            cfg.mask_in_chans,
            cfg.image_size(),
            vb.pp("prompt_encoder"),
        )?;
        let mask_decoder = MaskDecoder::new(cfg, vb.pp("mask_decoder"))?;
        Ok(Sam {
            cfg: cfg.clone(),
            image_encoder,
            prompt_encoder,
            mask_decoder,
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The image encoder on a preprocessed input.
    /// `[1, 3, S, S]` (S = [`Config::image_size`], normalised, padded) -> `[1, C, 64, 64]`.
    pub fn embed(&self, input: &Tensor) -> candle_core::Result<Tensor> {
        match &self.image_encoder {
            ImageEncoder::Vit(e) => e.forward(input),
            ImageEncoder::Tiny(e) => e.forward(input),
        }
    }
}
