//! Training runs with their per-epoch metrics, and model predictions per model version.
use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::fsutil;
use super::records::{Prediction, RunStatus, TrainingRun};
use super::{now_rfc3339, Project, Result, StoreError};
use crate::data::Mask;
use crate::progress::EpochRecord;

const RUN_SELECT: &str = "SELECT id, name, config, status, dir, best_checkpoint, last_checkpoint,
    started_at, finished_at, message FROM training_runs";

type RunRow = (TrainingRun, String);

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let path = |i: usize| -> rusqlite::Result<Option<PathBuf>> {
        Ok(r.get::<_, Option<String>>(i)?.map(PathBuf::from))
    };
    Ok((
        TrainingRun {
            id: r.get(0)?,
            name: r.get(1)?,
            config: serde_json::Value::Null,
            status: r.get(3)?,
            dir: PathBuf::from(r.get::<_, String>(4)?),
            best_checkpoint: path(5)?,
            last_checkpoint: path(6)?,
            started_at: r.get(7)?,
            finished_at: r.get(8)?,
            message: r.get(9)?,
        },
        r.get(2)?,
    ))
}

impl Project {
    fn write<T>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let path = self.db_path.clone();
        let err = super::schema::db_err(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err)?;
        let out = f(&tx).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(out)
    }

    /// Records a new run (status `running`); `dir` is where its checkpoints go (usually
    /// under [`Project::runs_dir`]). Returns its id.
    pub fn start_run(&mut self, name: &str, config: &serde_json::Value, dir: &Path) -> Result<i64> {
        let config = config.to_string();
        let at = now_rfc3339();
        self.write(|tx| {
            tx.execute(
                "INSERT INTO training_runs (name, config, status, dir, started_at)
                 VALUES (?1, ?2, 'running', ?3, ?4)",
                params![name, config, dir.to_string_lossy(), at],
            )?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// Records one finished epoch of a run (replacing a record of the same epoch, as a
    /// resumed run may redo one).
    pub fn add_epoch(&mut self, run: i64, e: &EpochRecord) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO run_epochs (run_id, epoch, train_loss, val_dice, val_iou,
                   lr, seconds, images_per_s, best) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    run,
                    e.epoch as i64,
                    e.train_loss,
                    e.val_dice,
                    e.val_iou,
                    e.lr,
                    e.seconds,
                    e.images_per_s,
                    e.best
                ],
            )?;
            Ok(())
        })
    }

    /// Sets a run's status and checkpoints (a final status also sets `finished_at`).
    pub fn finish_run(
        &mut self,
        run: i64,
        status: RunStatus,
        best: Option<&Path>,
        last: Option<&Path>,
        message: Option<&str>,
    ) -> Result<()> {
        let at = (status != RunStatus::Running).then(now_rfc3339);
        let changed = self.write(|tx| {
            tx.execute(
                "UPDATE training_runs SET status = ?2, best_checkpoint = ?3, last_checkpoint = ?4,
                   finished_at = ?5, message = ?6 WHERE id = ?1",
                params![
                    run,
                    status,
                    best.map(|p| p.to_string_lossy().into_owned()),
                    last.map(|p| p.to_string_lossy().into_owned()),
                    at,
                    message
                ],
            )
        })?;
        if changed == 0 {
            return Err(StoreError::Invalid(format!(
                "{}: no training run with id {run}",
                self.db_path.display()
            )));
        }
        Ok(())
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Result<Vec<TrainingRun>> {
        let sql = format!("{RUN_SELECT} ORDER BY id");
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([], run_from_row)
            .and_then(|it| it.collect::<rusqlite::Result<Vec<RunRow>>>())
            .map_err(|e| self.db(e))?;
        rows.into_iter()
            .map(|(mut run, cfg)| {
                run.config = serde_json::from_str(&cfg).map_err(|source| StoreError::Json {
                    path: self.db_path.clone(),
                    what: "run config",
                    source,
                })?;
                Ok(run)
            })
            .collect()
    }

    /// The epochs of a run, in order.
    pub fn run_epochs(&self, run: i64) -> Result<Vec<EpochRecord>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT epoch, train_loss, val_dice, val_iou, lr, seconds, images_per_s, best
                 FROM run_epochs WHERE run_id = ?1 ORDER BY epoch",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([run], |r| {
                Ok(EpochRecord {
                    epoch: r.get::<_, i64>(0)? as usize,
                    train_loss: r.get(1)?,
                    val_dice: r.get(2)?,
                    val_iou: r.get(3)?,
                    lr: r.get(4)?,
                    seconds: r.get(5)?,
                    images_per_s: r.get(6)?,
                    best: r.get(7)?,
                })
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Stores a model's predicted mask for an image (replacing that model's earlier one).
    pub fn add_prediction(&mut self, image: &str, model: &str, mask: &Mask) -> Result<Prediction> {
        let rec = self.image(image)?;
        if (mask.width, mask.height) != (rec.width, rec.height) {
            return Err(StoreError::MaskSize {
                name: rec.name,
                mask_w: mask.width,
                mask_h: mask.height,
                image_w: rec.width,
                image_h: rec.height,
            });
        }
        let masks_dir = self.masks_dir();
        let png = fsutil::MaskPng::encode(mask)?;
        png.store(&masks_dir)?;
        let at = now_rfc3339();
        let db = self.db_path.clone();
        let err = super::schema::db_err(&db);
        let tx = self.begin()?;
        // A refused machine write may have removed an identical file it had just created.
        png.store(&masks_dir)?;
        tx.execute(
            "INSERT INTO predictions (image_id, model, mask_file, created_at)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(image_id, model) DO UPDATE SET mask_file = excluded.mask_file,
               created_at = excluded.created_at",
            params![rec.id, model, png.name, at],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        self.prediction(image, model)?.ok_or_else(|| {
            StoreError::Invalid(format!("prediction of {image} vanished after commit"))
        })
    }

    /// The prediction of `model` for an image, if stored.
    pub fn prediction(&self, image: &str, model: &str) -> Result<Option<Prediction>> {
        let rec = self.image(image)?;
        self.conn
            .query_row(
                "SELECT model, mask_file, probs_file, created_at FROM predictions
                 WHERE image_id = ?1 AND model = ?2",
                params![rec.id, model],
                |r| {
                    Ok(Prediction {
                        image: rec.name.clone(),
                        model: r.get(0)?,
                        mask_file: r.get(1)?,
                        probs_file: r.get(2)?,
                        created_at: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.db(e))
    }
}
