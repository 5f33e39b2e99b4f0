//! `medmine project …` and `medmine review …`: thin wrappers over [`crate::store`].
mod merge;
mod score;
mod stress;

use std::path::{Path, PathBuf};
pub use stress::StressAction;
use stress::{stress_review, StressPlan};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::data;
use crate::store::{
    Actor, ExportFormat, ImportOptions, NewPseudoLabel, Project, Prompts, ReviewEvent, ReviewState,
    Role,
};

#[derive(Subcommand)]
pub enum ProjectCommand {
    /// Create a project folder (medmine.db, masks/, cache/, runs/).
    Init { dir: PathBuf },
    /// Import a dataset (images/, optional masks/); all or nothing.
    Import(ImportArgs),
    /// Counts per role and review state; with --json every image's name, role and review.
    Status {
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Find moved image files again by content hash.
    Relink {
        dir: PathBuf,
        /// The dataset's new folder (with images/, or the images themselves).
        #[arg(long)]
        data: PathBuf,
    },
    /// Export ground truth + accepted pseudo-labels as PNG (dataset layout) or COCO JSON.
    Export {
        dir: PathBuf,
        /// png | coco
        #[arg(long, default_value = "png")]
        format: String,
        /// A new folder (png, coco) or a .json file (coco).
        #[arg(long)]
        out: PathBuf,
    },
    /// Review report as CSV: who did what to which image, and when.
    Report {
        dir: PathBuf,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check that every image and mask file the project references is there.
    Verify {
        dir: PathBuf,
        /// Also check that image files still have their imported content.
        #[arg(long)]
        hashes: bool,
    },
    /// Store a folder of masks (<stem>.png) as pseudo-labels of one round, pending review.
    AddPseudo(AddPseudoArgs),
    /// Predict every image with a U-Net++ (on the CPU) and cache its Dice against the ground
    /// truth and its uncertainty (mean binary entropy), as the app's "Score images"; prints
    /// `name, uncertainty, dice` per image, most uncertain first.
    Score {
        dir: PathBuf,
        #[arg(long)]
        model: PathBuf,
    },
    /// Merge mining shards (`medmine mine --shard K/N --shard-out DIR`) into the project: each
    /// image only if nobody reviewed it since its shard read it; a shard is merged once.
    Merge {
        dir: PathBuf,
        /// The shard folders (every K of 0..N, unless --partial).
        #[arg(required = true)]
        shards: Vec<PathBuf>,
        /// Merge the shards given even if others of the run are missing.
        #[arg(long)]
        partial: bool,
    },
    /// Test helper: review actions one by one, printing `ack N IMAGE STATE` after each commit.
    #[command(hide = true)]
    StressReview {
        dir: PathBuf,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Written into each action's note as `TAG:N`.
        #[arg(long, default_value = "stress")]
        tag: String,
        /// The actions to cycle through (comma-separated: accept, reject, edit, pending).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "accept,reject,edit,pending"
        )]
        actions: Vec<StressAction>,
        /// Act on images of this role only (labelled, unlabelled, val, test).
        #[arg(long)]
        role: Option<String>,
        /// Pause a random 0..=MS milliseconds before each action (a person's pace).
        #[arg(long, default_value_t = 0)]
        max_pause_ms: u64,
    },
}

#[derive(Args)]
pub struct ImportArgs {
    dir: PathBuf,
    /// Dataset folder with images/ and optional masks/.
    #[arg(long)]
    data: PathBuf,
    /// Folder with train.txt and optional val.txt, test.txt.
    #[arg(long)]
    split_dir: Option<PathBuf>,
    /// Seeded fraction of the training images that is labelled (the rest is unlabelled).
    #[arg(long, default_value_t = 1.0)]
    labelled_fraction: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Import the usable files and list the unusable ones instead of refusing.
    #[arg(long)]
    skip_unusable: bool,
}

#[derive(Args)]
pub struct AddPseudoArgs {
    dir: PathBuf,
    /// Folder of binary masks named <image stem>.png.
    #[arg(long)]
    masks: PathBuf,
    /// Mining round.
    #[arg(long, default_value_t = 0)]
    round: i64,
    /// CSV with header `image,sam_iou,stability,agreement` (empty cells allowed).
    #[arg(long)]
    scores: Option<PathBuf>,
    #[arg(long)]
    sam_checkpoint: Option<String>,
    #[arg(long)]
    unet_checkpoint: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReviewAction {
    Accept,
    Reject,
    Pending,
    /// Save --mask as the image's corrected mask.
    Edit,
    Undo,
    Redo,
    /// List the pending pseudo-labels, least confident first (no image names).
    Queue,
}

#[derive(Args)]
pub struct ReviewArgs {
    /// Project folder.
    dir: PathBuf,
    action: ReviewAction,
    /// Image names (file name or stem).
    images: Vec<String>,
    /// accept only: every pending image whose pseudo-label quality
    /// (sam_iou × stability × agreement × 1/(1 + |component count change|)) is at least this.
    #[arg(long, value_parser = super::unit_f64)]
    min_score: Option<f64>,
    /// Reviewer name (default: $USER).
    #[arg(long)]
    reviewer: Option<String>,
    #[arg(long)]
    note: Option<String>,
    /// edit only: the corrected mask file.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// queue only: print a JSON array instead of lines.
    #[arg(long)]
    json: bool,
    /// queue only: show at most this many entries.
    #[arg(long)]
    limit: Option<usize>,
}

/// A size limit (`ulimit -f`) should give a clear "disk full" error, not kill the process.
fn ignore_file_size_signal() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: setting a signal to SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

pub fn project_cmd(c: ProjectCommand) -> Result<()> {
    ignore_file_size_signal();
    match c {
        ProjectCommand::Init { dir } => {
            Project::init(&dir)?;
            println!("created project {}", dir.display());
            Ok(())
        }
        ProjectCommand::Import(a) => import_cmd(a),
        ProjectCommand::Status { dir, json } => status_cmd(&dir, json),
        ProjectCommand::Score { dir, model } => score::score_cmd(&dir, &model),
        ProjectCommand::Merge {
            dir,
            shards,
            partial,
        } => merge::merge_cmd(&dir, &shards, partial),
        ProjectCommand::Relink { dir, data } => {
            let mut p = Project::open(&dir)?;
            let r = p.relink(&data)?;
            println!(
                "relinked {} images, {} already in place, {} not found",
                r.relinked,
                r.unchanged,
                r.not_found.len()
            );
            if !r.not_found.is_empty() {
                let lines: Vec<String> = r
                    .not_found
                    .iter()
                    .map(|(n, p)| format!("  {n} (was {})", p.display()))
                    .collect();
                bail!(
                    "{}: {} images not found by content:\n{}",
                    data.display(),
                    r.not_found.len(),
                    lines.join("\n")
                );
            }
            Ok(())
        }
        ProjectCommand::Export { dir, format, out } => {
            let format: ExportFormat = format.parse().map_err(anyhow::Error::msg)?;
            let p = Project::open(&dir)?;
            let r = p.export(format, &out)?;
            for n in &r.notes {
                eprintln!("{n}");
            }
            println!(
                "exported {} ground-truth masks and {} accepted pseudo-labels to {}",
                r.ground_truth,
                r.pseudo_labels,
                r.out.display()
            );
            Ok(())
        }
        ProjectCommand::Report { dir, out } => {
            let csv = Project::open(&dir)?.review_report_csv()?;
            match out {
                Some(path) => std::fs::write(&path, csv)
                    .with_context(|| format!("writing {}", path.display())),
                None => {
                    print!("{csv}");
                    Ok(())
                }
            }
        }
        ProjectCommand::Verify { dir, hashes } => {
            let problems = Project::open(&dir)?.verify(hashes)?;
            if problems.is_empty() {
                println!("{}: all referenced files present", dir.display());
                return Ok(());
            }
            bail!(
                "{}: {} problems:\n  {}",
                dir.display(),
                problems.len(),
                problems.join("\n  ")
            )
        }
        ProjectCommand::AddPseudo(a) => add_pseudo_cmd(a),
        ProjectCommand::StressReview {
            dir,
            count,
            seed,
            tag,
            actions,
            role,
            max_pause_ms,
        } => {
            let role = role
                .map(|r| r.parse::<Role>().map_err(anyhow::Error::msg))
                .transpose()?;
            let plan = StressPlan {
                count,
                seed,
                tag: &tag,
                actions: &actions,
                role,
                max_pause_ms,
            };
            stress_review(&dir, &plan)
        }
    }
}

fn import_cmd(a: ImportArgs) -> Result<()> {
    let mut p = Project::open(&a.dir)?;
    let opts = ImportOptions {
        data: a.data.clone(),
        split_dir: a.split_dir,
        labelled_fraction: a.labelled_fraction,
        seed: a.seed,
        skip_unusable: a.skip_unusable,
    };
    let r = p.import(&opts)?;
    for n in &r.notes {
        eprintln!("{n}");
    }
    let roles: Vec<String> = r.by_role.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!(
        "imported {} images ({}) with {} ground-truth masks from {}",
        r.imported,
        roles.join(", "),
        r.ground_truth,
        a.data.display()
    );
    if !r.warnings.is_empty() {
        let n = r.warnings.len();
        println!(
            "{n} mask file{} imported but worth a look:",
            if n == 1 { "" } else { "s" }
        );
        for w in &r.warnings {
            println!("  warning: {w}");
        }
    }
    Ok(())
}

fn status_cmd(dir: &Path, json: bool) -> Result<()> {
    let s = Project::open(dir)?.status()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!("project {} (schema v{})", s.project, s.schema_version);
    println!("images {}", s.total);
    for (role, n) in &s.roles {
        println!("  {role:<10} {n}");
    }
    println!("review (every image; pending: no decision yet)");
    for (state, n) in &s.review {
        println!("  {state:<10} {n}");
    }
    println!(
        "pseudo-labelled images {} ({} awaiting review)",
        s.pseudo_labels, s.awaiting_review
    );
    println!(
        "  component count changed {} (newest label vs the U-Net++ prediction)",
        s.component_count_changed
    );
    if s.missing_files > 0 {
        println!(
            "missing image files {} (run `medmine project verify` / `relink`)",
            s.missing_files
        );
    }
    if !s.shards.is_empty() {
        println!("merged from shards");
        for m in &s.shards {
            let id = &m.shard_id[..m.shard_id.len().min(12)];
            println!("  shard {} ({id}) {} {}", m.shard, m.outcome, m.images);
        }
    }
    Ok(())
}

fn parse_score(cell: Option<&str>, path: &Path, line: usize) -> Result<Option<f64>> {
    match cell.map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse::<f64>()
            .map(Some)
            .with_context(|| format!("{}: line {line}: {v:?} is not a number", path.display())),
    }
}

type Scores = std::collections::HashMap<String, [Option<f64>; 3]>;

fn read_scores(path: &Path) -> Result<Scores> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Scores::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let mut cells = line.split(',');
        let name = cells.next().unwrap_or("").trim().to_string();
        let mut v = [None; 3];
        for slot in &mut v {
            *slot = parse_score(cells.next(), path, i + 1)?;
        }
        let stem = Path::new(&name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(&name)
            .to_string();
        out.insert(stem, v);
    }
    Ok(out)
}

fn add_pseudo_cmd(a: AddPseudoArgs) -> Result<()> {
    let mut p = Project::open(&a.dir)?;
    let scores = a.scores.as_deref().map(read_scores).transpose()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&a.masks)
        .with_context(|| format!("reading {}", a.masks.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    // Check every mask first, so nothing is stored when one is bad.
    let mut labels = Vec::new();
    for f in &files {
        let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let rec = p
            .image(stem)
            .with_context(|| format!("{}: mask for an unknown image", f.display()))?;
        let mask = data::load_mask(f)?;
        if (mask.width, mask.height) != (rec.width, rec.height) {
            bail!(
                "{}: mask is {}x{} but image {} is {}x{}",
                f.display(),
                mask.width,
                mask.height,
                rec.name,
                rec.width,
                rec.height
            );
        }
        let [sam_iou, stability, agreement] = scores
            .as_ref()
            .and_then(|s| s.get(rec.stem()).copied())
            .unwrap_or([None; 3]);
        labels.push((
            rec.name,
            NewPseudoLabel {
                round: a.round,
                mask,
                prompts: Prompts::default(),
                sam_iou,
                stability,
                agreement,
                unet_components: None,
                label_components: None,
                sam_checkpoint: a.sam_checkpoint.clone(),
                unet_checkpoint: a.unet_checkpoint.clone(),
                unet_hash: None,
                labeler: None,
            },
        ));
    }
    for (name, label) in &labels {
        p.add_pseudo_label(name, label)?;
    }
    println!(
        "stored {} pseudo-labels of round {} (pending review)",
        labels.len(),
        a.round
    );
    Ok(())
}

fn print_events(events: &[ReviewEvent]) {
    for e in events {
        println!(
            "{} {} by {} at {}",
            e.image,
            e.state,
            e.reviewer.as_deref().unwrap_or("-"),
            e.at
        );
    }
}

pub fn review_cmd(a: ReviewArgs) -> Result<()> {
    ignore_file_size_signal();
    let reviewer = a
        .reviewer
        .clone()
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()));
    let actor = Actor {
        reviewer: reviewer.as_deref(),
        note: a.note.as_deref(),
    };
    let mut p = Project::open(&a.dir)?;
    if a.min_score.is_some() && a.action != ReviewAction::Accept {
        bail!("--min-score works with `accept` only");
    }
    if a.mask.is_some() && a.action != ReviewAction::Edit {
        bail!("--mask works with `edit` only");
    }
    if (a.json || a.limit.is_some()) && a.action != ReviewAction::Queue {
        bail!("--json and --limit work with `queue` only");
    }
    if a.action == ReviewAction::Queue {
        if !a.images.is_empty() {
            bail!("queue takes no image names");
        }
        return queue_cmd(&p, a.json, a.limit);
    }
    if let Some(min) = a.min_score {
        if !a.images.is_empty() {
            bail!("give either image names or --min-score, not both");
        }
        let r = p.accept_by_quality(min, actor)?;
        print_events(&r.accepted);
        println!(
            "accepted {} pending images with quality >= {min}",
            r.accepted.len()
        );
        if !r.skipped.is_empty() {
            let names: Vec<String> = r
                .skipped
                .iter()
                .map(|(n, state)| format!("{n} ({state})"))
                .collect();
            println!(
                "skipped: already reviewed {} ({})",
                r.skipped.len(),
                names.join(", ")
            );
        }
        return Ok(());
    }
    if a.images.is_empty() {
        bail!("name at least one image (or use `accept --min-score S`)");
    }
    let names: Vec<&str> = a.images.iter().map(String::as_str).collect();
    match a.action {
        ReviewAction::Accept | ReviewAction::Reject | ReviewAction::Pending => {
            let state = match a.action {
                ReviewAction::Accept => ReviewState::Accepted,
                ReviewAction::Reject => ReviewState::Rejected,
                _ => ReviewState::Pending,
            };
            print_events(&p.set_review(&names, state, actor)?);
        }
        ReviewAction::Edit => {
            let Some(mask_path) = &a.mask else {
                bail!("edit needs --mask FILE");
            };
            if names.len() != 1 {
                bail!("edit takes exactly one image");
            }
            let mask = data::load_mask(mask_path)?;
            let v = p.save_edit(names[0], &mask, actor)?;
            println!("{} edited (version {}, {})", v.image, v.seq, v.mask_file);
        }
        ReviewAction::Queue => unreachable!("handled above"),
        ReviewAction::Undo | ReviewAction::Redo => {
            for n in names {
                let e = if a.action == ReviewAction::Undo {
                    p.undo_edit(n, actor)?
                } else {
                    p.redo_edit(n, actor)?
                };
                match e {
                    Some(e) => print_events(&[e]),
                    None => println!("{n}: nothing to {}", action_name(a.action)),
                }
            }
        }
    }
    Ok(())
}

/// `review PROJECT queue`: one line per entry
/// (`name  quality  sam_iou  stability  agreement  round  components`, `-` for a score not
/// recorded; `components` is the component count change of the label against the U-Net++
/// prediction, signed: `+1` one more object, `-1` one fewer, `0` the same), or a JSON array
/// with `json`.
fn queue_cmd(p: &Project, json: bool, limit: Option<usize>) -> Result<()> {
    let mut queue = p.review_queue()?;
    if let Some(n) = limit {
        queue.truncate(n);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&queue)?);
        return Ok(());
    }
    let score = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.4}"));
    for e in &queue {
        println!(
            "{}  {}  {}  {}  {}  {}  {}",
            e.name,
            score(e.quality),
            score(e.sam_iou),
            score(e.stability),
            score(e.agreement),
            e.round,
            e.component_change.map_or_else(
                || "-".to_string(),
                |c| if c == 0 { "0".into() } else { format!("{c:+}") }
            )
        );
    }
    Ok(())
}

fn action_name(a: ReviewAction) -> &'static str {
    match a {
        ReviewAction::Undo => "undo",
        ReviewAction::Redo => "redo",
        _ => "do",
    }
}
