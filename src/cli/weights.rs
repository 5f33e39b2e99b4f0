//! `medmine weights list|verify|download`: the official SAM checkpoints (src/weights.rs).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::weights::{
    self, DownloadEvent, DownloadProgress, FileStatus, Presence, MANUAL, REGISTRY,
};

#[derive(Subcommand)]
pub enum WeightsCommand {
    /// The official checkpoints: name, file, size, whether --dir has it, URL.
    List(DirArg),
    /// SHA-256 of the checkpoints in --dir: ok / mismatch / missing / unknown-hash.
    /// Exits non-zero on a mismatch, or when a NAME given explicitly is missing.
    Verify {
        /// Registry names (vit_b, vit_l, vit_h, vit_t, medsam, litemedsam) or file names;
        /// default: all of them.
        names: Vec<String>,
        #[command(flatten)]
        dir: DirArg,
        /// Expected SHA-256 (for one NAME; e.g. an unregistered file).
        #[arg(long)]
        sha256: Option<String>,
    },
    /// Download checkpoints into --dir: resumes NAME.part, checks the SHA-256, renames atomically.
    /// Mirror: env MEDMINE_WEIGHTS_URL=BASE fetches BASE/<file>.
    Download {
        /// Registry names (vit_b, vit_l, vit_h, vit_t), or the file name of an unregistered
        /// file (with --url and --sha256). medsam / litemedsam are published on Google Drive
        /// only: download them by hand (or give --url).
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        dir: DirArg,
        /// Fetch from this URL instead (one NAME only).
        #[arg(long)]
        url: Option<String>,
        /// Expected SHA-256 (one NAME only); replaces the registry's.
        #[arg(long)]
        sha256: Option<String>,
    },
}

#[derive(Args)]
pub struct DirArg {
    /// Folder of the checkpoints.
    #[arg(long, default_value = "weights")]
    dir: PathBuf,
}

pub fn weights_cmd(c: WeightsCommand) -> Result<()> {
    match c {
        WeightsCommand::List(d) => list(&d.dir),
        WeightsCommand::Verify { names, dir, sha256 } => verify(&names, &dir.dir, sha256),
        WeightsCommand::Download {
            names,
            dir,
            url,
            sha256,
        } => download(&names, &dir.dir, url, sha256),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn list(dir: &Path) -> Result<()> {
    println!("checkpoints in {}:", dir.display());
    println!(
        "{:<6} {:<22} {:>11} {:<22} url",
        "name", "file", "size", "present"
    );
    for c in REGISTRY {
        let present = match weights::presence(dir, c.file) {
            Presence::Present { .. } => "yes".to_string(),
            Presence::Partial { bytes } => format!("partial ({})", mib(bytes)),
            Presence::Absent => "no".to_string(),
        };
        let size = c.size.map_or("?".to_string(), mib);
        println!(
            "{:<6} {:<22} {:>11} {:<22} {}",
            c.name, c.file, size, present, c.url
        );
    }
    for c in MANUAL {
        let present = match weights::presence(dir, c.file) {
            Presence::Present { .. } => "yes",
            _ => "no (download by hand)",
        };
        println!(
            "{:<6} {:<22} {:>11} {:<22} {} (no size or SHA-256 published)",
            c.name, c.file, "?", present, c.page
        );
    }
    Ok(())
}

/// The (name, file, expected hash) rows to check.
fn targets(
    names: &[String],
    sha256: Option<String>,
) -> Result<Vec<(String, String, Option<String>)>> {
    if sha256.is_some() && names.len() != 1 {
        bail!("--sha256 needs exactly one NAME");
    }
    let sha256 = sha256.as_deref().map(weights::parse_sha256).transpose()?;
    if names.is_empty() {
        let manual = MANUAL.iter().map(|c| (c.name.into(), c.file.into(), None));
        return Ok(REGISTRY
            .iter()
            .map(|c| (c.name.into(), c.file.into(), c.sha256.map(Into::into)))
            .chain(manual)
            .collect());
    }
    let mut rows = Vec::new();
    for n in names {
        rows.push(match weights::find(n) {
            Some(c) => (
                c.name.to_string(),
                c.file.to_string(),
                sha256.clone().or(c.sha256.map(Into::into)),
            ),
            None if weights::find_manual(n).is_some() => {
                let c = weights::find_manual(n).expect("just found");
                (c.name.to_string(), c.file.to_string(), sha256.clone())
            }
            None => {
                weights::check_file_name(n)?;
                (n.clone(), n.clone(), sha256.clone())
            }
        });
    }
    Ok(rows)
}

fn verify(names: &[String], dir: &Path, sha256: Option<String>) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "{}: no such folder (give the folder that holds the checkpoints with --dir)",
            dir.display()
        );
    }
    let explicit = !names.is_empty();
    let mut failed = Vec::new();
    for (name, file, expected) in targets(names, sha256)? {
        let path = dir.join(&file);
        let status = weights::check_file(&path, expected.as_deref())?;
        let detail = match &status {
            FileStatus::Ok => expected.unwrap_or_default(),
            FileStatus::Mismatch { expected, actual } => {
                format!("expected {expected} actual {actual}")
            }
            FileStatus::Missing => String::new(),
            FileStatus::UnknownHash { actual } => actual.clone(),
        };
        let line = format!("{name:<6} {} {} {detail}", path.display(), status.label());
        println!("{}", line.trim_end());
        let bad = matches!(status, FileStatus::Mismatch { .. })
            || (explicit && status == FileStatus::Missing);
        if bad {
            failed.push(format!("{name}: {}", status.label()));
        }
    }
    if !failed.is_empty() {
        bail!("verification failed: {}", failed.join(", "));
    }
    Ok(())
}

fn download(
    names: &[String],
    dir: &Path,
    url: Option<String>,
    sha256: Option<String>,
) -> Result<()> {
    if (url.is_some() || sha256.is_some()) && names.len() != 1 {
        bail!("--url and --sha256 need exactly one NAME");
    }
    let base = std::env::var(weights::URL_ENV)
        .ok()
        .filter(|b| !b.is_empty());
    for name in names {
        let d = weights::resolve(
            name,
            dir,
            url.as_deref(),
            base.as_deref(),
            sha256.as_deref(),
        )?;
        println!("{}: {} -> {}", d.name, d.url, d.dest.display());
        let mut bar = CliBar::default();
        let result = weights::download(&d, &mut bar);
        bar.finish();
        let r = result.with_context(|| format!("downloading {}", d.name))?;
        let how = if r.already_present {
            "already present".to_string()
        } else if r.resumed_from > 0 {
            format!("downloaded, resumed at byte {}", r.resumed_from)
        } else {
            "downloaded".to_string()
        };
        let check = if r.verified {
            "SHA-256 verified"
        } else {
            "NOT verified: no SHA-256 is recorded for it (pass --sha256)"
        };
        println!("{}: {how} ({} bytes); {check}", r.path.display(), r.bytes);
        println!("sha256 {}", r.sha256);
    }
    Ok(())
}

/// A byte progress bar (hidden where stderr is not a terminal).
#[derive(Default)]
struct CliBar {
    bar: Option<ProgressBar>,
}

impl CliBar {
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl DownloadProgress for CliBar {
    fn event(&mut self, event: &DownloadEvent) {
        match event {
            DownloadEvent::Started { from, total } => {
                self.finish();
                let bar = ProgressBar::new(total.unwrap_or(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar.set_position(*from);
                bar.reset_eta();
                if *from > 0 {
                    bar.println(format!("resuming at byte {from}"));
                }
                self.bar = Some(bar);
            }
            DownloadEvent::Progress { done } => {
                if let Some(b) = &self.bar {
                    b.set_position(*done);
                }
            }
            DownloadEvent::Verifying { path } => eprintln!("hashing {}", path.display()),
            DownloadEvent::Note(m) => match &self.bar {
                Some(b) => b.println(m),
                None => eprintln!("{m}"),
            },
        }
    }
}
