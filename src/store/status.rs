//! A summary of a project: counts per role and review state, and one line per image.
use std::collections::BTreeMap;

use serde::Serialize;

use super::{Project, Result, ReviewState, Role};

/// One image in the status listing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageStatus {
    pub name: String,
    pub role: Role,
    pub review: ReviewState,
    pub reviewer: Option<String>,
    pub reviewed_at: Option<String>,
    /// Whether the image has a ground-truth mask.
    pub ground_truth: bool,
    /// Newest pseudo-label round, if any.
    pub pseudo_label_round: Option<i64>,
    /// Quality score of the newest pseudo-label ([`super::quality_score`]).
    pub quality: Option<f64>,
    /// Component count change of the newest pseudo-label (pseudo-label minus U-Net++), when
    /// both counts were recorded.
    pub component_change: Option<i64>,
    /// Whether the image file is where the project says it is.
    pub file_present: bool,
}

/// The whole status (what `medmine project status --json` prints).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProjectStatus {
    pub project: String,
    pub schema_version: i64,
    pub total: usize,
    /// Count per role (every role present, zeros included).
    pub roles: BTreeMap<String, usize>,
    /// Count per review state (every state present, zeros included).
    pub review: BTreeMap<String, usize>,
    pub pseudo_labels: usize,
    /// Pseudo-labelled images that no person has decided on yet (the review queue's length;
    /// `review["pending"]` counts every undecided image, labelled ones included).
    pub awaiting_review: usize,
    /// Pseudo-labelled images whose newest label has another component count than the
    /// U-Net++ prediction it was mined from.
    pub component_count_changed: usize,
    pub missing_files: usize,
    /// Images merged from mining shards: per shard and outcome (`mined`, or
    /// `skipped_reviewed`: a person reviewed the image after the shard read it).
    pub shards: Vec<ShardMerged>,
    pub images: Vec<ImageStatus>,
}

/// What one shard brought into the project (`medmine project merge`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardMerged {
    /// `K/N`.
    pub shard: String,
    pub shard_id: String,
    pub outcome: String,
    pub images: usize,
}

impl Project {
    /// Counts and per-image states.
    pub fn status(&self) -> Result<ProjectStatus> {
        let sql = "SELECT i.name, i.role, coalesce(r.state, 'pending'), r.reviewer, r.at,
                i.path, g.image_id IS NOT NULL,
                (SELECT max(round) FROM pseudo_labels p WHERE p.image_id = i.id)
            FROM images i
            LEFT JOIN reviews r ON r.image_id = i.id
            LEFT JOIN gt_masks g ON g.image_id = i.id
            ORDER BY i.name";
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    ImageStatus {
                        name: r.get(0)?,
                        role: r.get(1)?,
                        review: r.get(2)?,
                        reviewer: r.get(3)?,
                        reviewed_at: r.get(4)?,
                        ground_truth: r.get(6)?,
                        pseudo_label_round: r.get(7)?,
                        quality: None,
                        component_change: None,
                        file_present: false,
                    },
                    r.get::<_, String>(5)?,
                ))
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        let mut roles: BTreeMap<String, usize> =
            Role::ALL.iter().map(|r| (r.to_string(), 0)).collect();
        let mut review: BTreeMap<String, usize> = ReviewState::ALL
            .iter()
            .map(|s| (s.to_string(), 0))
            .collect();
        let mut images = Vec::with_capacity(rows.len());
        let mut pseudo_labels = 0;
        let mut awaiting_review = 0;
        let mut component_count_changed = 0;
        let mut missing_files = 0;
        for (mut s, path) in rows {
            s.file_present = std::path::Path::new(&path).is_file();
            if !s.file_present {
                missing_files += 1;
            }
            if s.pseudo_label_round.is_some() {
                pseudo_labels += 1;
                if s.review == ReviewState::Pending {
                    awaiting_review += 1;
                }
                if let Some(p) = self.latest_pseudo_label(&s.name)? {
                    s.quality = p.quality();
                    s.component_change = p.component_change();
                }
                if s.component_change.is_some_and(|c| c != 0) {
                    component_count_changed += 1;
                }
            }
            *roles.entry(s.role.to_string()).or_default() += 1;
            *review.entry(s.review.to_string()).or_default() += 1;
            images.push(s);
        }
        Ok(ProjectStatus {
            project: self.root.display().to_string(),
            schema_version: self.schema_version()?,
            total: images.len(),
            roles,
            review,
            pseudo_labels,
            awaiting_review,
            component_count_changed,
            missing_files,
            shards: self
                .shard_merges()?
                .into_iter()
                .map(|(shard, shard_id, outcome, images)| ShardMerged {
                    shard,
                    shard_id,
                    outcome,
                    images,
                })
                .collect(),
            images,
        })
    }
}
