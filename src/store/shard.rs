//! Mining shards (mining on a cluster): a shard job reads the project read-only and writes a
//! self-contained folder, never the project: `shard.sqlite` (what it was cut from and by which
//! models, every image it took with the revision it read, each image's outcome and its
//! pseudo-label rows) and `masks/` (the rows' masks, content-addressed as in a project).
//! [`Project::merge_shard_image`] applies one image of a shard with the compare-and-set rule
//! and records it in `shard_merges`, so a merge is applied once.
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use super::fsutil::MaskPng;
use super::machine::Rounds;
use super::records::{NewPseudoLabel, Prompts};
use super::{now_rfc3339, MachineWrite, Project, Result, StoreError};

/// The shard database's file name in a shard folder.
pub const SHARD_DB: &str = "shard.sqlite";

const SHARD_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    pos      INTEGER PRIMARY KEY,
    name     TEXT NOT NULL UNIQUE,
    revision INTEGER NOT NULL,
    outcome  TEXT CHECK (outcome IS NULL OR outcome IN ('mined', 'no_component', 'failed')),
    error    TEXT
);
CREATE TABLE IF NOT EXISTS labels (
    image            TEXT NOT NULL REFERENCES images(name),
    ord              INTEGER NOT NULL,
    mask_file        TEXT NOT NULL,
    prompts          TEXT NOT NULL,
    sam_iou          REAL,
    stability        REAL,
    agreement        REAL,
    unet_components  INTEGER,
    label_components INTEGER,
    sam_checkpoint   TEXT,
    unet_checkpoint  TEXT,
    unet_hash        TEXT,
    labeler          TEXT,
    PRIMARY KEY (image, ord)
);
"#;

/// Which shard of how many: the `K/N` of `mine --shard K/N` (0-based `K`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl ShardSpec {
    /// Whether the unlabelled image at position `pos` (project order) is in this shard:
    /// round-robin over all unlabelled images, so every shard job cuts the same partition
    /// whatever was reviewed between their starts.
    pub fn contains(self, pos: usize) -> bool {
        pos % self.count == self.index
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for ShardSpec {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<ShardSpec> {
        let bad = || {
            StoreError::Invalid(format!(
                "shard '{s}': expected K/N with 0 <= K < N, e.g. 0/4 (K is 0-based, as \
                 SLURM_ARRAY_TASK_ID and JOB_COMPLETION_INDEX are)"
            ))
        };
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            k.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(ShardSpec { index, count })
    }
}

/// What a shard was cut from and made with (its `meta` table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    /// A random id of this shard's run (the merge records it).
    pub shard_id: String,
    pub project_id: String,
    pub spec: ShardSpec,
    pub unet_hash: String,
    pub labeler: String,
    /// The re-mine policy and the mining settings it ran with, as text.
    pub settings: String,
    /// Every image of the shard has an outcome.
    pub finished: bool,
}

/// One image of a shard.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardImage {
    pub name: String,
    /// The image's revision when the shard read it (the merge's compare-and-set).
    pub revision: i64,
    /// `None` until mined; then `mined`, `no_component` or `failed`.
    pub outcome: Option<String>,
    pub error: Option<String>,
}

/// A shard folder's store.
pub struct ShardStore {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Connection,
}

impl ShardStore {
    /// Opens the shard in `dir`, creating it (folder, database, `masks/`) if it has no
    /// database yet.
    pub fn open_or_create(dir: &Path) -> Result<ShardStore> {
        std::fs::create_dir_all(dir.join("masks"))
            .map_err(|e| super::fsutil::write_error(dir, e))?;
        let db_path = dir.join(SHARD_DB);
        let err = super::schema::db_err(&db_path);
        let conn = Connection::open(&db_path).map_err(err)?;
        conn.busy_timeout(super::BUSY_TIMEOUT).map_err(err)?;
        conn.execute_batch(SHARD_SCHEMA)
            .map_err(|e| not_a_shard(&db_path, e))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        Ok(ShardStore {
            dir: dir.to_path_buf(),
            db_path,
            conn,
        })
    }

    /// Opens an existing shard (refuses a folder without one).
    pub fn open(dir: &Path) -> Result<ShardStore> {
        if !dir.join(SHARD_DB).is_file() {
            return Err(StoreError::Invalid(format!(
                "{}: not a mining shard (no {SHARD_DB}; made by `medmine mine --shard K/N \
                 --shard-out DIR`)",
                dir.display()
            )));
        }
        Self::open_or_create(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn db(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.db_path.clone(),
            source,
        }
    }

    /// The shard's identity, `None` while it has none (a new shard).
    pub fn info(&self) -> Result<Option<ShardInfo>> {
        let get = |k: &str| -> Result<Option<String>> {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
                .optional()
                .map_err(|e| self.db(e))
        };
        let Some(shard_id) = get("shard_id")? else {
            return Ok(None);
        };
        let field = |k: &str| -> Result<String> {
            get(k)?.ok_or_else(|| {
                StoreError::Invalid(format!("{}: no '{k}' in its meta", self.db_path.display()))
            })
        };
        let unfinished: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM images WHERE outcome IS NULL",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.db(e))?;
        Ok(Some(ShardInfo {
            shard_id,
            project_id: field("project_id")?,
            spec: field("shard")?.parse()?,
            unet_hash: field("unet_hash")?,
            labeler: field("labeler")?,
            settings: field("settings")?,
            finished: get("selected")?.is_some() && unfinished == 0,
        }))
    }

    /// Records the shard's identity and its images (with the revisions read), in one
    /// transaction: a shard either has both or neither.
    pub fn start(&mut self, info: &ShardInfo, images: &[(String, i64)]) -> Result<()> {
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.conn.transaction().map_err(err)?;
        let spec = info.spec.to_string();
        for (k, v) in [
            ("shard_id", info.shard_id.as_str()),
            ("project_id", &info.project_id),
            ("shard", &spec),
            ("unet_hash", &info.unet_hash),
            ("labeler", &info.labeler),
            ("settings", &info.settings),
            ("selected", &now_rfc3339()),
        ] {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                [k, v],
            )
            .map_err(err)?;
        }
        for (pos, (name, revision)) in images.iter().enumerate() {
            tx.execute(
                "INSERT INTO images (pos, name, revision) VALUES (?1, ?2, ?3)",
                params![pos as i64, name, revision],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    /// The shard's images in order.
    pub fn images(&self) -> Result<Vec<ShardImage>> {
        let mut st = self
            .conn
            .prepare("SELECT name, revision, outcome, error FROM images ORDER BY pos")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(ShardImage {
                    name: r.get(0)?,
                    revision: r.get(1)?,
                    outcome: r.get(2)?,
                    error: r.get(3)?,
                })
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Stores one image's outcome (and, when mined, its rows in order, the last one the
    /// pseudo-label) in one transaction, the mask files durably before it. Writing an image
    /// again (a restarted job) replaces what it had.
    pub fn record(
        &mut self,
        image: &str,
        outcome: &str,
        error: Option<&str>,
        labels: &[NewPseudoLabel],
    ) -> Result<()> {
        let masks = self.dir.join("masks");
        let mut files = Vec::with_capacity(labels.len());
        for l in labels {
            let png = MaskPng::encode(&l.mask)?;
            png.store(&masks)?;
            files.push(png.name);
        }
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.conn.transaction().map_err(err)?;
        tx.execute("DELETE FROM labels WHERE image = ?1", [image])
            .map_err(err)?;
        for (ord, (l, file)) in labels.iter().zip(&files).enumerate() {
            let prompts = serde_json::to_string(&l.prompts)
                .map_err(|e| StoreError::Invalid(format!("{image}: prompts: {e}")))?;
            tx.execute(
                "INSERT INTO labels (image, ord, mask_file, prompts, sam_iou, stability, \
                 agreement, unet_components, label_components, sam_checkpoint, unet_checkpoint, \
                 unet_hash, labeler) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                params![
                    image,
                    ord as i64,
                    file,
                    prompts,
                    l.sam_iou,
                    l.stability,
                    l.agreement,
                    l.unet_components,
                    l.label_components,
                    l.sam_checkpoint,
                    l.unet_checkpoint,
                    l.unet_hash,
                    l.labeler
                ],
            )
            .map_err(err)?;
        }
        let n = tx
            .execute(
                "UPDATE images SET outcome = ?2, error = ?3 WHERE name = ?1",
                params![image, outcome, error],
            )
            .map_err(err)?;
        if n != 1 {
            return Err(StoreError::Invalid(format!(
                "{}: {image} is not one of this shard's images",
                self.db_path.display()
            )));
        }
        tx.commit().map_err(err)
    }

    /// One mined image's rows, in the order they are stored in a project (masks read back).
    pub fn labels(&self, image: &str) -> Result<Vec<NewPseudoLabel>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT ord, mask_file, prompts, sam_iou, stability, agreement, unet_components, \
                 label_components, sam_checkpoint, unet_checkpoint, unet_hash, labeler \
                 FROM labels WHERE image = ?1 ORDER BY ord",
            )
            .map_err(|e| self.db(e))?;
        type Row = (
            i64,
            String,
            String,
            [Option<f64>; 3],
            [Option<i64>; 2],
            [Option<String>; 4],
        );
        let rows: Vec<Row> = st
            .query_map([image], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    [r.get(3)?, r.get(4)?, r.get(5)?],
                    [r.get(6)?, r.get(7)?],
                    [r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?],
                ))
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        rows.into_iter()
            .map(|(ord, file, prompts, q, c, [sam, unet, hash, labeler])| {
                let path = self.dir.join("masks").join(&file);
                let mask = crate::data::load_mask(&path)
                    .map_err(|e| StoreError::Invalid(format!("{}: {e}", path.display())))?;
                let prompts: Prompts = serde_json::from_str(&prompts).map_err(|e| {
                    StoreError::Invalid(format!(
                        "{}: {image}: prompts: {e}",
                        self.db_path.display()
                    ))
                })?;
                Ok(NewPseudoLabel {
                    round: ord,
                    mask,
                    prompts,
                    sam_iou: q[0],
                    stability: q[1],
                    agreement: q[2],
                    unet_components: c[0],
                    label_components: c[1],
                    sam_checkpoint: sam,
                    unet_checkpoint: unet,
                    unet_hash: hash,
                    labeler,
                })
            })
            .collect()
    }
}

fn not_a_shard(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Invalid(format!(
        "{}: not a mining shard's database ({e})",
        path.display()
    ))
}

/// What merging one image of a shard did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeWrite {
    /// Its rows were stored (the image had the revision the shard read).
    Merged,
    /// A person reviewed the image after the shard read it: nothing stored (recorded).
    SkippedReviewed,
    /// This shard's result for the image was merged (or skipped) before.
    AlreadyMerged,
}

/// A shard's merge record: its id and its `K/N`.
#[derive(Clone, Copy, Debug)]
pub struct ShardMark<'a> {
    pub shard_id: &'a str,
    pub shard: &'a str,
}

impl Project {
    /// The project's id (schema v6; shards record it).
    pub fn project_id(&self) -> Result<String> {
        self.meta("project_id")?.ok_or_else(|| {
            StoreError::Invalid(format!(
                "{}: the project has no id (open it once with this medmine to upgrade it)",
                self.db_path().display()
            ))
        })
    }

    /// Merges one image of a shard: unless this shard's result for it is recorded already,
    /// stores `labels` with the compare-and-set of [`Project::add_pseudo_labels_if`] against
    /// `revision` (the one the shard read) and records the outcome in `shard_merges`, in the
    /// same transaction.
    pub fn merge_shard_image(
        &mut self,
        image: &str,
        revision: i64,
        labels: &[NewPseudoLabel],
        mark: ShardMark<'_>,
    ) -> Result<MergeWrite> {
        let rec = self.image(image)?;
        let done: Option<String> = self
            .conn()
            .query_row(
                "SELECT outcome FROM shard_merges WHERE shard_id = ?1 AND image_id = ?2",
                params![mark.shard_id, rec.id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        if done.is_some() {
            return Ok(MergeWrite::AlreadyMerged);
        }
        let guard = super::machine::Guard::Revision(revision);
        let (write, _) =
            self.write_pseudo_labels(image, guard, labels, Rounds::Append, Some(mark))?;
        Ok(match write {
            MachineWrite::Written { .. } => MergeWrite::Merged,
            MachineWrite::Skipped { .. } => {
                // outside the write's transaction: a record of a no-op, written once
                self.conn()
                    .execute(
                        "INSERT OR IGNORE INTO shard_merges (shard_id, shard, image_id, outcome, at) \
                         VALUES (?1, ?2, ?3, 'skipped_reviewed', ?4)",
                        params![mark.shard_id, mark.shard, rec.id, now_rfc3339()],
                    )
                    .map_err(|e| self.db(e))?;
                MergeWrite::SkippedReviewed
            }
        })
    }

    /// Merged shard results: `(shard K/N, shard id, outcome, images)`, by shard.
    pub fn shard_merges(&self) -> Result<Vec<(String, String, String, usize)>> {
        let mut st = self
            .conn()
            .prepare(
                "SELECT shard, shard_id, outcome, count(*) FROM shard_merges \
                 GROUP BY shard_id, shard, outcome ORDER BY shard, shard_id, outcome",
            )
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get::<_, i64>(3)? as usize,
                ))
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }
}

/// Records a merged image inside the write's transaction (see
/// [`Project::merge_shard_image`]).
pub(super) fn mark_merged(
    tx: &rusqlite::Transaction<'_>,
    mark: ShardMark<'_>,
    image_id: i64,
    at: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO shard_merges (shard_id, shard, image_id, outcome, at) \
         VALUES (?1, ?2, ?3, 'mined', ?4)",
        params![mark.shard_id, mark.shard, image_id, at],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_and_partition() {
        let s: ShardSpec = "1/3".parse().unwrap();
        assert_eq!(s, ShardSpec { index: 1, count: 3 });
        assert_eq!(s.to_string(), "1/3");
        assert_eq!(
            (0..7).filter(|&p| s.contains(p)).collect::<Vec<_>>(),
            [1, 4]
        );
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            let e = bad.parse::<ShardSpec>().unwrap_err().to_string();
            assert!(e.contains("K/N"), "{bad}: {e}");
        }
        // every position in exactly one shard
        for p in 0..20 {
            let n = (0..4)
                .filter(|&k| ShardSpec { index: k, count: 4 }.contains(p))
                .count();
            assert_eq!(n, 1);
        }
    }
}
