//! The SAM weights manager: the official checkpoints of [`crate::weights::REGISTRY`], what the
//! weights folder holds, download with progress (only when the user presses the button),
//! cancel and resume (the `.part` file is kept), SHA-256 verification, and the choice of the
//! active checkpoint. Downloads and hashing run on their own threads through
//! [`crate::weights::download`] and [`crate::weights::check_file`]; the UI only draws.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use egui::{Color32, RichText};

use super::path_field::{path_field_ui, validate, Browser, PathKind};
use crate::weights::{
    self, Checkpoint, DownloadEvent, DownloadProgress, FileStatus, Presence, WeightsError,
    REGISTRY, URL_ENV,
};

/// The default weights folder: `./weights` where it exists (the CLI's default), else
/// `$XDG_DATA_HOME/medmine/weights` (or `~/.local/share/…`).
pub fn default_dir() -> PathBuf {
    let local = PathBuf::from("weights");
    if local.is_dir() {
        return std::fs::canonicalize(&local).unwrap_or(local);
    }
    super::demo_project_dir()
        .and_then(|d| d.parent().map(|p| p.join("weights")))
        .unwrap_or(local)
}

/// What a background job reports.
enum Msg {
    Event(DownloadEvent),
    Downloaded(Result<weights::Downloaded, String>),
    Verified(Result<FileStatus, String>),
}

/// A download or a verification in progress.
struct Job {
    download: bool,
    cancel: Arc<AtomicBool>,
    done: u64,
    total: Option<u64>,
    /// Hashing what is on disk (before a resume, or a verification).
    hashing: bool,
}

#[derive(Default)]
struct Row {
    job: Option<Job>,
    /// The last outcome: text and whether it is an error.
    message: Option<(String, bool)>,
    /// The last verification of the file (cleared when the folder changes).
    verified: Option<FileStatus>,
}

/// What a row looks like now (for tests and the window).
#[derive(Clone, Debug, PartialEq)]
pub enum RowState {
    Absent,
    /// An interrupted download: `bytes` kept in `FILE.part`.
    Partial {
        bytes: u64,
    },
    /// The file is there; `verified` once its SHA-256 matched the registry's.
    Present {
        bytes: u64,
        verified: bool,
    },
    Downloading {
        done: u64,
        total: Option<u64>,
    },
    Verifying,
}

/// Sends download events to the UI (progress at most every 100 ms) and reads the cancel flag.
struct ToUi {
    i: usize,
    tx: Sender<(usize, Msg)>,
    ctx: egui::Context,
    cancel: Arc<AtomicBool>,
    last: Instant,
}

impl DownloadProgress for ToUi {
    fn event(&mut self, e: &DownloadEvent) {
        if matches!(e, DownloadEvent::Progress { .. })
            && self.last.elapsed() < Duration::from_millis(100)
        {
            return;
        }
        self.last = Instant::now();
        let _ = self.tx.send((self.i, Msg::Event(e.clone())));
        self.ctx.request_repaint();
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// The manager's state (kept while its window is closed: downloads go on).
pub struct WeightsManager {
    pub show: bool,
    /// The weights folder, as typed.
    pub dir: String,
    /// A mirror's base URL (`MEDMINE_WEIGHTS_URL`): the file name is appended.
    pub base_url: Option<String>,
    entries: Vec<Checkpoint>,
    rows: Vec<Row>,
    tx: Sender<(usize, Msg)>,
    rx: Receiver<(usize, Msg)>,
    browser: Browser,
}

/// What the window asks the app to do.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightsAction {
    /// Load this checkpoint as the active SAM (and remember it).
    Use(PathBuf),
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl WeightsManager {
    /// The official checkpoints in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self::with_entries(dir, REGISTRY.to_vec())
    }

    /// Other checkpoints (tests: a file served on 127.0.0.1).
    pub fn with_entries(dir: &Path, entries: Vec<Checkpoint>) -> Self {
        let (tx, rx) = channel();
        Self {
            show: false,
            dir: dir.display().to_string(),
            base_url: std::env::var(URL_ENV).ok().filter(|s| !s.trim().is_empty()),
            rows: entries.iter().map(|_| Row::default()).collect(),
            entries,
            tx,
            rx,
            browser: Browser::default(),
        }
    }

    pub fn entries(&self) -> &[Checkpoint] {
        &self.entries
    }

    /// The folder, where the text names a usable one.
    pub fn folder(&self) -> Option<PathBuf> {
        validate(&self.dir, PathKind::NewFolder).ok()
    }

    /// Where checkpoint `i` is (or goes).
    pub fn path(&self, i: usize) -> Option<PathBuf> {
        Some(self.folder()?.join(self.entries[i].file))
    }

    /// The message of the last outcome of row `i` (and whether it is an error).
    pub fn message(&self, i: usize) -> Option<(&str, bool)> {
        self.rows[i].message.as_ref().map(|(m, e)| (m.as_str(), *e))
    }

    pub fn busy(&self, i: usize) -> bool {
        self.rows[i].job.is_some()
    }

    pub fn state(&self, i: usize) -> RowState {
        let row = &self.rows[i];
        if let Some(j) = &row.job {
            return if j.hashing || !j.download {
                RowState::Verifying
            } else {
                RowState::Downloading {
                    done: j.done,
                    total: j.total,
                }
            };
        }
        let Some(dir) = self.folder() else {
            return RowState::Absent;
        };
        match weights::presence(&dir, self.entries[i].file) {
            Presence::Present { bytes } => RowState::Present {
                bytes,
                verified: row.verified == Some(FileStatus::Ok),
            },
            Presence::Partial { bytes } => RowState::Partial { bytes },
            Presence::Absent => RowState::Absent,
        }
    }

    fn start(&mut self, i: usize, download: bool) -> Option<(Arc<AtomicBool>, PathBuf)> {
        if self.rows[i].job.is_some() {
            return None;
        }
        let Some(dir) = self.folder() else {
            self.rows[i].message = Some((
                "choose a weights folder first (type its path or press Browse…)".into(),
                true,
            ));
            return None;
        };
        let cancel = Arc::new(AtomicBool::new(false));
        self.rows[i].job = Some(Job {
            download,
            cancel: cancel.clone(),
            done: 0,
            total: self.entries[i].size,
            hashing: false,
        });
        self.rows[i].message = None;
        Some((cancel, dir))
    }

    /// Downloads (or resumes) checkpoint `i` on its own thread.
    pub fn download(&mut self, i: usize, ctx: &egui::Context) {
        let Some((cancel, dir)) = self.start(i, true) else {
            return;
        };
        let c = self.entries[i];
        // the entry's own values (the registry's, or a test's), with the mirror applied
        let d = weights::check_file_name(c.file).map(|()| weights::Download {
            name: c.name.to_string(),
            url: match &self.base_url {
                Some(b) => format!("{}/{}", b.trim_end_matches('/'), c.file),
                None => c.url.to_string(),
            },
            dest: dir.join(c.file),
            sha256: c.sha256.map(str::to_string),
            size: c.size,
        });
        let (tx, ctx) = (self.tx.clone(), ctx.clone());
        std::thread::spawn(move || {
            let r = match d {
                Ok(d) => {
                    let mut p = ToUi {
                        i,
                        tx: tx.clone(),
                        ctx: ctx.clone(),
                        cancel,
                        last: Instant::now() - Duration::from_secs(1),
                    };
                    weights::download(&d, &mut p)
                }
                Err(e) => Err(e),
            };
            let _ = tx.send((i, Msg::Downloaded(r.map_err(|e| explain(&e)))));
            ctx.request_repaint();
        });
    }

    /// Asks the running download of `i` to stop (the part file is kept for a resume).
    pub fn cancel(&mut self, i: usize) {
        if let Some(j) = &self.rows[i].job {
            j.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Hashes checkpoint `i` on its own thread and compares it with the registry.
    pub fn verify(&mut self, i: usize, ctx: &egui::Context) {
        let Some((_, dir)) = self.start(i, false) else {
            return;
        };
        let c = self.entries[i];
        let path = dir.join(c.file);
        let (tx, ctx) = (self.tx.clone(), ctx.clone());
        std::thread::spawn(move || {
            let r = weights::check_file(&path, c.sha256).map_err(|e| explain(&e));
            let _ = tx.send((i, Msg::Verified(r)));
            ctx.request_repaint();
        });
    }

    /// Applies what the jobs reported.
    pub fn poll(&mut self) {
        if let Some(p) = self.browser.poll() {
            self.set_dir(p.display().to_string());
        }
        while let Ok((i, msg)) = self.rx.try_recv() {
            let row = &mut self.rows[i];
            match msg {
                Msg::Event(e) => {
                    if let Some(j) = &mut row.job {
                        match e {
                            DownloadEvent::Started { from, total } => {
                                j.hashing = false;
                                j.done = from;
                                j.total = total.or(j.total);
                            }
                            DownloadEvent::Progress { done } => j.done = done,
                            DownloadEvent::Verifying { .. } => j.hashing = true,
                            DownloadEvent::Note(n) => row.message = Some((n, false)),
                        }
                    }
                }
                Msg::Downloaded(r) => {
                    row.job = None;
                    match r {
                        Ok(d) => {
                            row.verified = d.verified.then_some(FileStatus::Ok);
                            let how = match (d.already_present, d.resumed_from) {
                                (true, _) => "already there".to_string(),
                                (false, 0) => format!("downloaded {}", mib(d.bytes)),
                                (false, k) => {
                                    format!("resumed at {}, {} in all", mib(k), mib(d.bytes))
                                }
                            };
                            let check = if d.verified {
                                "SHA-256 verified"
                            } else {
                                "no SHA-256 recorded: not verified"
                            };
                            row.message = Some((format!("{how}; {check}"), false));
                        }
                        Err(e) => row.message = Some((e, true)),
                    }
                }
                Msg::Verified(r) => {
                    row.job = None;
                    row.message = Some(match &r {
                        Ok(FileStatus::Ok) => ("SHA-256 verified".into(), false),
                        Ok(FileStatus::Missing) => {
                            ("not in the folder: download it first".into(), true)
                        }
                        Ok(FileStatus::Mismatch { expected, actual }) => (
                            format!(
                                "SHA-256 mismatch (expected {expected}, got {actual}): the file is damaged or another one; delete it and download again"
                            ),
                            true,
                        ),
                        Ok(FileStatus::UnknownHash { actual }) => {
                            (format!("no SHA-256 recorded; this file's is {actual}"), false)
                        }
                        Err(e) => (e.clone(), true),
                    });
                    row.verified = r.ok();
                }
            }
        }
    }

    fn set_dir(&mut self, dir: String) {
        self.dir = dir;
        for r in &mut self.rows {
            r.verified = None;
            if r.job.is_none() {
                r.message = None;
            }
        }
    }

    /// The window (when shown). `active`: the SAM checkpoint in use.
    pub fn window_ui(
        &mut self,
        ctx: &egui::Context,
        active: Option<&Path>,
    ) -> Option<WeightsAction> {
        self.poll();
        if !self.show {
            return None;
        }
        let mut show = true;
        let mut action = None;
        egui::Window::new("SAM weights")
            .open(&mut show)
            .default_width(660.0)
            .show(ctx, |ui| action = self.panel_ui(ui, active));
        self.show = show;
        action
    }

    fn panel_ui(&mut self, ui: &mut egui::Ui, active: Option<&Path>) -> Option<WeightsAction> {
        let mut text = self.dir.clone();
        let r = path_field_ui(ui, "weights folder", &mut text, PathKind::NewFolder);
        if r.changed {
            self.set_dir(text);
        }
        if r.browse {
            self.browser.open(
                ui.ctx(),
                PathKind::NewFolder,
                "Folder for the SAM checkpoints",
                None,
            );
        }
        ui.label(
            RichText::new(match &self.base_url {
                Some(b) => format!("downloads from the mirror {b} ({URL_ENV})"),
                None => "Nothing is downloaded until you press Download. Sizes: vit_t 39 MiB (fast on a CPU), vit_b 358 MiB, vit_l 1.2 GiB, vit_h 2.4 GiB.".into(),
            })
            .small()
            .weak(),
        );
        ui.separator();
        let mut action = None;
        let active = active.and_then(|p| std::fs::canonicalize(p).ok());
        for i in 0..self.entries.len() {
            if let Some(a) = self.row_ui(ui, i, active.as_deref()) {
                action = Some(a);
            }
            ui.separator();
        }
        action
    }

    fn row_ui(
        &mut self,
        ui: &mut egui::Ui,
        i: usize,
        active: Option<&Path>,
    ) -> Option<WeightsAction> {
        let c = self.entries[i];
        let path = self.path(i);
        let is_active = path
            .as_ref()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .is_some_and(|p| Some(p.as_path()) == active);
        let state = self.state(i);
        let mut action = None;
        // one line: name and file | state or progress | buttons; the last message below it
        let column = |ui: &mut egui::Ui, width: f32, add: &mut dyn FnMut(&mut egui::Ui)| {
            ui.allocate_ui_with_layout(
                egui::vec2(width, 0.0),
                egui::Layout::top_down(egui::Align::Min),
                |ui| {
                    ui.set_width(width);
                    add(ui);
                },
            );
        };
        ui.horizontal(|ui| {
            column(ui, 150.0, &mut |ui| {
                ui.label(RichText::new(c.name).strong());
                ui.label(RichText::new(c.file).small().weak());
            });
            column(ui, 220.0, &mut |ui| match &state {
                RowState::Absent => {
                    ui.label(format!("not here · {}", c.size.map_or("?".into(), mib)));
                }
                RowState::Partial { bytes } => {
                    ui.label(format!("partial: {} kept", mib(*bytes)));
                }
                RowState::Present { bytes, verified } => {
                    ui.label(format!(
                        "{} · {}",
                        mib(*bytes),
                        if *verified {
                            "verified"
                        } else {
                            "not verified"
                        }
                    ));
                }
                RowState::Downloading { done, total } => {
                    let frac = total.map_or(0.0, |t| *done as f32 / t.max(1) as f32);
                    ui.add(
                        egui::ProgressBar::new(frac)
                            .desired_width(200.0)
                            .text(format!(
                                "{} / {}",
                                mib(*done),
                                total.map_or("?".into(), mib)
                            )),
                    );
                }
                RowState::Verifying => {
                    ui.horizontal(|ui| {
                        super::panels::spinner_ui(ui, None, "verifying");
                        ui.label("computing the SHA-256…");
                    });
                }
            });
            match state {
                RowState::Downloading { .. } => {
                    if ui
                        .button(format!("Cancel {}", c.name))
                        .on_hover_text(
                            "Stop; what was downloaded is kept and the next download resumes it",
                        )
                        .clicked()
                    {
                        self.cancel(i);
                    }
                }
                RowState::Verifying => {}
                RowState::Absent | RowState::Partial { .. } => {
                    let label = if matches!(state, RowState::Partial { .. }) {
                        format!("Resume {}", c.name)
                    } else {
                        format!("Download {}", c.name)
                    };
                    if ui
                        .button(label)
                        .on_hover_text(format!("From {}", c.url))
                        .clicked()
                    {
                        self.download(i, ui.ctx());
                    }
                }
                RowState::Present { .. } => {
                    if ui
                        .button(format!("Verify {}", c.name))
                        .on_hover_text(
                            "Compute the file's SHA-256 and compare it with the published one",
                        )
                        .clicked()
                    {
                        self.verify(i, ui.ctx());
                    }
                    if is_active {
                        ui.label(
                            RichText::new("active")
                                .strong()
                                .color(Color32::from_rgb(60, 170, 80)),
                        );
                    } else if ui
                        .button(format!("Use {}", c.name))
                        .on_hover_text(
                            "Load it as the SAM checkpoint (remembered for the next start)",
                        )
                        .clicked()
                    {
                        action = path.clone().map(WeightsAction::Use);
                    }
                }
            }
        });
        if let Some((m, error)) = self.message(i) {
            let color = if error {
                Color32::from_rgb(230, 90, 80)
            } else {
                Color32::GRAY
            };
            ui.label(RichText::new(m).small().color(color));
        }
        action
    }
}

/// An error with what to do about it.
fn explain(e: &WeightsError) -> String {
    match e {
        WeightsError::Transfer { .. } | WeightsError::Status { .. } => format!(
            "{e}. Check the network connection (or set {URL_ENV} to a mirror) and press Download again; a partial file is resumed"
        ),
        WeightsError::Io { .. } => format!("{e}. Choose a folder you can write to, with enough free space"),
        _ => e.to_string(),
    }
}
