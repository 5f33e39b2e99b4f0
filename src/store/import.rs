//! Importing a dataset into a project, and repairing image paths after the dataset moved.
//!
//! An import checks everything first (every image decodes completely, every mask decodes
//! and has its image's size, names are unique, split lists name known images) and imports
//! nothing when anything is wrong: the error lists every problem, each naming its file.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rusqlite::{params, TransactionBehavior};

use super::fsutil::{self, sha256_file};
use super::{now_rfc3339, Project, Result, Role, StoreError};
use crate::data::{self, Dataset, Sample, Skipped};

/// What to import and how to assign roles.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Dataset folder (`images/`, optional `masks/`).
    pub data: PathBuf,
    /// Folder with `train.txt` (required there) and optional `val.txt`, `test.txt`.
    ///
    /// With it: the labelled fraction of `train.txt` is `labelled`, the rest of it
    /// `unlabelled`, `val.txt` → `val`, `test.txt` → `test`, images in no list `unlabelled`.
    /// Without it: the labelled fraction of the images that have a mask is `labelled`,
    /// every other image `unlabelled`.
    pub split_dir: Option<PathBuf>,
    /// Fraction in `(0, 1]` (see [`crate::data::split_labelled`]).
    pub labelled_fraction: f64,
    pub seed: u64,
    /// Import the usable files and only list the unusable ones (non-image files, masks
    /// without an image, images sharing a stem, images or masks that do not decode, masks of
    /// another size) in [`ImportReport::skipped`] instead of refusing the import. An image
    /// whose mask is unusable is skipped with it (its role was chosen for a labelled image).
    pub skip_unusable: bool,
}

impl ImportOptions {
    /// Every image with a mask labelled, no split lists.
    pub fn new(data: &Path) -> Self {
        Self {
            data: data.to_path_buf(),
            split_dir: None,
            labelled_fraction: 1.0,
            seed: 0,
            skip_unusable: false,
        }
    }
}

/// What an import did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportReport {
    pub imported: usize,
    pub ground_truth: usize,
    pub by_role: BTreeMap<Role, usize>,
    /// Things worth telling the user that did not stop the import.
    pub notes: Vec<String>,
    /// Mask files imported as they are but whose content looks wrong, each as
    /// `PATH: what` ([`data::mask_warning`]).
    pub warnings: Vec<String>,
    /// Files left out, each with the reason (hidden files always; every unusable file with
    /// [`ImportOptions::skip_unusable`]). Each is also in `notes`.
    pub skipped: Vec<Skipped>,
}

/// What a relink did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RelinkReport {
    /// Images whose path changed.
    pub relinked: usize,
    /// Images whose recorded path was already right.
    pub unchanged: usize,
    /// Images whose content was not found in the new folder: `(name, old path)`.
    pub not_found: Vec<(String, PathBuf)>,
}

/// One image checked and ready to insert.
struct Checked {
    name: String,
    path: PathBuf,
    sha256: String,
    width: usize,
    height: usize,
    role: Role,
    /// `(source path, PNG bytes, foreground pixels)`.
    mask: Option<(PathBuf, Vec<u8>, usize)>,
    /// What looks wrong in the mask file, if anything.
    warning: Option<String>,
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Role of every sample by name; problems are appended to `problems`.
fn assign_roles(
    ds: &Dataset,
    opts: &ImportOptions,
    problems: &mut Vec<String>,
) -> Result<HashMap<String, Role>> {
    let mut roles: HashMap<String, Role> = HashMap::new();
    let Some(split_dir) = &opts.split_dir else {
        let with_mask: Vec<String> = ds.labelled().into_iter().map(|s| s.name).collect();
        let (labelled, _) = data::split_labelled(&with_mask, opts.labelled_fraction, opts.seed)?;
        for s in &ds.samples {
            roles.insert(s.name.clone(), Role::Unlabelled);
        }
        for n in labelled {
            roles.insert(n, Role::Labelled);
        }
        return Ok(roles);
    };
    let list = |file: &str, required: bool| -> Result<Option<(PathBuf, Vec<Sample>)>> {
        let path = split_dir.join(file);
        if !path.is_file() {
            if required {
                return Err(StoreError::Invalid(format!(
                    "{}: split list not found (--split-dir needs train.txt; val.txt and test.txt are optional)",
                    path.display()
                )));
            }
            return Ok(None);
        }
        let names = data::read_split_list(&path)?;
        Ok(Some((path.clone(), ds.select(&names, &path)?)))
    };
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut mark = |path: &Path, samples: &[Sample], role: Role, roles: &mut HashMap<_, _>| {
        for s in samples {
            if let Some(first) = seen.insert(s.name.clone(), path.to_path_buf()) {
                problems.push(format!(
                    "{}: {} is also listed in {}",
                    path.display(),
                    s.name,
                    first.display()
                ));
            }
            roles.insert(s.name.clone(), role);
        }
    };
    if let Some((path, train)) = list("train.txt", true)? {
        let names: Vec<String> = train.iter().map(|s| s.name.clone()).collect();
        let (labelled, _) = data::split_labelled(&names, opts.labelled_fraction, opts.seed)?;
        mark(&path, &train, Role::Unlabelled, &mut roles);
        for n in labelled {
            roles.insert(n, Role::Labelled);
        }
    }
    for (file, role) in [("val.txt", Role::Val), ("test.txt", Role::Test)] {
        if let Some((path, samples)) = list(file, false)? {
            mark(&path, &samples, role, &mut roles);
        }
    }
    for s in &ds.samples {
        roles.entry(s.name.clone()).or_insert(Role::Unlabelled);
    }
    Ok(roles)
}

/// `error` without the `path: ` prefix that the data errors start with.
fn reason(path: &Path, error: impl std::fmt::Display) -> String {
    let e = error.to_string();
    let prefix = format!("{}: ", path.display());
    e.strip_prefix(&prefix).map(str::to_string).unwrap_or(e)
}

/// Decodes an image and its mask completely and hashes the image file; an error names the
/// file at fault.
fn check_sample(s: &Sample, role: Role) -> Result<Checked, Skipped> {
    let bad = |path: &Path, e: &dyn std::fmt::Display| Skipped {
        path: path.to_path_buf(),
        reason: reason(path, e),
    };
    let img = data::load_image(&s.image).map_err(|e| bad(&s.image, &e))?;
    let sha256 = sha256_file(&s.image).map_err(|e| bad(&s.image, &e))?;
    let mut warning = None;
    let mask = match &s.mask {
        None if matches!(role, Role::Labelled | Role::Val | Role::Test) => {
            return Err(Skipped {
                path: s.image.clone(),
                reason: format!(
                    "image has no mask but its role is {role} (which needs ground truth)"
                ),
            });
        }
        None => None,
        Some(mp) => {
            let (m, w) = data::load_mask_checked(mp).map_err(|e| bad(mp, &e))?;
            warning = w.map(|w| format!("{}: {w}", mp.display()));
            if (m.width, m.height) != (img.width, img.height) {
                let e = data::DataError::MaskSize {
                    path: mp.clone(),
                    mask_w: m.width,
                    mask_h: m.height,
                    image: s.image.clone(),
                    image_w: img.width,
                    image_h: img.height,
                };
                return Err(bad(mp, &e));
            }
            let bytes = fsutil::mask_png_bytes(&m).map_err(|e| bad(mp, &e))?;
            Some((absolute(mp), bytes, m.foreground()))
        }
    };
    Ok(Checked {
        name: s.name.clone(),
        path: absolute(&s.image),
        sha256,
        width: img.width,
        height: img.height,
        role,
        mask,
        warning,
    })
}

impl Project {
    /// Imports a dataset (see [`ImportOptions`]); all or nothing.
    pub fn import(&mut self, opts: &ImportOptions) -> Result<ImportReport> {
        let ds = Dataset::scan(&opts.data)?;
        let mut problems = Vec::new();
        let mut report = ImportReport::default();
        for k in &ds.skipped {
            let hidden = k
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            let line = format!("{}: {}", k.path.display(), k.reason);
            if hidden || opts.skip_unusable {
                report.notes.push(format!("skipped {line}"));
                report.skipped.push(k.clone());
            } else {
                problems.push(line);
            }
        }
        let roles = assign_roles(&ds, opts, &mut problems)?;
        let existing: HashMap<String, PathBuf> = self
            .images()?
            .into_iter()
            .map(|r| (r.name, r.path))
            .collect();
        for s in &ds.samples {
            if let Some(p) = existing.get(&s.name) {
                problems.push(format!(
                    "{}: an image named {} is already in the project (from {})",
                    s.image.display(),
                    s.name,
                    p.display()
                ));
            }
        }
        let checked: Vec<Result<Checked, Skipped>> = ds
            .samples
            .par_iter()
            .map(|s| check_sample(s, roles.get(&s.name).copied().unwrap_or(Role::Unlabelled)))
            .collect();
        let mut ok = Vec::with_capacity(checked.len());
        for c in checked {
            match c {
                Ok(c) => ok.push(c),
                Err(k) if opts.skip_unusable => {
                    report
                        .notes
                        .push(format!("skipped {}: {}", k.path.display(), k.reason));
                    report.skipped.push(k);
                }
                Err(k) => problems.push(format!("{}: {}", k.path.display(), k.reason)),
            }
        }
        report.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        report.warnings = ok.iter().filter_map(|c| c.warning.clone()).collect();
        report.warnings.sort();
        if !problems.is_empty() {
            return Err(StoreError::Import {
                data: opts.data.clone(),
                problems,
            });
        }
        // Mask files first (durably), then every row in one transaction.
        let masks_dir = self.masks_dir();
        let mut mask_files = Vec::with_capacity(ok.len());
        for c in &ok {
            mask_files.push(match &c.mask {
                Some((_, bytes, _)) => Some(fsutil::store_png_bytes(&masks_dir, bytes)?),
                None => None,
            });
        }
        let now = now_rfc3339();
        let db_path = self.db_path.clone();
        let err = super::schema::db_err(&db_path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        // A refused machine write may have removed an identical file it had just created.
        for c in &ok {
            if let Some((_, bytes, _)) = &c.mask {
                fsutil::store_png_bytes(&masks_dir, bytes)?;
            }
        }
        for (c, file) in ok.iter().zip(&mask_files) {
            tx.execute(
                "INSERT INTO images (name, path, sha256, width, height, role, added_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    c.name,
                    c.path.to_string_lossy(),
                    c.sha256,
                    c.width as i64,
                    c.height as i64,
                    c.role,
                    now
                ],
            )
            .map_err(err)?;
            let id = tx.last_insert_rowid();
            tx.execute("INSERT INTO reviews (image_id) VALUES (?1)", [id])
                .map_err(err)?;
            if let (Some(file), Some((src, _, fg))) = (file, &c.mask) {
                tx.execute(
                    "INSERT INTO gt_masks (image_id, mask_file, source_path, foreground)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![id, file, src.to_string_lossy(), *fg as i64],
                )
                .map_err(err)?;
                report.ground_truth += 1;
            }
            *report.by_role.entry(c.role).or_default() += 1;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('dataset_root', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [absolute(&opts.data).to_string_lossy()],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        report.imported = ok.len();
        Ok(report)
    }

    /// Finds every image again by content hash under `data/images/` (or `data` itself when
    /// it has no `images/`) and records the new paths in one transaction.
    pub fn relink(&mut self, data: &Path) -> Result<RelinkReport> {
        let dir = if data.join("images").is_dir() {
            data.join("images")
        } else {
            data.to_path_buf()
        };
        let io = |source| StoreError::Io {
            path: dir.clone(),
            source,
        };
        let images = self.images()?;
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)? {
            let p = entry.map_err(io)?.path();
            if p.is_file() {
                files.push(p);
            }
        }
        let hashed: Vec<(String, PathBuf)> = files
            .par_iter()
            .filter_map(|p| sha256_file(p).ok().map(|h| (h, absolute(p))))
            .collect();
        let mut by_hash: HashMap<String, Vec<PathBuf>> = HashMap::new();
        for (h, p) in hashed {
            by_hash.entry(h).or_default().push(p);
        }
        let mut report = RelinkReport::default();
        let mut updates = Vec::new();
        for r in images {
            let Some(cands) = by_hash.get(&r.sha256) else {
                report.not_found.push((r.name, r.path));
                continue;
            };
            // Prefer a file with the image's own name among identical contents.
            let best = cands
                .iter()
                .find(|p| p.file_name().and_then(|n| n.to_str()) == Some(r.name.as_str()))
                .unwrap_or(&cands[0]);
            if *best == r.path {
                report.unchanged += 1;
            } else {
                updates.push((r.id, best.clone()));
            }
        }
        let db_path = self.db_path.clone();
        let err = super::schema::db_err(&db_path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        for (id, p) in &updates {
            tx.execute(
                "UPDATE images SET path = ?1 WHERE id = ?2",
                params![p.to_string_lossy(), id],
            )
            .map_err(err)?;
        }
        if !updates.is_empty() {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('dataset_root', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [absolute(data).to_string_lossy()],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        report.relinked = updates.len();
        Ok(report)
    }
}
