//! The database schema: an ordered list of migrations; `PRAGMA user_version` is the number
//! of migrations applied.
//!
//! Opening a project ([`upgrade`]) reads the version first and
//! * refuses a version newer than [`LATEST`] without writing anything;
//! * for an older version copies the database to `medmine.db.bak-v{old}` (a consistent copy
//!   made with `VACUUM INTO`) and then applies the missing migrations and the new version
//!   number in one transaction.
//!
//! A migration is never edited once released: changes are new entries at the end.
use std::path::{Path, PathBuf};

use rusqlite::{Connection, TransactionBehavior};

use super::{Result, StoreError};

/// Migration `i` brings the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // v1: images, ground truth, pseudo-labels, review state and log, mask edit history.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE images (
        id       INTEGER PRIMARY KEY,
        name     TEXT NOT NULL UNIQUE,
        path     TEXT NOT NULL,
        sha256   TEXT NOT NULL,
        width    INTEGER NOT NULL CHECK (width > 0),
        height   INTEGER NOT NULL CHECK (height > 0),
        role     TEXT NOT NULL CHECK (role IN ('labelled', 'unlabelled', 'val', 'test')),
        added_at TEXT NOT NULL
    );
    CREATE INDEX images_sha256 ON images(sha256);
    CREATE TABLE gt_masks (
        image_id    INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
        mask_file   TEXT NOT NULL,
        source_path TEXT NOT NULL,
        foreground  INTEGER NOT NULL
    );
    CREATE TABLE pseudo_labels (
        id              INTEGER PRIMARY KEY,
        image_id        INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        round           INTEGER NOT NULL CHECK (round >= 0),
        mask_file       TEXT NOT NULL,
        prompts         TEXT NOT NULL,
        sam_iou         REAL,
        stability       REAL,
        agreement       REAL,
        sam_checkpoint  TEXT,
        unet_checkpoint TEXT,
        created_at      TEXT NOT NULL,
        UNIQUE (image_id, round)
    );
    CREATE TABLE mask_versions (
        id        INTEGER PRIMARY KEY,
        image_id  INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        seq       INTEGER NOT NULL,
        parent_id INTEGER REFERENCES mask_versions(id),
        mask_file TEXT NOT NULL,
        author    TEXT,
        at        TEXT NOT NULL,
        note      TEXT,
        UNIQUE (image_id, seq)
    );
    CREATE TABLE reviews (
        image_id        INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
        state           TEXT NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'accepted', 'rejected', 'edited')),
        reviewer        TEXT,
        at              TEXT,
        note            TEXT,
        mask_version_id INTEGER REFERENCES mask_versions(id)
    );
    CREATE TABLE review_log (
        id              INTEGER PRIMARY KEY,
        image_id        INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        action          TEXT NOT NULL,
        state           TEXT NOT NULL,
        reviewer        TEXT,
        at              TEXT NOT NULL,
        note            TEXT,
        pseudo_label_id INTEGER REFERENCES pseudo_labels(id),
        mask_version_id INTEGER REFERENCES mask_versions(id)
    );
    CREATE INDEX review_log_image ON review_log(image_id);
    "#,
    // v2: model predictions and training runs.
    r#"
    CREATE TABLE predictions (
        id         INTEGER PRIMARY KEY,
        image_id   INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        model      TEXT NOT NULL,
        mask_file  TEXT NOT NULL,
        probs_file TEXT,
        created_at TEXT NOT NULL,
        UNIQUE (image_id, model)
    );
    CREATE TABLE training_runs (
        id              INTEGER PRIMARY KEY,
        name            TEXT NOT NULL,
        config          TEXT NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ('running', 'done', 'cancelled', 'failed')),
        dir             TEXT NOT NULL,
        best_checkpoint TEXT,
        last_checkpoint TEXT,
        started_at      TEXT NOT NULL,
        finished_at     TEXT,
        message         TEXT
    );
    CREATE TABLE run_epochs (
        run_id       INTEGER NOT NULL REFERENCES training_runs(id) ON DELETE CASCADE,
        epoch        INTEGER NOT NULL,
        train_loss   REAL NOT NULL,
        val_dice     REAL,
        val_iou      REAL,
        lr           REAL NOT NULL,
        seconds      REAL NOT NULL,
        images_per_s REAL NOT NULL,
        best         INTEGER NOT NULL,
        PRIMARY KEY (run_id, epoch)
    );
    "#,
    // v3: connected-component counts of the U-Net++ prediction and of the pseudo-label (their
    // change is a quality signal); NULL for labels stored before.
    r#"
    ALTER TABLE pseudo_labels ADD COLUMN unet_components INTEGER
        CHECK (unet_components IS NULL OR unet_components >= 0);
    ALTER TABLE pseudo_labels ADD COLUMN label_components INTEGER
        CHECK (label_components IS NULL OR label_components >= 0);
    "#,
    // v4: a per-image revision, bumped by every write to the image's review (human or machine),
    // so machine writes can compare-and-set; the content hash of the U-Net++ checkpoint and the
    // labeler's identity of each pseudo-label (NULL for labels stored before).
    r#"
    ALTER TABLE images ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE pseudo_labels ADD COLUMN unet_hash TEXT;
    ALTER TABLE pseudo_labels ADD COLUMN labeler TEXT;
    "#,
    // v5: the radiologist's view: a display window per image (the project's default window
    // is the `meta` key `view_window`), and cached per-image scores of the U-Net++
    // prediction and of the newest pseudo-label (`source`), valid for `ref` (the model
    // checkpoint, or the pseudo-label's mask file).
    r#"
    CREATE TABLE image_windows (
        image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
        center   REAL NOT NULL,
        width    REAL NOT NULL CHECK (width > 0),
        unit     TEXT NOT NULL
    );
    CREATE TABLE image_scores (
        image_id    INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        source      TEXT NOT NULL CHECK (source IN ('unet', 'pseudo')),
        ref         TEXT NOT NULL,
        dice        REAL,
        uncertainty REAL,
        at          TEXT NOT NULL,
        PRIMARY KEY (image_id, source)
    );
    "#,
    // v6: mining on a cluster: the project's id (shards name the project they were cut from),
    // and which shard's result each merged image took (`outcome`: mined, or skipped because a
    // person reviewed the image after the shard read it), so a merge is applied once.
    r#"
    INSERT OR IGNORE INTO meta (key, value) VALUES ('project_id', lower(hex(randomblob(16))));
    CREATE TABLE shard_merges (
        shard_id TEXT NOT NULL,
        shard    TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        outcome  TEXT NOT NULL CHECK (outcome IN ('mined', 'skipped_reviewed')),
        at       TEXT NOT NULL,
        PRIMARY KEY (shard_id, image_id)
    );
    "#,
];

/// The schema version this medmine writes and understands.
pub const LATEST: i64 = MIGRATIONS.len() as i64;

/// `PRAGMA user_version`.
pub fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Maps a SQLite error on the database `path` to [`StoreError::Db`].
pub(crate) fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    move |source| StoreError::Db {
        path: path.to_path_buf(),
        source,
    }
}

/// Number of tables in the database (0 for a new, empty file).
fn table_count(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
        [],
        |r| r.get(0),
    )
}

/// Brings an opened project database to [`LATEST`] (see the module docs).
pub fn upgrade(conn: &mut Connection, db_path: &Path) -> Result<()> {
    let err = db_err(db_path);
    let found = user_version(conn).map_err(&err)?;
    if found > LATEST {
        return Err(StoreError::FutureSchema {
            path: db_path.to_path_buf(),
            found,
            supported: LATEST,
        });
    }
    if found == 0 && table_count(conn).map_err(&err)? > 0 {
        return Err(StoreError::ForeignDatabase {
            path: db_path.to_path_buf(),
            reason: "it has tables but no medmine schema version".into(),
        });
    }
    if found < 0 {
        return Err(StoreError::ForeignDatabase {
            path: db_path.to_path_buf(),
            reason: format!("schema version {found} is negative"),
        });
    }
    if found > 0 && found < LATEST {
        backup(conn, db_path, found)?;
    }
    migrate(conn, db_path, LATEST)
}

/// The backup path for a database of schema version `version`: `medmine.db.bak-v{version}`,
/// or with a numeric suffix when that exists already.
pub fn backup_path(db_path: &Path, version: i64) -> PathBuf {
    let base = format!(
        "{}.bak-v{version}",
        db_path.file_name().and_then(|n| n.to_str()).unwrap_or("db")
    );
    let first = db_path.with_file_name(&base);
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|i| db_path.with_file_name(format!("{base}.{i}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

fn backup(conn: &Connection, db_path: &Path, version: i64) -> Result<PathBuf> {
    let target = backup_path(db_path, version);
    let Some(target_str) = target.to_str() else {
        return Err(StoreError::Invalid(format!(
            "{}: backup path is not valid UTF-8",
            target.display()
        )));
    };
    conn.execute("VACUUM INTO ?1", [target_str])
        .map_err(db_err(db_path))?;
    // VACUUM INTO does not fsync its output.
    super::fsutil::fsync_file_and_dir(&target)?;
    tracing::info!(
        "{}: schema v{version} backed up to {} before migrating",
        db_path.display(),
        target.display()
    );
    Ok(target)
}

/// Applies the migrations from the current version up to `target` in one immediate
/// transaction (the version is re-read inside it, so concurrent openers migrate once),
/// then sets WAL mode.
pub fn migrate(conn: &mut Connection, db_path: &Path, target: i64) -> Result<()> {
    let err = db_err(db_path);
    let current = user_version(conn).map_err(&err)?;
    if current < target {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let current = user_version(&tx).map_err(&err)?;
        for (i, sql) in MIGRATIONS
            .iter()
            .enumerate()
            .take(target as usize)
            .skip(current.max(0) as usize)
        {
            tx.execute_batch(sql).map_err(|source| StoreError::Db {
                path: db_path.to_path_buf(),
                source,
            })?;
            tracing::debug!("{}: migrated to schema v{}", db_path.display(), i + 1);
        }
        tx.pragma_update(None, "user_version", target)
            .map_err(&err)?;
        tx.commit().map_err(&err)?;
    }
    super::set_journal(conn, db_path)
}

/// Creates a database at schema version `version` (for tests of migration and of refusing
/// future databases). `version > LATEST` gives the latest schema with a larger number.
#[doc(hidden)]
pub fn create_with_version(db_path: &Path, version: i64) -> Result<()> {
    let mut conn = super::connect(db_path)?;
    migrate(&mut conn, db_path, version.min(LATEST))?;
    if version > LATEST {
        conn.pragma_update(None, "user_version", version)
            .map_err(db_err(db_path))?;
    }
    Ok(())
}
