//! The project store: the single source of truth for images, ground truth, predictions,
//! pseudo-labels, review state, mask edit history and training runs.
//!
//! # A project on disk
//!
//! A project is a folder:
//!
//! * `medmine.db`: SQLite (bundled library) in WAL mode with foreign keys on, a 5 s busy
//!   timeout and `synchronous=FULL`; the schema version is `PRAGMA user_version` and the
//!   [`schema`] module holds the list of migrations. A database whose version is newer than
//!   this medmine knows is refused without being touched; an older one is first copied to
//!   `medmine.db.bak-v{old}` and then migrated in one transaction.
//! * `masks/`: every mask the project references (ground truth copied at import,
//!   pseudo-labels, edits, predictions) as an 8-bit PNG (0/255) named by the SHA-256 of its
//!   bytes (`masks/<sha256>.png`), so identical masks are stored once and a file name never
//!   changes meaning.
//! * `cache/` (SAM embeddings) and `runs/` (checkpoints and metrics).
//!
//! Images stay where they are: a project references each by path and by the SHA-256 of its
//! file, so a moved dataset can be found again ([`Project::relink`]).
//!
//! # Durability
//!
//! * Every review action is one `BEGIN IMMEDIATE` transaction; a call returns only after the
//!   commit, so whatever a caller reported as done survives a `kill -9` or a power cut.
//! * A mask file is written to a temporary file in `masks/`, fsynced, renamed to its final
//!   name and the folder fsynced; only then is the row that points to it committed. No row
//!   ever points to a missing or half-written file (a crash can at worst leave an unreferenced
//!   file behind).
//! * Several processes (GUI, CLI) may use one project at once: writers wait on each other
//!   through the busy timeout instead of failing with "database is locked".
//!
//! # Review states and the quality score
//!
//! Every image has one review state ([`ReviewState`]): `pending` until someone acts on it,
//! then `accepted`, `rejected` or `edited` (the reviewer saved a corrected mask). Every action
//! is also appended to a review log (who, what, when, note) that
//! [`Project::review_report_csv`] turns into a CSV report.
//!
//! The quality score of a pseudo-label ([`quality_score`]) is
//! `sam_iou × stability × agreement × 1 / (1 + |component count change|)`, where a factor that
//! was not recorded counts as 1 and a label with none of the four has no score (batch
//! accepting by score never picks it). The component count change is the number of connected
//! components of the pseudo-label minus that of the U-Net++ prediction it was mined from
//! (schema v3 stores both counts; labels stored before have none, and keep their score).
//!
//! # Who wrote what, and who wins
//!
//! Every write to an image's review is either a person's or the machine's, and the review log
//! says which: the machine's entries have the action `pseudo_label` (a new pseudo-label,
//! reviewer `medmine`) or `auto_accept` (acceptance by quality score: `mine --auto-accept`,
//! `review accept --min-score`), see [`MACHINE_ACTIONS`] and [`ReviewEvent::is_machine`];
//! a person's are `review`, `edit`, `undo` and `redo`.
//!
//! Every image has a revision number ([`Review::revision`], schema v4) that every write to
//! its review bumps, a person's and the machine's alike. The rule:
//!
//! * **A person's write always wins.** [`Project::set_review`], [`Project::save_edit`],
//!   [`Project::undo_edit`] and [`Project::redo_edit`] check nothing and always apply.
//! * **A machine write is a compare-and-set.** It passes the revision it read when it chose
//!   the image, and inside its own `BEGIN IMMEDIATE` transaction the store checks that the
//!   revision is unchanged and the state still one the machine may change (pending or
//!   rejected for a new pseudo-label, pending for an acceptance). Otherwise it writes nothing
//!   and returns [`MachineWrite::Skipped`]; callers count such images as "skipped: reviewed
//!   meanwhile". This holds however long the machine worked between reading and writing
//!   (an hours-long mining pass).
//! * The machine writes are [`Project::add_pseudo_labels_if`], [`Project::accept_if`] and
//!   [`Project::accept_by_quality`] (selection and writes in one transaction, pending images
//!   only). [`Project::add_pseudo_label`] (no revision at hand) re-checks the state inside its
//!   transaction and refuses an accepted or edited image with [`StoreError::Decided`].
//! * A refused pseudo-label write removes the mask files it created; every writer makes sure,
//!   inside its transaction, that the content-addressed mask files it references are there.
mod export;
mod fsutil;
mod import;
mod machine;
mod open;
mod queue;
mod records;
mod review;
pub mod rle;
mod runs;
use open::{connect, set_journal};
pub mod schema;
pub mod shard;
mod status;
mod views;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use crate::data::DataError;

pub use export::{ExportFormat, ExportReport};
pub use fsutil::{is_disk_full, sha256_file, sha256_hex};
pub use import::{ImportOptions, ImportReport, RelinkReport};
pub use machine::{BatchAccept, MachineWrite, MACHINE_REVIEWER};
pub use queue::QueueEntry;
pub use records::{
    component_change, component_factor, quality_score, BoxPrompt, ImageRecord, MaskVersion,
    NewPseudoLabel, PointPrompt, Prediction, Prompts, PseudoLabel, Review, ReviewEvent,
    ReviewState, Role, RunStatus, TrainingRun, MACHINE_ACTIONS,
};
pub use review::Actor;
pub use shard::{MergeWrite, ShardImage, ShardInfo, ShardMark, ShardSpec, ShardStore};
pub use status::{ImageStatus, ProjectStatus, ShardMerged};
pub use views::{ImageScore, ScoreSource, ViewWindow};

/// File name of the project database inside the project folder.
pub const DB_FILE: &str = "medmine.db";
/// Sub-folders every project has.
pub const SUBDIRS: &[&str] = &["masks", "cache", "runs"];

/// Errors of the project store. Messages name the file, folder or image concerned and the
/// problem.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or folder could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A write failed because the disk is full or a file size limit was reached.
    #[error(
        "{}: no space left to write (disk full or file size limit reached): {source}; nothing was changed",
        .path.display()
    )]
    DiskFull {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The project folder cannot be written.
    #[error(
        "{}: project folder is read-only ({reason}); nothing was changed. Make it writable or copy the project elsewhere",
        .path.display()
    )]
    ReadOnly { path: PathBuf, reason: String },
    /// No project at this path.
    #[error("{}: not a medmine project (no {DB_FILE}); create one with `medmine project init`", .path.display())]
    NotAProject { path: PathBuf },
    #[error(
        "{}: {reason}, not a medmine project database; nothing was changed (restore it from a \
         backup, or move it away and run `medmine project init`)",
        .path.display()
    )]
    NotAProjectDb { path: PathBuf, reason: String },
    /// `init` on a folder that already holds a project.
    #[error("{}: already a medmine project ({DB_FILE} exists)", .path.display())]
    AlreadyAProject { path: PathBuf },
    /// The database was written by a newer medmine.
    #[error(
        "{}: database schema version {found} is newer than this medmine supports (version {supported}); \
         use a newer medmine. The file was not changed",
        .path.display()
    )]
    FutureSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The file is an SQLite database but not a medmine project.
    #[error("{}: not a medmine database: {reason}", .path.display())]
    ForeignDatabase { path: PathBuf, reason: String },
    /// An SQLite error.
    #[error("{}: database error: {source}{}", .path.display(), db_hint(.source))]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// An image or mask could not be read or written.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A machine write (a pseudo-label) refused because a decision on the image stands.
    #[error(
        "image {name} is {state}: a new pseudo-label would overwrite that decision, so nothing \
         was stored (to label it again, first set it back to pending: \
         `medmine review PROJECT pending {name}`)"
    )]
    Decided { name: String, state: ReviewState },
    /// `accept` of an image with nothing to accept: no pseudo-label and no edited mask.
    #[error(
        "image {name} has no pseudo-label to accept, so nothing was changed: run `medmine mine \
         PROJECT` first, or draw one with `medmine review PROJECT edit {name} --mask FILE`"
    )]
    NothingToAccept { name: String },
    /// An image name that the project does not hold.
    #[error("{}: no image named {name} in this project", .project.display())]
    UnknownImage { project: PathBuf, name: String },
    /// The image file a project row points to is gone.
    #[error(
        "image {name}: file {} is missing (moved or deleted?); if the dataset moved, run \
         `medmine project relink PROJECT --data NEW_DATASET_DIR`",
        .path.display()
    )]
    MissingImageFile { name: String, path: PathBuf },
    /// A mask file a project row points to is gone (the project folder was damaged).
    #[error("{}: mask file of image {name} is missing from the project", .path.display())]
    MissingMaskFile { name: String, path: PathBuf },
    /// A mask whose size differs from its image.
    #[error("image {name}: mask is {mask_w}x{mask_h} but the image is {image_w}x{image_h}")]
    MaskSize {
        name: String,
        mask_w: usize,
        mask_h: usize,
        image_w: usize,
        image_h: usize,
    },
    /// An import found problems; nothing was imported.
    #[error(
        "{}: {} problem{} found, nothing was imported:\n  {}",
        .data.display(),
        .problems.len(),
        if .problems.len() == 1 { "" } else { "s" },
        .problems.join("\n  ")
    )]
    Import {
        data: PathBuf,
        problems: Vec<String>,
    },
    /// An export target that would be overwritten.
    #[error("{}: already exists; export into a new folder or file", .path.display())]
    ExportExists { path: PathBuf },
    /// A stored JSON value could not be read.
    #[error("{}: stored {what} is not valid JSON: {source}", .path.display())]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Any other invalid request.
    #[error("{0}")]
    Invalid(String),
}

fn db_hint(e: &rusqlite::Error) -> &'static str {
    use rusqlite::ErrorCode as C;
    match e.sqlite_error_code() {
        Some(C::DiskFull) | Some(C::SystemIoFailure) => {
            " (is the disk full or a file size limit reached?); the last action was rolled back"
        }
        Some(C::ReadOnly) | Some(C::CannotOpen) => {
            " (is the project folder read-only?); nothing was changed"
        }
        Some(C::DatabaseBusy) | Some(C::DatabaseLocked) => {
            " (another process held the project for more than the busy timeout)"
        }
        _ => "",
    }
}

/// Result alias of the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An open project: its folder and a connection to its database.
pub struct Project {
    root: PathBuf,
    db_path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for Project {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Project").field("root", &self.root).finish()
    }
}

/// How long a writer waits for another one before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl Project {
    /// The project folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ROOT/medmine.db`.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// `ROOT/masks/`: content-addressed mask PNGs.
    pub fn masks_dir(&self) -> PathBuf {
        self.root.join("masks")
    }

    /// `ROOT/cache/`: SAM embeddings.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// `ROOT/runs/`: training runs.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// The database connection (read queries, tests, tools).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The schema version of the open database.
    pub fn schema_version(&self) -> Result<i64> {
        schema::user_version(&self.conn).map_err(|e| self.db(e))
    }

    /// `PRAGMA integrity_check`: `"ok"` for a sound database, else SQLite's findings.
    pub fn integrity_check(&self) -> Result<String> {
        let mut stmt = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(|e| self.db(e))?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .and_then(|it| it.collect())
            .map_err(|e| self.db(e))?;
        Ok(rows.join("\n"))
    }

    /// Wraps an SQLite error with the database path.
    fn db(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    /// The image row with this name (or file stem).
    pub fn image(&self, name: &str) -> Result<ImageRecord> {
        self.find_image(name)?
            .ok_or_else(|| StoreError::UnknownImage {
                project: self.root.clone(),
                name: name.to_string(),
            })
    }

    fn find_image(&self, name: &str) -> Result<Option<ImageRecord>> {
        let sql = format!("{} WHERE name = ?1", records::IMAGE_SELECT);
        if let Some(r) = self
            .conn
            .query_row(&sql, [name], records::image_from_row)
            .optional()
            .map_err(|e| self.db(e))?
        {
            return Ok(Some(r));
        }
        let all = self.images()?;
        let mut by_stem = all.into_iter().filter(|r| r.stem() == name);
        match (by_stem.next(), by_stem.next()) {
            (Some(r), None) => Ok(Some(r)),
            _ => Ok(None),
        }
    }

    /// Every image, sorted by name.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let sql = format!("{} ORDER BY name", records::IMAGE_SELECT);
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([], records::image_from_row)
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// The image's file path, checked to exist: a clear error naming the image and the path
    /// when the file has vanished.
    pub fn image_file(&self, name: &str) -> Result<PathBuf> {
        let rec = self.image(name)?;
        if !rec.path.is_file() {
            return Err(StoreError::MissingImageFile {
                name: rec.name,
                path: rec.path,
            });
        }
        Ok(rec.path)
    }

    /// Decodes the image (see [`crate::data::load_image`] for the normalisation).
    pub fn load_image(&self, name: &str) -> Result<crate::data::ImageF32> {
        let path = self.image_file(name)?;
        Ok(crate::data::load_image(&path)?)
    }

    /// The ground-truth mask of an image, if it has one.
    pub fn ground_truth(&self, name: &str) -> Result<Option<PathBuf>> {
        let rec = self.image(name)?;
        let file: Option<String> = self
            .conn
            .query_row(
                "SELECT mask_file FROM gt_masks WHERE image_id = ?1",
                [rec.id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        Ok(file.map(|f| self.masks_dir().join(f)))
    }

    /// Every image whose file is missing: `(name, recorded path)`.
    pub fn missing_images(&self) -> Result<Vec<(String, PathBuf)>> {
        Ok(self
            .images()?
            .into_iter()
            .filter(|r| !r.path.is_file())
            .map(|r| (r.name, r.path))
            .collect())
    }

    /// Checks every file the project references: image files exist (and, with
    /// `hashes`, still have their recorded content) and every mask file exists. Returns
    /// one line per problem (empty when all is well).
    pub fn verify(&self, hashes: bool) -> Result<Vec<String>> {
        let mut problems = Vec::new();
        for rec in self.images()? {
            if !rec.path.is_file() {
                problems.push(
                    StoreError::MissingImageFile {
                        name: rec.name.clone(),
                        path: rec.path.clone(),
                    }
                    .to_string(),
                );
            } else if hashes {
                let h = sha256_file(&rec.path)?;
                if h != rec.sha256 {
                    problems.push(format!(
                        "image {}: file {} has changed since import (content hash differs)",
                        rec.name,
                        rec.path.display()
                    ));
                }
            }
        }
        for (name, file) in self.referenced_masks()? {
            let path = self.masks_dir().join(&file);
            if !path.is_file() {
                problems.push(StoreError::MissingMaskFile { name, path }.to_string());
            }
        }
        Ok(problems)
    }

    /// `(image name, mask file name)` for every mask file a row references.
    pub fn referenced_masks(&self) -> Result<Vec<(String, String)>> {
        let sql = "SELECT i.name, m.mask_file FROM gt_masks m JOIN images i ON i.id = m.image_id
             UNION ALL SELECT i.name, p.mask_file FROM pseudo_labels p JOIN images i ON i.id = p.image_id
             UNION ALL SELECT i.name, v.mask_file FROM mask_versions v JOIN images i ON i.id = v.image_id
             UNION ALL SELECT i.name, p.mask_file FROM predictions p JOIN images i ON i.id = p.image_id";
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Reads a key of the project's `meta` table.
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))
    }
}

/// The current time as an RFC 3339 UTC timestamp with milliseconds,
/// e.g. `2026-11-26T16:13:56.123Z`.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(
            t.ends_with('Z') && &t[4..5] == "-" && &t[10..11] == "T",
            "{t}"
        );
        assert!(t.as_str() > "2024-01-01", "{t}");
    }

    #[test]
    fn init_then_open() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("proj");
        let proj = Project::init(&p).unwrap();
        assert_eq!(proj.schema_version().unwrap(), schema::LATEST);
        for sub in SUBDIRS {
            assert!(p.join(sub).is_dir());
        }
        drop(proj);
        assert!(matches!(
            Project::init(&p),
            Err(StoreError::AlreadyAProject { .. })
        ));
        let proj = Project::open(&p).unwrap();
        assert_eq!(proj.integrity_check().unwrap(), "ok");
        let mode: String = proj
            .conn()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = proj
            .conn()
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let err = Project::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::NotAProject { .. }), "{err}");
    }
}
