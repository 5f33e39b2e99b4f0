//! Creating and opening a project: the folder, the database's connection settings, the schema
//! check and upgrade, and the read-only opening of a mining shard's job.
use std::path::Path;

use rusqlite::Connection;

use super::{fsutil, schema, Project, Result, StoreError, BUSY_TIMEOUT, DB_FILE, SUBDIRS};

impl Project {
    /// Creates a new project in `dir` (created with its parents if needed; an existing
    /// folder is fine unless it already holds a project).
    pub fn init(dir: &Path) -> Result<Project> {
        std::fs::create_dir_all(dir).map_err(|e| fsutil::write_error(dir, e))?;
        let db_path = dir.join(DB_FILE);
        if db_path.exists() {
            return Err(StoreError::AlreadyAProject {
                path: dir.to_path_buf(),
            });
        }
        fsutil::check_writable(dir)?;
        for sub in SUBDIRS {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| fsutil::write_error(&p, e))?;
        }
        let mut conn = connect(&db_path)?;
        schema::migrate(&mut conn, &db_path, schema::LATEST)?;
        Ok(Project {
            root: dir.to_path_buf(),
            db_path,
            conn,
        })
    }

    /// Opens an existing project: refuses a read-only folder and a database from a newer
    /// medmine, migrates an older one (after a backup copy), and re-creates missing
    /// sub-folders.
    pub fn open(dir: &Path) -> Result<Project> {
        let db_path = dir.join(DB_FILE);
        if !db_path.is_file() {
            return Err(StoreError::NotAProject {
                path: dir.to_path_buf(),
            });
        }
        fsutil::check_writable(dir)?;
        let len = std::fs::metadata(&db_path)
            .map_err(|e| fsutil::write_error(&db_path, e))?
            .len();
        if len == 0 {
            return Err(StoreError::NotAProjectDb {
                path: db_path,
                reason: "empty file (0 bytes)".into(),
            });
        }
        // a database the user may not read says so (the OS error), not an SQLite error
        if let Err(source) = std::fs::File::open(&db_path) {
            return Err(StoreError::Io {
                path: db_path,
                source,
            });
        }
        let mut conn = connect(&db_path)?;
        let err = schema::db_err(&db_path);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(&err)?;
        let has_images: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'images')",
                [],
                |r| r.get(0),
            )
            .map_err(&err)?;
        if version == 0 || !has_images {
            return Err(StoreError::NotAProjectDb {
                path: db_path,
                reason: "an SQLite file without medmine's tables".into(),
            });
        }
        for sub in SUBDIRS {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(|e| fsutil::write_error(&p, e))?;
        }
        schema::upgrade(&mut conn, &db_path)?;
        Ok(Project {
            root: dir.to_path_buf(),
            db_path,
            conn,
        })
    }

    /// Opens an existing project for reading only (a mining shard's job: it never writes the
    /// project, which may sit on a network file system or a read-only mount). The schema must
    /// be this medmine's: an older project is upgraded by opening it once normally. Where
    /// SQLite cannot open the database read-only in place (a read-only folder: no WAL index
    /// can be made beside it), it is opened as immutable, which skips locking: fine for a
    /// snapshot nobody writes while the job runs, stated in the README's cluster section.
    pub fn open_read_only(dir: &Path) -> Result<Project> {
        let db_path = dir.join(DB_FILE);
        if !db_path.is_file() {
            return Err(StoreError::NotAProject {
                path: dir.to_path_buf(),
            });
        }
        let err = schema::db_err(&db_path);
        let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        let open = |uri: String| -> rusqlite::Result<(Connection, i64)> {
            let conn = Connection::open_with_flags(uri, flags)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            let version = schema::user_version(&conn)?;
            Ok((conn, version))
        };
        let uri = sqlite_uri(&db_path);
        let (conn, version) = match open(uri.clone()) {
            Ok(v) => v,
            Err(first) => {
                tracing::info!(
                    "{}: read-only open failed ({first}); opening it as immutable",
                    db_path.display()
                );
                open(format!("{uri}?immutable=1")).map_err(err)?
            }
        };
        if version != schema::LATEST {
            return Err(StoreError::Invalid(format!(
                "{}: schema version {version}, this medmine reads version {} read-only: {}",
                db_path.display(),
                schema::LATEST,
                if version < schema::LATEST {
                    "open the project once with this medmine (e.g. `medmine project status`) to \
                     upgrade it"
                } else {
                    "it was written by a newer medmine"
                }
            )));
        }
        Ok(Project {
            root: dir.to_path_buf(),
            db_path,
            conn,
        })
    }
}

/// `file:` URI of a database path (`%`, `?` and `#` escaped).
fn sqlite_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri
}

/// Opens the database file with the project's connection settings (busy timeout, foreign
/// keys, WAL, synchronous=FULL). Writes nothing but the journal mode.
pub(super) fn connect(db_path: &Path) -> Result<Connection> {
    let db = |source| StoreError::Db {
        path: db_path.to_path_buf(),
        source,
    };
    let conn = Connection::open(db_path).map_err(db)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
    Ok(conn)
}

/// Sets WAL mode and full synchronous commits (called once the schema version is known to
/// be one this medmine can use, so a future database is never touched).
pub(super) fn set_journal(conn: &Connection, db_path: &Path) -> Result<()> {
    let db = |source| StoreError::Db {
        path: db_path.to_path_buf(),
        source,
    };
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(db)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Invalid(format!(
            "{}: could not switch the database to WAL mode (journal mode is {mode})",
            db_path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db)?;
    Ok(())
}
