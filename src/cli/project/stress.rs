//! `medmine project stress-review` (hidden): a test helper that plays reviewers.
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Result};
use clap::ValueEnum;

use crate::data;
use crate::store::{Actor, Project, ReviewState, Role, StoreError};

/// A review action of `project stress-review`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StressAction {
    Accept,
    Reject,
    Edit,
    Pending,
}

/// What `project stress-review` does.
pub(super) struct StressPlan<'a> {
    pub(super) count: usize,
    pub(super) seed: u64,
    pub(super) tag: &'a str,
    pub(super) actions: &'a [StressAction],
    pub(super) role: Option<Role>,
    pub(super) max_pause_ms: u64,
}

/// Review actions one at a time (cycling through `plan.actions`: accept, reject, pending, edit
/// with a random mask) on random images, each acknowledged on stdout (flushed) as
/// `ack N IMAGE STATE` only after its commit (an accept the store refuses because the image
/// has nothing to accept yet prints `refused N IMAGE nothing-to-accept`): the crash-safety and race tests kill this
/// process at random moments and check that every acknowledged action survived.
pub(super) fn stress_review(dir: &Path, plan: &StressPlan<'_>) -> Result<()> {
    use rand::{Rng, SeedableRng};
    let mut p = Project::open(dir)?;
    let images: Vec<_> = p
        .images()?
        .into_iter()
        .filter(|r| plan.role.is_none_or(|role| r.role == role))
        .collect();
    if images.is_empty() {
        bail!("{}: project has no images to review", dir.display());
    }
    if plan.actions.is_empty() {
        bail!("--actions: name at least one action");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(plan.seed);
    let stdout = std::io::stdout();
    for n in 0..plan.count {
        if plan.max_pause_ms > 0 {
            let ms = rng.gen_range(0..=plan.max_pause_ms);
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let rec = &images[rng.gen_range(0..images.len())];
        let note = format!("{}:{n}", plan.tag);
        let actor = Actor {
            reviewer: Some("stress"),
            note: Some(&note),
        };
        let state = match plan.actions[n % plan.actions.len()] {
            StressAction::Accept => {
                match p.set_review(&[&rec.name], ReviewState::Accepted, actor) {
                    Ok(events) => events[0].state,
                    // nothing mined for it yet: the store refuses, as for a person
                    Err(StoreError::NothingToAccept { .. }) => {
                        let mut out = stdout.lock();
                        writeln!(out, "refused {n} {} nothing-to-accept", rec.name)?;
                        out.flush()?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            StressAction::Reject => {
                p.set_review(&[&rec.name], ReviewState::Rejected, actor)?[0].state
            }
            StressAction::Edit => {
                let data = (0..rec.width * rec.height)
                    .map(|_| u8::from(rng.gen_bool(0.3)))
                    .collect();
                let mask = data::Mask {
                    width: rec.width,
                    height: rec.height,
                    data,
                };
                p.save_edit(&rec.name, &mask, actor)?;
                ReviewState::Edited
            }
            StressAction::Pending => {
                p.set_review(&[&rec.name], ReviewState::Pending, actor)?[0].state
            }
        };
        let mut out = stdout.lock();
        writeln!(out, "ack {n} {} {state}", rec.name)?;
        out.flush()?;
    }
    Ok(())
}
