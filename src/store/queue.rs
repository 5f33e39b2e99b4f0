//! The review queue: pending pseudo-labels, least confident first.
use serde::Serialize;

use super::{component_change, quality_score, Project, Result};

/// One image waiting for review, with the scores of its newest pseudo-label.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueEntry {
    pub name: String,
    /// Round of the newest pseudo-label.
    pub round: i64,
    pub sam_iou: Option<f64>,
    pub stability: Option<f64>,
    pub agreement: Option<f64>,
    /// Connected components of the U-Net++ prediction and of the pseudo-label.
    pub unet_components: Option<i64>,
    pub label_components: Option<i64>,
    /// `label_components - unet_components` when both were recorded.
    pub component_change: Option<i64>,
    /// [`quality_score`] of the four; `None` when none was recorded.
    pub quality: Option<f64>,
}

impl Project {
    /// Every `pending` image that has a pseudo-label, least confident first: by quality
    /// score ascending (a changed component count lowers it), an unknown score (nothing
    /// vouches for the label) before any known one, ties by name. Scores are those of the
    /// newest round.
    pub fn review_queue(&self) -> Result<Vec<QueueEntry>> {
        let sql = "SELECT i.name, p.round, p.sam_iou, p.stability, p.agreement,
                p.unet_components, p.label_components
            FROM images i
            JOIN pseudo_labels p ON p.image_id = i.id
            LEFT JOIN reviews r ON r.image_id = i.id
            WHERE coalesce(r.state, 'pending') = 'pending'
              AND p.round = (SELECT max(q.round) FROM pseudo_labels q WHERE q.image_id = i.id)";
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.db(e))?;
        let mut rows = stmt
            .query_map([], |r| {
                let (sam_iou, stability, agreement) = (r.get(2)?, r.get(3)?, r.get(4)?);
                let (unet_components, label_components) = (r.get(5)?, r.get(6)?);
                let change = component_change(unet_components, label_components);
                Ok(QueueEntry {
                    name: r.get(0)?,
                    round: r.get(1)?,
                    sam_iou,
                    stability,
                    agreement,
                    unet_components,
                    label_components,
                    component_change: change,
                    quality: quality_score(sam_iou, stability, agreement, change),
                })
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        rows.sort_by(|a, b| {
            let by_quality = match (a.quality, b.quality) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Less,
                (Some(_), None) => std::cmp::Ordering::Greater,
                (Some(x), Some(y)) => x.total_cmp(&y),
            };
            by_quality.then_with(|| a.name.cmp(&b.name))
        });
        Ok(rows)
    }
}
