//! Which unlabelled images a pass mines ([`plan_image`], the [`Remine`] policy), and the
//! pass's two store writes (the rounds of one image, the auto-accept).
use super::{MiningError, MiningSummary, Provenance, Remine};
use crate::store::{
    Actor, MachineWrite, NewPseudoLabel, Project, PseudoLabel, ReviewState, Role, ShardSpec,
};

/// What a pass does with one unlabelled image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Mine it now.
    Mine,
    /// Leave its pseudo-label as it is (same models, or a policy that re-mines nothing).
    Unchanged,
    /// A reviewer accepted or edited it: never re-mined.
    Kept,
}

/// The plan for one unlabelled image in review `state`. `current` is `None` when it has no
/// pseudo-label, else the `(unet_hash, labeler)` its newest pseudo-label was made by (`None`
/// fields: not recorded, i.e. mined before hashes were). `unet_hash` and `labeler` are this
/// pass's.
pub fn plan_image(
    policy: Remine,
    state: ReviewState,
    current: Option<(Option<&str>, Option<&str>)>,
    unet_hash: &str,
    labeler: &str,
) -> Plan {
    if state.is_accepted() {
        return Plan::Kept;
    }
    let Some(made_by) = current else {
        return Plan::Mine;
    };
    match policy {
        Remine::All => Plan::Mine,
        Remine::None => Plan::Unchanged,
        Remine::Changed if made_by == (Some(unet_hash), Some(labeler)) => Plan::Unchanged,
        Remine::Changed => Plan::Mine,
    }
}

/// An image selected for mining.
pub(super) struct Candidate {
    pub name: String,
    /// The image's revision when it was selected (compare-and-set of the writes).
    pub revision: i64,
}

/// The models a stored pseudo-label records.
fn made_by(p: &PseudoLabel) -> (Option<&str>, Option<&str>) {
    (p.unet_hash.as_deref(), p.labeler.as_deref())
}

/// The images to mine, in the project's order, and a summary with the others counted.
/// With `shard`, only the unlabelled images at its positions (project order) are looked at
/// (and counted).
pub(super) fn select_images(
    project: &Project,
    policy: Remine,
    who: &Provenance,
    shard: Option<ShardSpec>,
) -> Result<(Vec<Candidate>, MiningSummary), MiningError> {
    let mut summary = MiningSummary {
        unet_hash: who.unet_hash.clone(),
        labeler: who.labeler_id.clone(),
        ..MiningSummary::default()
    };
    let mut todo = Vec::new();
    let unlabelled = project
        .images()?
        .into_iter()
        .filter(|r| r.role == Role::Unlabelled)
        .enumerate();
    for (pos, rec) in unlabelled {
        if shard.is_some_and(|s| !s.contains(pos)) {
            continue;
        }
        summary.unlabelled += 1;
        let at = |source| MiningError::Store {
            image: rec.name.clone(),
            source,
        };
        let review = project.review(&rec.name).map_err(at)?;
        let latest = project.latest_pseudo_label(&rec.name).map_err(at)?;
        let current = latest.as_ref().map(made_by);
        match plan_image(
            policy,
            review.state,
            current,
            &who.unet_hash,
            &who.labeler_id,
        ) {
            Plan::Kept => summary.kept.push(rec.name),
            Plan::Unchanged => summary.unchanged.push(rec.name),
            Plan::Mine => todo.push(Candidate {
                name: rec.name,
                revision: review.revision,
            }),
        }
    }
    summary.selected = todo.len();
    Ok((todo, summary))
}

/// Stores the rounds of one image in one compare-and-set ([`Project::add_pseudo_labels_if`]:
/// rounds appended after the image's newest, the last label the newest row, the one
/// reviewed); the image's revision after the write, or `None` when a person reviewed the
/// image since it was selected (nothing written).
pub(super) fn write_rounds(
    project: &mut Project,
    cand: &Candidate,
    labels: &[NewPseudoLabel],
) -> Result<Option<i64>, MiningError> {
    let write = project
        .add_pseudo_labels_if(&cand.name, cand.revision, labels)
        .map_err(|source| MiningError::Store {
            image: cand.name.clone(),
            source,
        })?;
    Ok(match write {
        MachineWrite::Written { revision } => Some(revision),
        MachineWrite::Skipped { .. } => None,
    })
}

/// Accepts one image if it is still pending at `revision` (nobody reviewed it since the
/// machine wrote it: [`Project::accept_if`]); whether it was accepted.
pub(super) fn accept(
    project: &mut Project,
    image: &str,
    revision: i64,
    actor: Actor<'_>,
) -> Result<bool, MiningError> {
    let write = project
        .accept_if(image, revision, actor)
        .map_err(|source| MiningError::Store {
            image: image.to_string(),
            source,
        })?;
    Ok(write.is_written())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReviewState::*;

    #[test]
    fn which_images_each_policy_mines() {
        let (unet, sam) = ("u2", "sam:abc");
        let same = Some((Some(unet), Some(sam)));
        let old_model = Some((Some("u1"), Some(sam)));
        let other_labeler = Some((Some(unet), Some("unet")));
        let before_hashes = Some((None, None));
        let plan = |policy, state, current| plan_image(policy, state, current, unet, sam);
        for policy in Remine::ALL {
            // no pseudo-label yet: always mined; a reviewer's decision: never
            assert_eq!(plan(policy, Pending, None), Plan::Mine, "{policy}");
            for state in [Accepted, Edited] {
                for current in [None, same, old_model] {
                    assert_eq!(plan(policy, state, current), Plan::Kept, "{policy}");
                }
            }
        }
        for state in [Pending, Rejected] {
            assert_eq!(plan(Remine::Changed, state, same), Plan::Unchanged);
            assert_eq!(plan(Remine::Changed, state, old_model), Plan::Mine);
            assert_eq!(plan(Remine::Changed, state, other_labeler), Plan::Mine);
            assert_eq!(plan(Remine::Changed, state, before_hashes), Plan::Mine);
            assert_eq!(plan(Remine::All, state, same), Plan::Mine);
            assert_eq!(plan(Remine::None, state, old_model), Plan::Unchanged);
        }
    }
}
