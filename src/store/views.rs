//! The radiologist's view of a project: display windows (the project's default and per-image
//! overrides) and cached per-image scores (Dice against the ground truth, U-Net++
//! uncertainty), so that the image list can sort by them without decoding a mask per frame.
use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{now_rfc3339, Project, Result, StoreError};
use crate::metrics::Confusion;

/// A display window, in the image's own values (`unit` says which: see the app's window
/// module); a window of another unit than the image's is ignored by the app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViewWindow {
    pub center: f64,
    pub width: f64,
    pub unit: String,
}

/// What a cached score is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScoreSource {
    /// The U-Net++ prediction (thresholded at 0.5) of one checkpoint.
    Unet,
    /// The newest pseudo-label.
    Pseudo,
}

impl ScoreSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ScoreSource::Unet => "unet",
            ScoreSource::Pseudo => "pseudo",
        }
    }
}

/// One cached score of an image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageScore {
    /// What it was computed from: the checkpoint path (U-Net++) or the mask file (pseudo).
    pub reference: String,
    /// Dice against the ground truth (`None` without ground truth).
    pub dice: Option<f64>,
    /// Mean binary entropy of the probability map (U-Net++ only).
    pub uncertainty: Option<f64>,
}

const PROJECT_WINDOW: &str = "view_window";

impl Project {
    /// The project's default display window.
    pub fn project_window(&self) -> Result<Option<ViewWindow>> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [PROJECT_WINDOW],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))?;
        Ok(v.and_then(|v| serde_json::from_str(&v).ok()))
    }

    /// Sets (or with `None` removes) the project's default display window.
    pub fn set_project_window(&mut self, w: Option<&ViewWindow>) -> Result<()> {
        match w {
            Some(w) => {
                check(w)?;
                let json =
                    serde_json::to_string(w).map_err(|e| StoreError::Invalid(e.to_string()))?;
                self.conn
                    .execute(
                        "INSERT INTO meta (key, value) VALUES (?1, ?2)
                         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        params![PROJECT_WINDOW, json],
                    )
                    .map_err(|e| self.db(e))?;
            }
            None => {
                self.conn
                    .execute("DELETE FROM meta WHERE key = ?1", [PROJECT_WINDOW])
                    .map_err(|e| self.db(e))?;
            }
        }
        Ok(())
    }

    /// The window the user set for one image.
    pub fn image_window(&self, image: &str) -> Result<Option<ViewWindow>> {
        let rec = self.image(image)?;
        self.conn
            .query_row(
                "SELECT center, width, unit FROM image_windows WHERE image_id = ?1",
                [rec.id],
                |r| {
                    Ok(ViewWindow {
                        center: r.get(0)?,
                        width: r.get(1)?,
                        unit: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.db(e))
    }

    /// Sets (or with `None` removes: the image follows the project's window again) the
    /// window of one image.
    pub fn set_image_window(&mut self, image: &str, w: Option<&ViewWindow>) -> Result<()> {
        let rec = self.image(image)?;
        match w {
            Some(w) => {
                check(w)?;
                self.conn.execute(
                    "INSERT INTO image_windows (image_id, center, width, unit) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(image_id) DO UPDATE SET center = excluded.center,
                       width = excluded.width, unit = excluded.unit",
                    params![rec.id, w.center, w.width, w.unit],
                )
            }
            None => self
                .conn
                .execute("DELETE FROM image_windows WHERE image_id = ?1", [rec.id]),
        }
        .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Stores a score of an image (replacing the earlier one of that source).
    pub fn set_score(
        &mut self,
        image: &str,
        source: ScoreSource,
        score: &ImageScore,
    ) -> Result<()> {
        let rec = self.image(image)?;
        self.conn
            .execute(
                "INSERT INTO image_scores (image_id, source, ref, dice, uncertainty, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(image_id, source) DO UPDATE SET ref = excluded.ref,
                   dice = excluded.dice, uncertainty = excluded.uncertainty, at = excluded.at",
                params![
                    rec.id,
                    source.as_str(),
                    score.reference,
                    score.dice,
                    score.uncertainty,
                    now_rfc3339()
                ],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Every cached score of one source, by image name (stale ones included: compare
    /// [`ImageScore::reference`]).
    pub fn scores(&self, source: ScoreSource) -> Result<HashMap<String, ImageScore>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT i.name, s.ref, s.dice, s.uncertainty FROM image_scores s
                 JOIN images i ON i.id = s.image_id WHERE s.source = ?1",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([source.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    ImageScore {
                        reference: r.get(1)?,
                        dice: r.get(2)?,
                        uncertainty: r.get(3)?,
                    },
                ))
            })
            .and_then(|it| it.collect::<rusqlite::Result<HashMap<_, _>>>())
            .map_err(|e| self.db(e))?;
        Ok(rows)
    }

    /// Dice of a mask (0/1) against the image's ground truth; `None` without ground truth.
    pub fn dice_against_truth(&self, image: &str, mask: &[u8]) -> Result<Option<f64>> {
        let Some(path) = self.ground_truth(image)? else {
            return Ok(None);
        };
        let gt = crate::data::load_mask(&path)?;
        if gt.data.len() != mask.len() {
            return Err(StoreError::Invalid(format!(
                "{image}: mask of {} pixels against a ground truth of {}",
                mask.len(),
                gt.data.len()
            )));
        }
        Ok(Some(Confusion::from_masks(mask, &gt.data).scores().dice))
    }

    /// Computes the pseudo-label Dice of every image with ground truth whose newest
    /// pseudo-label has no valid cached score yet; returns how many were computed. Images
    /// whose masks cannot be read are skipped (the list shows no Dice for them).
    pub fn update_pseudo_scores(&mut self) -> Result<usize> {
        let cached = self.scores(ScoreSource::Pseudo)?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT i.name, p.mask_file FROM images i
                 JOIN gt_masks g ON g.image_id = i.id
                 JOIN pseudo_labels p ON p.image_id = i.id
                 WHERE p.round = (SELECT max(round) FROM pseudo_labels q WHERE q.image_id = i.id)",
            )
            .map_err(|e| self.db(e))?;
        let todo: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?
            .into_iter()
            .filter(|(name, file)| cached.get(name).map(|s| &s.reference) != Some(file))
            .collect();
        drop(stmt);
        let mut n = 0;
        for (name, file) in todo {
            let Ok(mask) = crate::data::load_mask(&self.masks_dir().join(&file)) else {
                continue;
            };
            let Ok(dice) = self.dice_against_truth(&name, &mask.data) else {
                continue;
            };
            let score = ImageScore {
                reference: file,
                dice,
                uncertainty: None,
            };
            self.set_score(&name, ScoreSource::Pseudo, &score)?;
            n += 1;
        }
        Ok(n)
    }
}

fn check(w: &ViewWindow) -> Result<()> {
    if w.center.is_finite() && w.width.is_finite() && w.width > 0.0 {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "window centre {} width {}: both must be finite and the width positive",
            w.center, w.width
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{save_gray_png, save_mask_png, Mask};
    use crate::store::{schema, ImportOptions, NewPseudoLabel, Prompts};

    /// A project of two 8x4 images with ground truth; `a` gets a pseudo-label.
    fn project(dir: &std::path::Path) -> Project {
        let data = dir.join("data");
        std::fs::create_dir_all(data.join("images")).unwrap();
        std::fs::create_dir_all(data.join("masks")).unwrap();
        for n in ["a", "b"] {
            save_gray_png(&data.join(format!("images/{n}.png")), 8, 4, &[100; 32]).unwrap();
            let mut m = vec![0u8; 32];
            m[..16].fill(1);
            let mask = Mask {
                width: 8,
                height: 4,
                data: m,
            };
            save_mask_png(&data.join(format!("masks/{n}.png")), &mask).unwrap();
        }
        let mut p = Project::init(&dir.join("p")).unwrap();
        p.import(&ImportOptions::new(&data)).unwrap();
        p
    }

    fn window(c: f64) -> ViewWindow {
        ViewWindow {
            center: c,
            width: 400.0,
            unit: "hu".into(),
        }
    }

    #[test]
    fn windows_round_trip_and_survive_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = project(tmp.path());
        assert_eq!(p.project_window().unwrap(), None);
        assert_eq!(p.image_window("a.png").unwrap(), None);
        p.set_project_window(Some(&window(40.0))).unwrap();
        p.set_image_window("a.png", Some(&window(-600.0))).unwrap();
        p.set_image_window("a.png", Some(&window(-500.0))).unwrap();
        assert!(p
            .set_image_window(
                "a.png",
                Some(&ViewWindow {
                    width: 0.0,
                    ..window(1.0)
                })
            )
            .is_err());
        let root = p.root().to_path_buf();
        drop(p);
        let mut p = Project::open(&root).unwrap();
        assert_eq!(p.project_window().unwrap(), Some(window(40.0)));
        assert_eq!(p.image_window("a.png").unwrap(), Some(window(-500.0)));
        assert_eq!(p.image_window("b.png").unwrap(), None);
        // reset to the project window
        p.set_image_window("a.png", None).unwrap();
        assert_eq!(p.image_window("a.png").unwrap(), None);
        p.set_project_window(None).unwrap();
        assert_eq!(p.project_window().unwrap(), None);
    }

    #[test]
    fn an_old_project_gets_the_new_tables() {
        let tmp = tempfile::tempdir().unwrap();
        let p = project(tmp.path());
        let root = p.root().to_path_buf();
        drop(p);
        // back to schema v4 (as a project of an earlier release): no window/score tables (v5),
        // no project id or shard merges (v6)
        let db = root.join(crate::store::DB_FILE);
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "DROP TABLE image_windows; DROP TABLE image_scores; DROP TABLE shard_merges; \
             DELETE FROM meta WHERE key = 'project_id'; PRAGMA user_version = 4;",
        )
        .unwrap();
        drop(conn);
        let mut p = Project::open(&root).unwrap();
        assert_eq!(p.schema_version().unwrap(), schema::LATEST);
        assert_eq!(p.image_window("a.png").unwrap(), None);
        p.set_image_window("a.png", Some(&window(40.0))).unwrap();
        assert_eq!(p.image_window("a.png").unwrap(), Some(window(40.0)));
        assert!(p.scores(ScoreSource::Unet).unwrap().is_empty());
        let id = p.project_id().unwrap();
        assert!(
            id.len() == 32 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        assert!(p.shard_merges().unwrap().is_empty());
    }

    #[test]
    fn pseudo_label_dice_is_cached_until_the_label_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut p = project(tmp.path());
        // half of the truth: Dice 2 * 8 / (8 + 16) = 2/3
        let mut m = vec![0u8; 32];
        m[..8].fill(1);
        let label = |round, data: Vec<u8>| NewPseudoLabel {
            round,
            mask: Mask {
                width: 8,
                height: 4,
                data,
            },
            prompts: Prompts::default(),
            sam_iou: None,
            stability: None,
            agreement: None,
            unet_components: None,
            label_components: None,
            sam_checkpoint: None,
            unet_checkpoint: None,
            unet_hash: None,
            labeler: None,
        };
        p.add_pseudo_label("a.png", &label(0, m)).unwrap();
        assert_eq!(p.update_pseudo_scores().unwrap(), 1);
        assert_eq!(p.update_pseudo_scores().unwrap(), 0, "cached");
        let s = &p.scores(ScoreSource::Pseudo).unwrap()["a.png"];
        assert!((s.dice.unwrap() - 2.0 / 3.0).abs() < 1e-9, "{s:?}");
        // a new round: computed again
        let mut m = vec![0u8; 32];
        m[..16].fill(1);
        p.add_pseudo_label("a.png", &label(1, m)).unwrap();
        assert_eq!(p.update_pseudo_scores().unwrap(), 1);
        let s = &p.scores(ScoreSource::Pseudo).unwrap()["a.png"];
        assert!((s.dice.unwrap() - 1.0).abs() < 1e-9);
        assert!(!p.scores(ScoreSource::Pseudo).unwrap().contains_key("b.png"));
    }
}
