//! The machine's writes: pseudo-labels and acceptance by quality score. Each is a
//! compare-and-set inside one `BEGIN IMMEDIATE` transaction: it re-reads the image's revision
//! and review state there and writes only when the image is still as the machine left it
//! (see "Who wrote what, and who wins" in the [module docs](super)).
use rusqlite::{params, Transaction};

use super::fsutil::MaskPng;
use super::records::{NewPseudoLabel, PseudoLabel, ReviewEvent};
use super::review::{current_version, record, Actor};
use super::{now_rfc3339, quality_score, ImageRecord, Project, Result, ReviewState, StoreError};

/// The reviewer recorded on the machine's `pseudo_label` log entries.
pub const MACHINE_REVIEWER: &str = "medmine";

/// Result of a machine write (compare-and-set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineWrite {
    /// Written; the image's revision after the write.
    Written { revision: i64 },
    /// Left alone: a person changed the image since the machine read it (revision differs,
    /// or its state is accepted/edited). Nothing was written.
    Skipped { state: ReviewState, revision: i64 },
}

impl MachineWrite {
    /// Whether the write happened.
    pub fn is_written(self) -> bool {
        matches!(self, MachineWrite::Written { .. })
    }
}

/// What [`Project::accept_by_quality`] did, all in one transaction.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchAccept {
    /// The pending images accepted now (their `auto_accept` log entries).
    pub accepted: Vec<ReviewEvent>,
    /// Images whose newest pseudo-label meets the score but that are not pending (a person,
    /// or an earlier acceptance, decided on them): left as they are, with their state.
    pub skipped: Vec<(String, ReviewState)>,
    /// Pending images whose newest pseudo-label is below the score or has none.
    pub below: usize,
}

/// What a machine write requires of the image, checked inside its transaction.
#[derive(Clone, Copy, Debug)]
pub(super) enum Guard {
    /// The revision the machine read, and a state of pending or rejected.
    Revision(i64),
    /// Only a state of pending or rejected (no person accepted or edited it).
    Undecided,
}

/// Where the rows of a pseudo-label write go.
#[derive(Clone, Copy, Debug)]
pub(super) enum Rounds {
    /// `base, base + 1, …` after the image's highest stored round.
    Append,
    /// The label's own `round`, replacing a stored row of that round.
    AsGiven,
}

/// The image's review state and revision, read inside `tx`.
fn image_now(tx: &Transaction<'_>, image_id: i64) -> rusqlite::Result<(ReviewState, i64)> {
    tx.query_row(
        "SELECT coalesce(r.state, 'pending'), i.revision
         FROM images i LEFT JOIN reviews r ON r.image_id = i.id WHERE i.id = ?1",
        [image_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Whether any row references the mask file `name`.
fn mask_referenced(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<bool> {
    tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM gt_masks WHERE mask_file = ?1)
           OR EXISTS (SELECT 1 FROM pseudo_labels WHERE mask_file = ?1)
           OR EXISTS (SELECT 1 FROM mask_versions WHERE mask_file = ?1)
           OR EXISTS (SELECT 1 FROM predictions WHERE mask_file = ?1)",
        [name],
        |r| r.get(0),
    )
}

fn insert_label(
    tx: &Transaction<'_>,
    image_id: i64,
    round: i64,
    file: &str,
    label: &NewPseudoLabel,
    at: &str,
) -> Result<(), rusqlite::Error> {
    let prompts = serde_json::to_string(&label.prompts)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    tx.execute(
        "INSERT INTO pseudo_labels (image_id, round, mask_file, prompts, sam_iou, stability,
           agreement, sam_checkpoint, unet_checkpoint, created_at, unet_components,
           label_components, unet_hash, labeler)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT(image_id, round) DO UPDATE SET mask_file = excluded.mask_file,
           prompts = excluded.prompts, sam_iou = excluded.sam_iou,
           stability = excluded.stability, agreement = excluded.agreement,
           sam_checkpoint = excluded.sam_checkpoint,
           unet_checkpoint = excluded.unet_checkpoint, created_at = excluded.created_at,
           unet_components = excluded.unet_components,
           label_components = excluded.label_components,
           unet_hash = excluded.unet_hash, labeler = excluded.labeler",
        params![
            image_id,
            round,
            file,
            prompts,
            label.sam_iou,
            label.stability,
            label.agreement,
            label.sam_checkpoint,
            label.unet_checkpoint,
            at,
            label.unet_components,
            label.label_components,
            label.unet_hash,
            label.labeler
        ],
    )?;
    Ok(())
}

impl Project {
    /// Machine write: inside one `BEGIN IMMEDIATE` transaction, checks that the image's
    /// revision is still `expected_revision` (as read with [`Project::review`]) and its state
    /// pending or rejected; then stores all `labels` as pseudo-label rows with rounds `base,
    /// base + 1, …` (`base` one past the image's highest stored round, 0 if none; the labels'
    /// own `round` is ignored), the last label being the newest row (the one reviewed), logs
    /// one `pseudo_label` entry (state pending, reviewer [`MACHINE_REVIEWER`]) and bumps the
    /// revision. The mask files are written durably before the transaction; when the image
    /// changed, nothing is written and the mask files this call created are removed.
    pub fn add_pseudo_labels_if(
        &mut self,
        image: &str,
        expected_revision: i64,
        labels: &[NewPseudoLabel],
    ) -> Result<MachineWrite> {
        let guard = Guard::Revision(expected_revision);
        Ok(self
            .write_pseudo_labels(image, guard, labels, Rounds::Append, None)?
            .0)
    }

    /// Stores one pseudo-label (mask file first, then the row) with its own `round`
    /// (replacing a stored row of that round) and puts the image back to `pending` review,
    /// unless a person decided on it: an accepted or edited image is refused with
    /// [`StoreError::Decided`] and nothing is stored (a rejected one is re-labelled). The
    /// check happens inside the write's transaction, like [`Project::add_pseudo_labels_if`].
    pub fn add_pseudo_label(&mut self, image: &str, label: &NewPseudoLabel) -> Result<PseudoLabel> {
        let labels = std::slice::from_ref(label);
        let (write, name) =
            self.write_pseudo_labels(image, Guard::Undecided, labels, Rounds::AsGiven, None)?;
        if let MachineWrite::Skipped { state, .. } = write {
            return Err(StoreError::Decided { name, state });
        }
        self.latest_pseudo_label(&name)?.ok_or_else(|| {
            StoreError::Invalid(format!("pseudo-label of {name} vanished after commit"))
        })
    }

    fn check_label(&self, rec: &ImageRecord, label: &NewPseudoLabel) -> Result<()> {
        self.check_mask_size(rec, &label.mask)?;
        for (what, n) in [
            ("U-Net++ component count", label.unet_components),
            ("pseudo-label component count", label.label_components),
        ] {
            if let Some(n) = n.filter(|n| *n < 0) {
                return Err(StoreError::Invalid(format!(
                    "{}: {what} {n} is negative",
                    rec.name
                )));
            }
        }
        Ok(())
    }

    /// The compare-and-set behind both pseudo-label writes; returns the outcome and the
    /// image's name.
    /// The machine's pseudo-label write; `mark` also records a merged shard's image in the
    /// same transaction ([`super::shard`]).
    pub(super) fn write_pseudo_labels(
        &mut self,
        image: &str,
        guard: Guard,
        labels: &[NewPseudoLabel],
        rounds: Rounds,
        mark: Option<super::shard::ShardMark<'_>>,
    ) -> Result<(MachineWrite, String)> {
        let rec = self.image(image)?;
        if labels.is_empty() {
            return Err(StoreError::Invalid(format!(
                "{}: no pseudo-label to store",
                rec.name
            )));
        }
        for label in labels {
            self.check_label(&rec, label)?;
        }
        let masks_dir = self.masks_dir();
        let mut pngs = Vec::with_capacity(labels.len());
        let mut created = Vec::new();
        for label in labels {
            let png = MaskPng::encode(&label.mask)?;
            if png.store(&masks_dir)? {
                created.push(png.name.clone());
            }
            pngs.push(png);
        }
        let at = now_rfc3339();
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.begin()?;
        let (state, revision) = image_now(&tx, rec.id).map_err(err)?;
        let allowed = matches!(state, ReviewState::Pending | ReviewState::Rejected)
            && match guard {
                Guard::Revision(expected) => revision == expected,
                Guard::Undecided => true,
            };
        if !allowed {
            // Under the write lock: a writer that found one of these files already there
            // checks again inside its own transaction and rewrites it.
            for name in &created {
                if !mask_referenced(&tx, name).map_err(err)? {
                    let path = masks_dir.join(name);
                    if let Err(e) = std::fs::remove_file(&path) {
                        tracing::warn!("{}: could not remove: {e}", path.display());
                    }
                }
            }
            return Ok((MachineWrite::Skipped { state, revision }, rec.name));
        }
        // A refused write elsewhere may have removed an identical file this call found.
        for png in &pngs {
            png.store(&masks_dir)?;
        }
        let base: i64 = tx
            .query_row(
                "SELECT coalesce(max(round) + 1, 0) FROM pseudo_labels WHERE image_id = ?1",
                [rec.id],
                |r| r.get(0),
            )
            .map_err(err)?;
        for (k, (label, png)) in labels.iter().zip(&pngs).enumerate() {
            let round = match rounds {
                Rounds::Append => base + k as i64,
                Rounds::AsGiven => label.round,
            };
            insert_label(&tx, rec.id, round, &png.name, label, &at).map_err(err)?;
        }
        let actor = Actor {
            reviewer: Some(MACHINE_REVIEWER),
            note: Some("new pseudo-label"),
        };
        record(
            &tx,
            rec.id,
            "pseudo_label",
            ReviewState::Pending,
            actor,
            None,
            &at,
        )
        .map_err(err)?;
        if let Some(mark) = mark {
            super::shard::mark_merged(&tx, mark, rec.id, &at).map_err(err)?;
        }
        let (_, revision) = image_now(&tx, rec.id).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok((MachineWrite::Written { revision }, rec.name))
    }

    /// Machine acceptance (auto-accept): inside one transaction, accepts the image only if
    /// its revision is still `expected_revision` and its state pending; logs an
    /// `auto_accept` entry. Otherwise nothing is written.
    pub fn accept_if(
        &mut self,
        image: &str,
        expected_revision: i64,
        actor: Actor<'_>,
    ) -> Result<MachineWrite> {
        let rec = self.image(image)?;
        let at = now_rfc3339();
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.begin()?;
        let (state, revision) = image_now(&tx, rec.id).map_err(err)?;
        if state != ReviewState::Pending || revision != expected_revision {
            return Ok(MachineWrite::Skipped { state, revision });
        }
        let version = current_version(&tx, rec.id).map_err(err)?;
        record(
            &tx,
            rec.id,
            "auto_accept",
            ReviewState::Accepted,
            actor,
            version,
            &at,
        )
        .map_err(err)?;
        let (_, revision) = image_now(&tx, rec.id).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(MachineWrite::Written { revision })
    }

    /// Batch accept by quality: accepts every `pending` image whose newest pseudo-label has a
    /// quality score ([`super::quality_score`]) of at least `min_score`, logging an
    /// `auto_accept` entry each. Selection and writes are one transaction, so an image a
    /// person reviewed in the meantime is never selected.
    pub fn accept_by_quality(&mut self, min_score: f64, actor: Actor<'_>) -> Result<BatchAccept> {
        if !min_score.is_finite() {
            return Err(StoreError::Invalid(format!(
                "minimum quality score {min_score} is not a number"
            )));
        }
        let at = now_rfc3339();
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.begin()?;
        let candidates = newest_labels(&tx).map_err(err)?;
        let mut out = BatchAccept::default();
        let mut ids = Vec::new();
        for c in candidates {
            let meets = c.quality.is_some_and(|q| q >= min_score);
            match (c.state, meets) {
                (ReviewState::Pending, true) => ids.push(
                    record(
                        &tx,
                        c.image_id,
                        "auto_accept",
                        ReviewState::Accepted,
                        actor,
                        None,
                        &at,
                    )
                    .map_err(err)?,
                ),
                (ReviewState::Pending, false) => out.below += 1,
                (state, true) => out.skipped.push((c.name, state)),
                (_, false) => {}
            }
        }
        tx.commit().map_err(err)?;
        out.accepted = self.events_by_ids(&ids)?;
        Ok(out)
    }
}

/// An image with a pseudo-label: its state and the quality of its newest label.
struct Candidate {
    image_id: i64,
    name: String,
    state: ReviewState,
    quality: Option<f64>,
}

/// Every image that has a pseudo-label, by name, read inside `tx`.
fn newest_labels(tx: &Transaction<'_>) -> rusqlite::Result<Vec<Candidate>> {
    let mut stmt = tx.prepare(
        "SELECT i.id, i.name, coalesce(r.state, 'pending'), p.sam_iou, p.stability,
           p.agreement, p.label_components - p.unet_components
         FROM images i
         JOIN pseudo_labels p ON p.image_id = i.id
           AND p.round = (SELECT max(round) FROM pseudo_labels WHERE image_id = i.id)
         LEFT JOIN reviews r ON r.image_id = i.id
         ORDER BY i.name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Candidate {
            image_id: r.get(0)?,
            name: r.get(1)?,
            state: r.get(2)?,
            quality: quality_score(r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
        })
    })?;
    rows.collect()
}
