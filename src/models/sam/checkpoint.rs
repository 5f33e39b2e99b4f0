//! Reading SAM checkpoints: the variant (and every size) from the tensor shapes, then the
//! weights through candle's `.pth` reader or a memory-mapped `.safetensors`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::{
    Config, EncoderConfig, InputRules, Result, Sam, SamError, TinyVitConfig, Variant, EMBED_SIZE,
};

/// Tensor name -> shape, from either format, without loading the data.
pub fn read_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>> {
    // a missing or unreadable file says so (the OS error), not "cannot read the checkpoint"
    if let Err(e) = std::fs::File::open(path) {
        return Err(SamError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        });
    }
    let unreadable = |e: candle_core::Error| SamError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if is_safetensors(path) {
        // SAFETY: the mapped file is only read; a file changed underneath is a user error.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
            .map_err(unreadable)?;
        Ok(st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect())
    } else {
        let infos =
            candle_core::pickle::read_pth_tensor_info(path, false, None).map_err(unreadable)?;
        Ok(infos
            .into_iter()
            .map(|i| (i.name, i.layout.shape().dims().to_vec()))
            .collect())
    }
}

fn is_safetensors(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// What a non-SAM file looks like, for the error message.
fn describe(shapes: &HashMap<String, Vec<usize>>) -> String {
    let mut names: Vec<&String> = shapes.keys().collect();
    names.sort();
    if names.is_empty() {
        return "no tensors".to_string();
    }
    let kind = if names.iter().any(|n| n.starts_with("conv0_0.")) {
        "a medmine U-Net++ checkpoint: "
    } else {
        ""
    };
    let first: Vec<&str> = names.iter().take(3).map(|s| s.as_str()).collect();
    format!("{kind}{} tensors such as {}", names.len(), first.join(", "))
}

/// Reads every size of the model from the tensor shapes (official variants and small custom
/// configs alike). Decoder heads cannot be seen in the shapes: 8, as in every official model.
///
/// The rules follow from the shapes where they can: a TinyViT with a 1x1 patch embedding is
/// LiteMedSAM (MobileSAM's is 3x3), anything else SAM's. MedSAM has SAM vit_b's tensors to the
/// last shape, so a MedSAM file is read as vit_b here; [`load_sam`] refuses to guess for a
/// file named like one (see there).
pub fn detect_config(path: &Path, shapes: &HashMap<String, Vec<usize>>) -> Result<Config> {
    let not_sam = || SamError::NotSam {
        path: path.to_path_buf(),
        found: describe(shapes),
    };
    let dim = |key: &str, axis: usize| -> Result<usize> {
        shapes
            .get(key)
            .and_then(|s| s.get(axis).copied())
            .ok_or_else(not_sam)
    };
    let prompt_embed_dim = dim("mask_decoder.iou_token.weight", 1)?;
    let mask_in_chans = dim("prompt_encoder.mask_downscaling.3.weight", 0)?;
    let decoder_mlp_dim = dim("mask_decoder.transformer.layers.0.mlp.lin1.weight", 0)?;
    let iou_head_hidden_dim = dim("mask_decoder.iou_prediction_head.layers.0.weight", 0)?;
    let mut rules = InputRules::Sam;
    let encoder = if shapes.contains_key("image_encoder.patch_embed.seq.0.c.weight") {
        let c = detect_tiny_vit(shapes).ok_or_else(not_sam)?;
        if c.patch_embed_kernel == 1 {
            rules = InputRules::LiteMedSam;
        }
        EncoderConfig::TinyVit(c)
    } else {
        let embed_dim = dim("image_encoder.patch_embed.proj.weight", 0)?;
        let mut depth = 0;
        let (mut global, mut window_size, mut head_dim) = (Vec::new(), 0, 0);
        while let Some(rel) = shapes.get(&format!("image_encoder.blocks.{depth}.attn.rel_pos_h")) {
            let side = rel[0].div_ceil(2); // rel_pos is [2 * side - 1, head_dim]
            head_dim = rel[1];
            if side == EMBED_SIZE {
                global.push(depth);
            } else {
                window_size = side;
            }
            depth += 1;
        }
        if depth == 0 || head_dim == 0 || embed_dim % head_dim != 0 {
            return Err(not_sam());
        }
        EncoderConfig::Vit {
            embed_dim,
            depth,
            num_heads: embed_dim / head_dim,
            global_attn_indexes: global,
            window_size: if window_size == 0 { 14 } else { window_size },
        }
    };
    Ok(Config {
        encoder,
        prompt_embed_dim,
        mask_in_chans,
        decoder_mlp_dim,
        decoder_num_heads: 8,
        iou_head_hidden_dim,
        rules,
    })
}

/// TinyViT's sizes from `image_encoder.*` shapes: a width per PatchMerging, blocks counted,
/// heads and window from each layer's `attention_biases` (`[heads, window²]`).
fn detect_tiny_vit(shapes: &HashMap<String, Vec<usize>>) -> Option<TinyVitConfig> {
    let dim = |key: String, axis: usize| {
        shapes
            .get(&format!("image_encoder.{key}"))
            .and_then(|s| s.get(axis).copied())
    };
    let mut embed_dims = vec![dim("patch_embed.seq.2.c.weight".into(), 0)?];
    let patch_embed_kernel = dim("patch_embed.seq.0.c.weight".into(), 3)?;
    while let Some(out) = dim(
        format!("layers.{}.downsample.conv1.c.weight", embed_dims.len() - 1),
        0,
    ) {
        embed_dims.push(out);
    }
    let n = embed_dims.len();
    let (mut depths, mut num_heads, mut window_sizes) = (vec![0; n], vec![0; n], vec![0; n]);
    let (mut mlp_ratio, mut mbconv_expand_ratio) = (4, 4);
    for i in 0..n {
        let block = |j: usize, leaf: &str| format!("layers.{i}.blocks.{j}.{leaf}");
        let probe = if i == 0 {
            "conv1.c.weight"
        } else {
            "attn.attention_biases"
        };
        while dim(block(depths[i], probe), 0).is_some() {
            depths[i] += 1;
        }
        if depths[i] == 0 {
            continue;
        }
        if i == 0 {
            mbconv_expand_ratio = dim(block(0, probe), 0)? / embed_dims[0];
        } else {
            num_heads[i] = dim(block(0, probe), 0)?;
            window_sizes[i] = dim(block(0, probe), 1)?.isqrt();
            mlp_ratio = dim(block(0, "mlp.fc1.weight"), 0)? / embed_dims[i];
        }
    }
    Some(TinyVitConfig {
        embed_dims,
        depths,
        num_heads,
        window_sizes,
        mlp_ratio,
        mbconv_expand_ratio,
        patch_embed_kernel,
    })
}

/// Whether a file's name says MedSAM (`medsam_vit_b.pth`, `MedSAM-....safetensors`, but not
/// `lite_medsam.pth`).
pub(crate) fn named_medsam(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    name.contains("medsam") && !name.contains("lite")
}

/// Loads a SAM checkpoint (`.pth`/`.pt` state dict or `.safetensors`) in f32 on `device`.
/// `variant: None` detects it from the keys; `Some(v)` forces the official sizes of `v`,
/// except `medsam` and `litemedsam`, which apply their rules to the sizes read from the file
/// (MedSAM's pipeline on any ViT SAM, LiteMedSAM's on a TinyViT with a 1x1 patch embedding;
/// the small parity fixtures are such files).
///
/// Detection cannot tell MedSAM from SAM vit_b (identical tensors). Rather than run a MedSAM
/// file through SAM's preprocessing (wrong masks, silently), `None` on a ViT checkpoint whose
/// file name contains `medsam` is an error that asks for `--sam-variant medsam` (or `vit_b`
/// to use it the SAM way on purpose).
pub fn load_sam(path: &Path, variant: Option<Variant>, device: &Device) -> Result<Sam> {
    let shapes = read_shapes(path)?;
    let cfg = match variant {
        Some(v @ (Variant::MedSam | Variant::LiteMedSam)) => {
            let mut cfg = detect_config(path, &shapes)?;
            let fits = match (&cfg.encoder, v) {
                (EncoderConfig::Vit { .. }, Variant::MedSam) => true,
                (EncoderConfig::TinyVit(c), Variant::LiteMedSam) => c.patch_embed_kernel == 1,
                _ => false,
            };
            if !fits {
                return Err(SamError::WrongVariant {
                    path: path.to_path_buf(),
                    asked: v.name().to_string(),
                    found: match &cfg.encoder {
                        EncoderConfig::Vit { .. } => "a ViT SAM (SAM or MedSAM)".to_string(),
                        EncoderConfig::TinyVit(c) if c.patch_embed_kernel == 1 => {
                            "LiteMedSAM (TinyViT with a 1x1 patch embedding)".to_string()
                        }
                        EncoderConfig::TinyVit(_) => "MobileSAM (TinyViT)".to_string(),
                    },
                });
            }
            cfg.rules = InputRules::of_variant(v);
            cfg
        }
        Some(v) => {
            if !shapes.keys().any(|k| k.starts_with("mask_decoder.")) {
                return Err(SamError::NotSam {
                    path: path.to_path_buf(),
                    found: describe(&shapes),
                });
            }
            Config::of_variant(v)
        }
        None => {
            let cfg = detect_config(path, &shapes)?;
            if matches!(cfg.encoder, EncoderConfig::Vit { .. }) && named_medsam(path) {
                return Err(SamError::Ambiguous {
                    path: path.to_path_buf(),
                });
            }
            cfg
        }
    };
    let vb = var_builder(path, device)?;
    Sam::new(&cfg, vb).map_err(|source| SamError::Mismatch {
        path: PathBuf::from(path),
        variant: cfg.name().to_string(),
        source: Box::new(source),
    })
}

/// Every tensor of the checkpoint (safetensors on `device`, `.pth` on the CPU, moved by the
/// builder), checked once for NaN or infinite values before the model is built from them.
fn var_builder<'a>(path: &Path, device: &Device) -> Result<VarBuilder<'a>> {
    let unreadable = |e: candle_core::Error| SamError::Unreadable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let tensors: HashMap<String, candle_core::Tensor> = if is_safetensors(path) {
        candle_core::safetensors::load(path, device).map_err(unreadable)?
    } else {
        candle_core::pickle::read_all(path)
            .map_err(unreadable)?
            .into_iter()
            .collect()
    };
    if let Some((tensor, count)) = crate::models::first_non_finite(&tensors)? {
        return Err(SamError::NonFinite {
            path: path.to_path_buf(),
            tensor,
            count,
        });
    }
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}
