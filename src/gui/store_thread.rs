//! The store thread: owns the project connection and answers the UI's [`StoreCommand`]s
//! (listing with the cached scores, loading an image with its layers and windows, reviews,
//! edits, windows, scores), each durable before its event is sent.
use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use anyhow::{Context as _, Result};

use super::worker::{guarded, Event, ImageRow, LoadedImage, Outbox, StoreCommand};
use crate::data::{self, Mask};
use crate::store::{Actor, ImageScore, Project, ReviewState, ScoreSource};

/// The list: every image with its cached scores (the U-Net++ ones of `model` only).
fn rows(p: &Project, model: Option<&std::path::Path>) -> Result<Vec<ImageRow>> {
    let status = p.status()?;
    let paths: std::collections::HashMap<String, PathBuf> =
        p.images()?.into_iter().map(|r| (r.name, r.path)).collect();
    let pseudo = p.scores(ScoreSource::Pseudo)?;
    let model = model.map(|m| m.display().to_string());
    let unet: std::collections::HashMap<String, ImageScore> = p
        .scores(ScoreSource::Unet)?
        .into_iter()
        .filter(|(_, s)| Some(&s.reference) == model.as_ref())
        .collect();
    Ok(status
        .images
        .into_iter()
        .map(|s| {
            let u = unet.get(&s.name);
            ImageRow {
                path: paths.get(&s.name).cloned().unwrap_or_default(),
                // (kept up to date with the newest label by `update_pseudo_scores` on open
                // and refresh)
                pseudo_dice: pseudo.get(&s.name).and_then(|d| d.dice),
                unet_dice: u.and_then(|u| u.dice),
                uncertainty: u.and_then(|u| u.uncertainty),
                name: s.name,
                role: s.role,
                state: s.review,
                quality: s.quality,
                ground_truth: s.ground_truth,
                pseudo_label: s.pseudo_label_round.is_some(),
            }
        })
        .collect())
}

/// The model of the project: the best checkpoint of its newest finished or cancelled run.
pub fn project_model(p: &Project) -> Option<PathBuf> {
    let runs = p.runs().ok()?;
    runs.iter()
        .rev()
        .filter_map(|r| r.best_checkpoint.clone())
        .find(|b| b.is_file())
}

fn edit_mask(p: &Project, image: &str) -> Result<Option<Mask>> {
    Ok(match p.current_mask(image)? {
        Some((path, "edited")) => Some(data::load_mask(&path)?),
        _ => None,
    })
}

fn load(p: &Project, name: &str) -> Result<LoadedImage> {
    let rec = p.image(name)?;
    let (img, range) = data::load_image_with_range(&p.image_file(name)?)?;
    let (r, g, b) = (img.channel(0), img.channel(1), img.channel(2));
    let grayscale = r == g && g == b;
    let rgba = super::overlay::image_rgba(&img, grayscale);
    let ground_truth = match p.ground_truth(name)? {
        Some(path) => Some(data::load_mask(&path)?),
        None => None,
    };
    let rounds = p.pseudo_labels(name)?;
    let pseudo = match rounds.last() {
        Some(l) => Some(data::load_mask(&p.masks_dir().join(&l.mask_file))?),
        None => None,
    };
    Ok(LoadedImage {
        name: name.into(),
        path: rec.path,
        role: rec.role,
        state: p.review(name)?.state,
        width: img.width,
        height: img.height,
        rgba,
        grayscale,
        ground_truth,
        pseudo,
        edit: edit_mask(p, name)?,
        rounds,
        range,
        window_image: p.image_window(name)?,
        window_project: p.project_window()?,
    })
}

const GUI_ACTOR: Actor<'static> = Actor {
    reviewer: Some("gui"),
    note: None,
};

pub(super) fn store_thread(rx: Receiver<StoreCommand>, out: Outbox) {
    let mut project: Option<Project> = None;
    let mut model: Option<PathBuf> = None;
    for cmd in rx {
        let context = format!("{cmd:?}").chars().take(80).collect::<String>();
        guarded(&out, &context, || {
            if let StoreCommand::OpenOrCreate {
                project: root,
                data,
                split_dir,
                labelled_fraction,
            } = &cmd
            {
                if !root.join(crate::store::DB_FILE).is_file() {
                    let mut p = Project::init(root)
                        .with_context(|| format!("creating project {}", root.display()))?;
                    let mut opts = crate::store::ImportOptions::new(data);
                    opts.split_dir = split_dir.clone();
                    opts.labelled_fraction = *labelled_fraction;
                    opts.skip_unusable = true;
                    p.import(&opts)
                        .with_context(|| format!("importing {}", data.display()))?;
                }
            }
            if let StoreCommand::Open(root) | StoreCommand::OpenOrCreate { project: root, .. } =
                &cmd
            {
                let mut p = Project::open(root)
                    .with_context(|| format!("opening project {}", root.display()))?;
                model = project_model(&p);
                out.send(Event::Opened {
                    root: p.root().to_path_buf(),
                    rows: rows(&p, model.as_deref())?,
                    model: model.clone(),
                });
                // pseudo-label Dice of labels mined since the last open (cached in the store)
                let computed = p.update_pseudo_scores();
                let listing = rows(&p, model.as_deref());
                project = Some(p);
                if computed? > 0 {
                    out.send(Event::Listing(listing?));
                }
                return Ok(());
            }
            let p = project.as_mut().context("no project is open")?;
            match cmd {
                StoreCommand::Open(_) | StoreCommand::OpenOrCreate { .. } => {
                    unreachable!("handled above")
                }
                StoreCommand::Refresh => {
                    p.update_pseudo_scores()?;
                    out.send(Event::Listing(rows(p, model.as_deref())?))
                }
                StoreCommand::SetWindow { image, window } => match image {
                    Some(image) => p.set_image_window(&image, window.as_ref())?,
                    None => p.set_project_window(window.as_ref())?,
                },
                StoreCommand::SetModel(m) => {
                    model = m;
                    out.send(Event::Listing(rows(p, model.as_deref())?));
                }
                StoreCommand::SaveScore {
                    image,
                    model: m,
                    prediction,
                    uncertainty,
                } => {
                    let score = ImageScore {
                        reference: m.display().to_string(),
                        dice: p.dice_against_truth(&image, &prediction)?,
                        uncertainty: Some(uncertainty),
                    };
                    p.set_score(&image, ScoreSource::Unet, &score)?;
                    out.send(Event::Scored {
                        image,
                        model: m,
                        dice: score.dice,
                        uncertainty,
                    });
                }
                StoreCommand::Load(name) => out.send(Event::Loaded(Box::new(load(p, &name)?))),
                StoreCommand::Review { image, state } => {
                    p.set_review(&[&image], state, GUI_ACTOR)?;
                    out.send(Event::Reviewed { image, state });
                }
                StoreCommand::SaveEdit { image, mask } => {
                    p.save_edit(&image, &mask, GUI_ACTOR)?;
                    let state = p.review(&image)?.state;
                    out.send(Event::MaskSaved {
                        image,
                        state,
                        edit: Some(mask),
                    });
                }
                StoreCommand::Undo(image) => undo_redo(p, &out, image, true)?,
                StoreCommand::Redo(image) => undo_redo(p, &out, image, false)?,
                StoreCommand::ResetToProposal(image) => {
                    p.set_review(&[&image], ReviewState::Pending, GUI_ACTOR)?;
                    out.send(Event::MaskSaved {
                        edit: edit_mask(p, &image)?,
                        state: p.review(&image)?.state,
                        image,
                    });
                }
            }
            Ok(())
        });
    }
}

fn undo_redo(p: &mut Project, out: &Outbox, image: String, undo: bool) -> Result<()> {
    let done = if undo {
        p.undo_edit(&image, GUI_ACTOR)?
    } else {
        p.redo_edit(&image, GUI_ACTOR)?
    };
    if done.is_none() {
        out.send(Event::Nothing(if undo {
            "nothing to undo".into()
        } else {
            "nothing to redo".into()
        }));
        return Ok(());
    }
    out.send(Event::MaskSaved {
        edit: edit_mask(p, &image)?,
        state: p.review(&image)?.state,
        image,
    });
    Ok(())
}
