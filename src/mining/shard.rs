//! Mining on a cluster: [`mine_shard`] mines the K-th of N partitions of what `mine` would
//! mine, reading the project read-only and writing a shard folder ([`ShardStore`]);
//! [`merge_shards`] applies finished shards to the project with the compare-and-set rule.
//!
//! Partition: round-robin over the project's unlabelled images in project order (position
//! `p` goes to shard `p mod N`), then the [`Remine`](super::Remine) policy within the shard.
//! The cut does not depend on review states, so jobs started at different times cut the same
//! partition; it is balanced over the unlabelled images (exactly on a first round).
//!
//! A shard job records its images with the revision it read before mining any; a job started
//! again on the same folder continues where the first stopped (and refuses a folder of another
//! project, shard or models). A merge stores an image's rows only if the image still has the
//! revision the shard read, and records every merged or skipped image in the project, so a
//! shard is merged once however often the merge runs.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;

use super::{label_one, Labeler, Labelled, MiningConfig, MiningError};
use crate::store::{MergeWrite, Project, ShardInfo, ShardMark, ShardSpec, ShardStore};

/// What a shard job did (its whole shard, including images mined by an earlier, stopped job).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardSummary {
    pub info: Option<ShardInfo>,
    /// Images of the shard (selected for mining).
    pub selected: usize,
    /// Of those, mined by an earlier job on this folder.
    pub resumed: usize,
    pub mined: usize,
    pub no_component: usize,
    pub failed: Vec<(String, String)>,
    /// Unlabelled images of this shard that the policy left alone (counted at the start).
    pub not_selected: usize,
    pub cancelled: bool,
}

fn shard_err(m: String) -> MiningError {
    MiningError::Shard(m)
}

/// Mines shard `spec` of `project` (opened read-only) into the folder `out`; see the module
/// docs. `progress(done, total)` over the shard's images; `cancel` is checked before each.
#[allow(clippy::too_many_arguments)]
pub fn mine_shard(
    project: &Project,
    out: &Path,
    spec: ShardSpec,
    unet_checkpoint: &Path,
    labeler: &mut dyn Labeler,
    cfg: &MiningConfig,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
    cancel: &AtomicBool,
) -> Result<ShardSummary, MiningError> {
    cfg.check()?;
    if cfg.auto_accept.is_some() {
        return Err(MiningError::Settings(
            "--auto-accept does not apply to a shard (it never writes the project): merge the \
             shards, then `medmine review PROJECT accept --min-score S`"
                .into(),
        ));
    }
    let (unet, who) =
        super::load_unet(unet_checkpoint, &*labeler, cfg, device, &out.join("cache"))?;
    let mut store = ShardStore::open_or_create(out)?;
    let project_id = project.project_id()?;
    let settings = settings_text(cfg);
    let mut summary = ShardSummary::default();
    let info = match store.info()? {
        Some(info) => {
            let mine = (
                &project_id,
                spec,
                &who.unet_hash,
                &who.labeler_id,
                &settings,
            );
            let theirs = (
                &info.project_id,
                info.spec,
                &info.unet_hash,
                &info.labeler,
                &info.settings,
            );
            if mine != theirs {
                return Err(shard_err(format!(
                    "{}: holds shard {} of another run (project {}, U-Net++ {}, labeler {}, \
                     {}); this job is shard {spec} of project {project_id} with U-Net++ {} and \
                     labeler {} ({settings}): use another --shard-out folder",
                    out.display(),
                    info.spec,
                    info.project_id,
                    short(&info.unet_hash),
                    info.labeler,
                    info.settings,
                    short(&who.unet_hash),
                    who.labeler_id
                )));
            }
            info
        }
        None => {
            let (todo, sel) = super::select::select_images(project, cfg.remine, &who, Some(spec))?;
            summary.not_selected = sel.unlabelled - todo.len();
            let info = ShardInfo {
                shard_id: new_shard_id(&project_id, spec, &who.unet_hash),
                project_id,
                spec,
                unet_hash: who.unet_hash.clone(),
                labeler: who.labeler_id.clone(),
                settings,
                finished: false,
            };
            let images: Vec<(String, i64)> =
                todo.into_iter().map(|c| (c.name, c.revision)).collect();
            store.start(&info, &images)?;
            info
        }
    };
    let images = store.images()?;
    summary.selected = images.len();
    let total = images.len();
    progress(0, total);
    for (i, img) in images.into_iter().enumerate() {
        if let Some(outcome) = &img.outcome {
            summary.resumed += 1;
            count(&mut summary, outcome, &img.name, img.error.as_deref());
            progress(i + 1, total);
            continue;
        }
        if cancel.load(Ordering::Relaxed) {
            summary.cancelled = true;
            break;
        }
        let name = img.name.as_str();
        let (outcome, error, labels) = match label_one(project, &unet, labeler, cfg, &who, name)? {
            Labelled::Mined(_, labels) => ("mined", None, labels),
            Labelled::NoComponent => ("no_component", None, Vec::new()),
            Labelled::Failed(e) => ("failed", Some(e), Vec::new()),
        };
        store.record(name, outcome, error.as_deref(), &labels)?;
        count(&mut summary, outcome, name, error.as_deref());
        progress(i + 1, total);
    }
    summary.info = store.info()?.or(Some(info));
    Ok(summary)
}

fn count(s: &mut ShardSummary, outcome: &str, name: &str, error: Option<&str>) {
    match outcome {
        "mined" => s.mined += 1,
        "no_component" => s.no_component += 1,
        _ => s
            .failed
            .push((name.to_string(), error.unwrap_or("failed").to_string())),
    }
}

/// The settings a shard ran with, as compared between a job and its folder and between the
/// shards of one merge.
fn settings_text(cfg: &MiningConfig) -> String {
    format!(
        "remine {}, strategy {}, rounds {}, stop IoU {}, threshold {}, min area {}, multimask \
         {}, u-net++ mode {:?}",
        cfg.remine,
        cfg.prompt.strategy,
        cfg.rounds,
        cfg.stop_iou,
        cfg.prompt.threshold,
        cfg.prompt.min_area,
        cfg.multimask,
        cfg.unet_mode
    )
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// A shard run's id: unique per job start (time and process), named after what it is.
fn new_shard_id(project_id: &str, spec: ShardSpec, unet_hash: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!(
        "{project_id} {spec} {unet_hash} {nanos} {}",
        std::process::id()
    );
    crate::store::sha256_hex(seed.as_bytes())[..32].to_string()
}

/// What a merge did, per shard and in total.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergeSummary {
    /// `(shard K/N, folder)` in merge order.
    pub shards: Vec<(ShardSpec, PathBuf)>,
    /// Images whose shard rows were stored now.
    pub merged: Vec<String>,
    /// Images a person reviewed after their shard read them: left alone.
    pub skipped_reviewed: Vec<String>,
    /// Images merged (or skipped) by an earlier merge of the same shard.
    pub already_merged: usize,
    /// The shards' images without a pseudo-label (no component, or failed with the error).
    pub no_component: usize,
    pub failed: Vec<(String, String)>,
    /// Shards of `0..N` not given (only with `partial`).
    pub missing: Vec<ShardSpec>,
}

/// Merges the finished shards in `dirs` into `project` (see the module docs). Refuses shards
/// of another project, made by other models or settings, two runs of one shard, and an
/// unfinished shard; a shard of `0..N` not given is an error naming it unless `partial`.
pub fn merge_shards(
    project: &mut Project,
    dirs: &[PathBuf],
    partial: bool,
) -> Result<MergeSummary, MiningError> {
    if dirs.is_empty() {
        return Err(shard_err("no shard folder given".into()));
    }
    let project_id = project.project_id()?;
    let mut shards: Vec<(ShardStore, ShardInfo)> = Vec::new();
    for dir in dirs {
        let store = ShardStore::open(dir)?;
        let Some(info) = store.info()? else {
            return Err(shard_err(format!(
                "{}: an empty shard (its job stopped before it selected its images): run it \
                 again",
                dir.display()
            )));
        };
        if info.project_id != project_id {
            return Err(shard_err(format!(
                "{}: shard {} of project {}, not of {} (project {project_id})",
                dir.display(),
                info.spec,
                info.project_id,
                project.root().display()
            )));
        }
        if !info.finished {
            return Err(shard_err(format!(
                "{}: shard {} is not finished (its job stopped before the end): run the same \
                 `medmine mine --shard {} --shard-out {}` again, it continues",
                dir.display(),
                info.spec,
                info.spec,
                dir.display()
            )));
        }
        if let Some((other, o)) = shards.first() {
            let same = (&o.unet_hash, &o.labeler, &o.settings, o.spec.count)
                == (
                    &info.unet_hash,
                    &info.labeler,
                    &info.settings,
                    info.spec.count,
                );
            if !same {
                return Err(shard_err(format!(
                    "{} and {}: shards of different mining runs (U-Net++ {} / {}, labeler {} / \
                     {}, {} / {} shards, settings \"{}\" / \"{}\"): merge one run's shards together",
                    other.dir().display(),
                    dir.display(),
                    short(&o.unet_hash),
                    short(&info.unet_hash),
                    o.labeler,
                    info.labeler,
                    o.spec.count,
                    info.spec.count,
                    o.settings,
                    info.settings
                )));
            }
        }
        if let Some((other, o)) = shards.iter().find(|(_, o)| o.spec == info.spec) {
            if o.shard_id == info.shard_id {
                continue; // the same shard given twice
            }
            return Err(shard_err(format!(
                "{} and {}: two runs of shard {}: give one",
                other.dir().display(),
                dir.display(),
                info.spec
            )));
        }
        shards.push((store, info));
    }
    let count = shards[0].1.spec.count;
    let mut summary = MergeSummary {
        missing: (0..count)
            .map(|index| ShardSpec { index, count })
            .filter(|s| !shards.iter().any(|(_, i)| i.spec == *s))
            .collect(),
        ..MergeSummary::default()
    };
    if !summary.missing.is_empty() && !partial {
        let names: Vec<String> = summary.missing.iter().map(|s| s.to_string()).collect();
        return Err(shard_err(format!(
            "missing shards: {} (of {count}); nothing merged. Give every shard's folder, or \
             --partial to merge these now and the others later",
            names.join(", ")
        )));
    }
    shards.sort_by_key(|(_, i)| i.spec);
    for (store, info) in &shards {
        summary.shards.push((info.spec, store.dir().to_path_buf()));
        let spec = info.spec.to_string();
        let mark = ShardMark {
            shard_id: &info.shard_id,
            shard: &spec,
        };
        for img in store.images()? {
            match img.outcome.as_deref() {
                Some("mined") => {}
                Some("no_component") => {
                    summary.no_component += 1;
                    continue;
                }
                _ => {
                    let e = img.error.clone().unwrap_or_else(|| "failed".into());
                    summary.failed.push((img.name.clone(), e));
                    continue;
                }
            }
            let labels = store.labels(&img.name)?;
            let write = project
                .merge_shard_image(&img.name, img.revision, &labels, mark)
                .map_err(|source| MiningError::Store {
                    image: img.name.clone(),
                    source,
                })?;
            match write {
                MergeWrite::Merged => summary.merged.push(img.name),
                MergeWrite::SkippedReviewed => summary.skipped_reviewed.push(img.name),
                MergeWrite::AlreadyMerged => summary.already_merged += 1,
            }
        }
    }
    Ok(summary)
}
