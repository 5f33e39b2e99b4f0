//! The SAM labeler: the U-Net++ components become SAM prompts, SAM's masks are refined over
//! rounds ([`crate::mining::round`]); the embedding of each image is cached.
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::hash::{cached_sha256, hash_cache_in};
use super::{LabelInput, Labeler};
use crate::mining::round::sam_rounds;
use crate::mining::{MinedImage, MiningConfig, MiningError};
use crate::models::sam::cache::embedding_identity;
use crate::models::sam::{load_sam, EmbeddingCache, SamPredictor, Variant};
use crate::prompts::prompts_from_probs;

/// SAM, its embedding cache and its checkpoint's identity.
pub struct SamLabeler {
    sam: SamPredictor,
    cache: EmbeddingCache,
    checkpoint: PathBuf,
    /// `sam:<sha256>`.
    id: String,
}

impl SamLabeler {
    /// Loads SAM from `checkpoint` (`variant`: `None` detects it). With `cache_dir` (a
    /// project's cache folder), the embeddings are kept on disk in `sam-embeddings/` and the
    /// checkpoint's hash in the hash cache, so a large checkpoint is hashed once.
    pub fn load(
        checkpoint: &Path,
        variant: Option<Variant>,
        device: &Device,
        cache_dir: Option<&Path>,
    ) -> Result<Self, MiningError> {
        if !checkpoint.is_file() {
            return Err(MiningError::NoSamCheckpoint {
                path: checkpoint.to_path_buf(),
            });
        }
        let sha256 = cached_sha256(checkpoint, cache_dir.map(hash_cache_in).as_deref())?;
        let sam =
            SamPredictor::new(load_sam(checkpoint, variant, device).map_err(MiningError::LoadSam)?);
        let embeddings = cache_dir.map(|d| d.join("sam-embeddings"));
        // MedSAM and SAM vit_b may be one file: the embeddings are keyed by the rules too
        let id = embedding_identity(&sha256, sam.sam.config().rules);
        let cache = EmbeddingCache::with_checkpoint_hash(embeddings.as_deref(), 2, &id)
            .map_err(MiningError::LoadSam)?;
        Ok(Self {
            sam,
            cache,
            checkpoint: checkpoint.to_path_buf(),
            id: format!("sam:{sha256}"),
        })
    }

    /// The predictor (for callers that also prompt SAM themselves).
    pub fn predictor(&self) -> &SamPredictor {
        &self.sam
    }
}

impl Labeler for SamLabeler {
    fn name(&self) -> &'static str {
        "sam"
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn checkpoint(&self) -> Option<&Path> {
        Some(&self.checkpoint)
    }

    fn label(
        &mut self,
        input: &LabelInput<'_>,
        cfg: &MiningConfig,
    ) -> Result<Option<MinedImage>, MiningError> {
        let name = input.name;
        let p = input.probs;
        // Prompts first: an image without components costs no SAM encoder run.
        let prompts =
            prompts_from_probs(&p.data, p.width, p.height, &cfg.prompt).map_err(|source| {
                MiningError::Prompts {
                    image: name.to_string(),
                    source,
                }
            })?;
        if prompts.components.is_empty() {
            return Ok(None);
        }
        // The cache decodes the file as `input.image` was (crate::data::load_rgb8).
        let emb = self
            .cache
            .get_or_compute(input.file, &self.sam)
            .map_err(|source| MiningError::Sam {
                image: name.to_string(),
                source,
            })?;
        let mined = sam_rounds(
            name,
            &self.sam,
            &emb,
            &prompts,
            &p.data,
            (p.width, p.height),
            cfg,
        )?;
        Ok(Some(mined))
    }
}
