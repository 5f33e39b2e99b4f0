//! A person's review actions (accept, reject, pending, mask edits with undo/redo), reading
//! pseudo-labels, and the review log. The machine's writes are in [`super::machine`].
//!
//! Each public write is one `BEGIN IMMEDIATE` transaction committed before the call
//! returns; a mask file is written durably before the row that points to it. Every write to
//! an image's review goes through [`record`], which also bumps the image's revision.
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};

use super::fsutil::MaskPng;
use super::records::{MaskVersion, Prompts, PseudoLabel, Review, ReviewEvent};
use super::{now_rfc3339, ImageRecord, Project, Result, ReviewState, StoreError};
use crate::data::Mask;

const PSEUDO_SELECT: &str = "SELECT p.id, i.name, p.round, p.mask_file, p.prompts, p.sam_iou,
    p.stability, p.agreement, p.sam_checkpoint, p.unet_checkpoint, p.created_at,
    p.unet_components, p.label_components, p.unet_hash, p.labeler
    FROM pseudo_labels p JOIN images i ON i.id = p.image_id";

const VERSION_SELECT: &str = "SELECT v.id, i.name, v.seq, v.parent_id, v.mask_file, v.author,
    v.at, v.note FROM mask_versions v JOIN images i ON i.id = v.image_id";

const LOG_SELECT: &str = "SELECT l.id, i.name, l.action, l.state, l.reviewer, l.at, l.note,
    l.pseudo_label_id, l.mask_version_id FROM review_log l JOIN images i ON i.id = l.image_id";

fn pseudo_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(PseudoLabel, String)> {
    let prompts: String = r.get(4)?;
    Ok((
        PseudoLabel {
            id: r.get(0)?,
            image: r.get(1)?,
            round: r.get(2)?,
            mask_file: r.get(3)?,
            prompts: Prompts::default(),
            sam_iou: r.get(5)?,
            stability: r.get(6)?,
            agreement: r.get(7)?,
            unet_components: r.get(11)?,
            label_components: r.get(12)?,
            sam_checkpoint: r.get(8)?,
            unet_checkpoint: r.get(9)?,
            unet_hash: r.get(13)?,
            labeler: r.get(14)?,
            created_at: r.get(10)?,
        },
        prompts,
    ))
}

fn version_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<MaskVersion> {
    Ok(MaskVersion {
        id: r.get(0)?,
        image: r.get(1)?,
        seq: r.get(2)?,
        parent_id: r.get(3)?,
        mask_file: r.get(4)?,
        author: r.get(5)?,
        at: r.get(6)?,
        note: r.get(7)?,
    })
}

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReviewEvent> {
    Ok(ReviewEvent {
        id: r.get(0)?,
        image: r.get(1)?,
        action: r.get(2)?,
        state: r.get(3)?,
        reviewer: r.get(4)?,
        at: r.get(5)?,
        note: r.get(6)?,
        pseudo_label_id: r.get(7)?,
        mask_version_id: r.get(8)?,
    })
}

/// Who did an action and why (both optional).
#[derive(Clone, Copy, Debug, Default)]
pub struct Actor<'a> {
    pub reviewer: Option<&'a str>,
    pub note: Option<&'a str>,
}

/// Sets the review row, appends to the log and bumps the image's revision inside `tx`;
/// returns the log entry id. Every write to an image's review, a person's or the machine's,
/// goes through here.
pub(super) fn record(
    tx: &Transaction<'_>,
    image_id: i64,
    action: &str,
    state: ReviewState,
    actor: Actor<'_>,
    mask_version: Option<i64>,
    at: &str,
) -> rusqlite::Result<i64> {
    let pseudo: Option<i64> = tx
        .query_row(
            "SELECT id FROM pseudo_labels WHERE image_id = ?1 ORDER BY round DESC LIMIT 1",
            [image_id],
            |r| r.get(0),
        )
        .optional()?;
    tx.execute(
        "INSERT INTO reviews (image_id, state, reviewer, at, note, mask_version_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(image_id) DO UPDATE SET state = excluded.state,
           reviewer = excluded.reviewer, at = excluded.at, note = excluded.note,
           mask_version_id = excluded.mask_version_id",
        params![
            image_id,
            state,
            actor.reviewer,
            at,
            actor.note,
            mask_version
        ],
    )?;
    tx.execute(
        "INSERT INTO review_log (image_id, action, state, reviewer, at, note, pseudo_label_id,
           mask_version_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            image_id,
            action,
            state,
            actor.reviewer,
            at,
            actor.note,
            pseudo,
            mask_version
        ],
    )?;
    let id = tx.last_insert_rowid();
    tx.execute(
        "UPDATE images SET revision = revision + 1 WHERE id = ?1",
        [image_id],
    )?;
    Ok(id)
}

/// Whether the image has a pseudo-label of any round.
fn has_pseudo_label(tx: &Transaction<'_>, image_id: i64) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM pseudo_labels WHERE image_id = ?1)",
        [image_id],
        |r| r.get(0),
    )
}

pub(super) fn current_version(
    tx: &Transaction<'_>,
    image_id: i64,
) -> rusqlite::Result<Option<i64>> {
    Ok(tx
        .query_row(
            "SELECT mask_version_id FROM reviews WHERE image_id = ?1",
            [image_id],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()?
        .flatten())
}

impl Project {
    pub(super) fn check_mask_size(&self, rec: &ImageRecord, mask: &Mask) -> Result<()> {
        if (mask.width, mask.height) != (rec.width, rec.height) {
            return Err(StoreError::MaskSize {
                name: rec.name.clone(),
                mask_w: mask.width,
                mask_h: mask.height,
                image_w: rec.width,
                image_h: rec.height,
            });
        }
        Ok(())
    }

    pub(super) fn begin(&mut self) -> Result<Transaction<'_>> {
        let path = self.db_path.clone();
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|source| StoreError::Db { path, source })
    }

    /// Sets the review state of each image (one transaction for the whole list: all or
    /// nothing) and returns the log entries. Accepting an image with neither a pseudo-label
    /// nor an edited mask is refused with [`StoreError::NothingToAccept`]. An edited mask stays the current mask unless
    /// the new state is `pending` or `rejected`.
    pub fn set_review(
        &mut self,
        images: &[&str],
        state: ReviewState,
        actor: Actor<'_>,
    ) -> Result<Vec<ReviewEvent>> {
        if state == ReviewState::Edited {
            return Err(StoreError::Invalid(
                "the edited state is set by saving an edited mask, not directly".into(),
            ));
        }
        let recs: Vec<ImageRecord> = images
            .iter()
            .map(|n| self.image(n))
            .collect::<Result<_>>()?;
        let at = now_rfc3339();
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.begin()?;
        let mut ids = Vec::new();
        for rec in &recs {
            let version = match state {
                ReviewState::Accepted => current_version(&tx, rec.id).map_err(err)?,
                _ => None,
            };
            // Checked inside the transaction: a pseudo-label mined meanwhile counts.
            if state == ReviewState::Accepted
                && version.is_none()
                && !has_pseudo_label(&tx, rec.id).map_err(err)?
            {
                return Err(StoreError::NothingToAccept {
                    name: rec.name.clone(),
                });
            }
            ids.push(record(&tx, rec.id, "review", state, actor, version, &at).map_err(err)?);
        }
        tx.commit().map_err(err)?;
        self.events_by_ids(&ids)
    }

    /// The current review of an image.
    pub fn review(&self, image: &str) -> Result<Review> {
        let rec = self.image(image)?;
        let (revision, row) = self
            .conn
            .query_row(
                "SELECT i.revision, r.image_id, r.state, r.reviewer, r.at, r.note,
                   r.mask_version_id
                 FROM images i LEFT JOIN reviews r ON r.image_id = i.id WHERE i.id = ?1",
                [rec.id],
                |r| {
                    let found: Option<i64> = r.get(1)?;
                    let row = match found {
                        Some(_) => Some((r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
                        None => None,
                    };
                    Ok((r.get(0)?, row))
                },
            )
            .map_err(|e| self.db(e))?;
        let (state, reviewer, at, note, mask_version) =
            row.unwrap_or((ReviewState::Pending, None, None, None, None));
        Ok(Review {
            image: rec.name,
            state,
            reviewer,
            at,
            note,
            mask_version,
            revision,
        })
    }

    pub(super) fn pseudo_labels_where(&self, filter: &str, name: &str) -> Result<Vec<PseudoLabel>> {
        let sql = format!("{PSEUDO_SELECT} WHERE i.name = ?1 {filter}");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([name], pseudo_from_row)
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        rows.into_iter()
            .map(|(mut p, json)| {
                p.prompts = serde_json::from_str(&json).map_err(|source| StoreError::Json {
                    path: self.db_path.clone(),
                    what: "prompts",
                    source,
                })?;
                Ok(p)
            })
            .collect()
    }

    /// Every pseudo-label of an image, oldest round first.
    pub fn pseudo_labels(&self, image: &str) -> Result<Vec<PseudoLabel>> {
        let rec = self.image(image)?;
        self.pseudo_labels_where("ORDER BY p.round", &rec.name)
    }

    /// The pseudo-label of the newest round, if any.
    pub fn latest_pseudo_label(&self, image: &str) -> Result<Option<PseudoLabel>> {
        let rec = self.image(image)?;
        Ok(self
            .pseudo_labels_where("ORDER BY p.round DESC LIMIT 1", &rec.name)?
            .pop())
    }

    /// Saves a corrected mask as a new version (child of the current one); the image
    /// becomes `edited`.
    pub fn save_edit(&mut self, image: &str, mask: &Mask, actor: Actor<'_>) -> Result<MaskVersion> {
        let rec = self.image(image)?;
        self.check_mask_size(&rec, mask)?;
        let masks_dir = self.masks_dir();
        let png = MaskPng::encode(mask)?;
        png.store(&masks_dir)?;
        let file = png.name.clone();
        let at = now_rfc3339();
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.begin()?;
        // A refused machine write may have removed an identical file it had just created.
        png.store(&masks_dir)?;
        let parent = current_version(&tx, rec.id).map_err(err)?;
        let seq: i64 = tx
            .query_row(
                "SELECT coalesce(max(seq), 0) + 1 FROM mask_versions WHERE image_id = ?1",
                [rec.id],
                |r| r.get(0),
            )
            .map_err(err)?;
        tx.execute(
            "INSERT INTO mask_versions (image_id, seq, parent_id, mask_file, author, at, note)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![rec.id, seq, parent, file, actor.reviewer, at, actor.note],
        )
        .map_err(err)?;
        let id = tx.last_insert_rowid();
        record(
            &tx,
            rec.id,
            "edit",
            ReviewState::Edited,
            actor,
            Some(id),
            &at,
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        self.mask_version(id)
    }

    fn mask_version(&self, id: i64) -> Result<MaskVersion> {
        let sql = format!("{VERSION_SELECT} WHERE v.id = ?1");
        self.conn
            .query_row(&sql, [id], version_from_row)
            .map_err(|e| self.db(e))
    }

    /// Every saved version of an image's mask, oldest first.
    pub fn mask_history(&self, image: &str) -> Result<Vec<MaskVersion>> {
        let rec = self.image(image)?;
        let sql = format!("{VERSION_SELECT} WHERE v.image_id = ?1 ORDER BY v.seq");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([rec.id], version_from_row)
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Undo: the current mask becomes the parent version (state stays `edited`), or, at the
    /// first version, the pseudo-label as proposed (state `pending`). `None` when there is
    /// nothing to undo.
    pub fn undo_edit(&mut self, image: &str, actor: Actor<'_>) -> Result<Option<ReviewEvent>> {
        self.move_version(image, actor, true)
    }

    /// Redo: the newest child of the current version becomes current again. `None` when
    /// there is nothing to redo.
    pub fn redo_edit(&mut self, image: &str, actor: Actor<'_>) -> Result<Option<ReviewEvent>> {
        self.move_version(image, actor, false)
    }

    fn move_version(
        &mut self,
        image: &str,
        actor: Actor<'_>,
        undo: bool,
    ) -> Result<Option<ReviewEvent>> {
        let rec = self.image(image)?;
        let at = now_rfc3339();
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.begin()?;
        let current = current_version(&tx, rec.id).map_err(err)?;
        let target: Option<Option<i64>> = if undo {
            match current {
                None => None,
                Some(c) => Some(
                    tx.query_row(
                        "SELECT parent_id FROM mask_versions WHERE id = ?1",
                        [c],
                        |r| r.get(0),
                    )
                    .map_err(err)?,
                ),
            }
        } else {
            tx.query_row(
                "SELECT id FROM mask_versions WHERE image_id = ?1 AND parent_id IS ?2
                 ORDER BY seq DESC LIMIT 1",
                params![rec.id, current],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?
            .map(Some)
        };
        let Some(target) = target else {
            return Ok(None);
        };
        let state = if target.is_some() {
            ReviewState::Edited
        } else {
            ReviewState::Pending
        };
        let action = if undo { "undo" } else { "redo" };
        let id = record(&tx, rec.id, action, state, actor, target, &at).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(self.events_by_ids(&[id])?.pop())
    }

    /// The mask an accepted or edited image would be trained with: the current edited
    /// version, else the newest pseudo-label. `(file path, "edited" | "pseudo_label")`.
    pub fn current_mask(&self, image: &str) -> Result<Option<(std::path::PathBuf, &'static str)>> {
        let review = self.review(image)?;
        if let Some(v) = review.mask_version {
            let v = self.mask_version(v)?;
            return Ok(Some((self.masks_dir().join(v.mask_file), "edited")));
        }
        Ok(self
            .latest_pseudo_label(image)?
            .map(|p| (self.masks_dir().join(p.mask_file), "pseudo_label")))
    }

    pub(super) fn events_by_ids(&self, ids: &[i64]) -> Result<Vec<ReviewEvent>> {
        let sql = format!("{LOG_SELECT} WHERE l.id = ?1");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.db(e))?;
        ids.iter()
            .map(|id| stmt.query_row([id], event_from_row).map_err(|e| self.db(e)))
            .collect()
    }

    /// The whole review log, oldest first.
    pub fn review_log(&self) -> Result<Vec<ReviewEvent>> {
        let sql = format!("{LOG_SELECT} ORDER BY l.id");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([], event_from_row)
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }
}
