//! The "New project from dataset" dialog: the dataset folder (typed or browsed), what a scan
//! of it finds, where the project goes, whether every mask stays labelled (the default) or
//! only a seeded fraction, then the import on its own thread and its report: images by role
//! and every skipped file with the reason.
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, TryRecvError};

use anyhow::{Context as _, Result};
use egui::{Color32, RichText};

use super::path_field::{path_field_ui, validate, Browser, PathKind};
use crate::data::{self, Dataset, Skipped};
use crate::store::{ImportOptions, ImportReport, Project, Role, DB_FILE};

/// What a scan of the dataset folder found (nothing is decoded).
#[derive(Clone, Debug, PartialEq)]
pub struct ScanSummary {
    pub images: usize,
    pub masks: usize,
    /// Folder with `train.txt` (and optional `val.txt`, `test.txt`).
    pub split_dir: Option<PathBuf>,
    /// Entries of train.txt, val.txt, test.txt (where the file exists).
    pub lists: [Option<usize>; 3],
    pub skipped: Vec<Skipped>,
}

/// How an import ended.
#[derive(Clone, Debug, PartialEq)]
pub enum ImportOutcome {
    Imported(ImportReport),
    /// The project folder already was a project: it is opened, nothing imported.
    Existing,
}

enum Task<T> {
    Running(Receiver<Result<T, String>>),
    Done(Result<T, String>),
}

impl<T> Task<T> {
    fn spawn(ctx: &egui::Context, f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Self
    where
        T: Send + 'static,
    {
        let (tx, rx) = channel();
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err("crashed (see the log)".into()));
            let _ = tx.send(r);
            ctx.request_repaint();
        });
        Task::Running(rx)
    }

    fn poll(&mut self) {
        if let Task::Running(rx) = self {
            match rx.try_recv() {
                Ok(r) => *self = Task::Done(r),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => *self = Task::Done(Err("stopped".into())),
            }
        }
    }

    fn done(&self) -> Option<&Result<T, String>> {
        match self {
            Task::Done(r) => Some(r),
            Task::Running(_) => None,
        }
    }
}

/// The dialog's state.
pub struct NewProject {
    /// The dataset folder (`images/`, optional `masks/` and split lists), as typed.
    pub data: String,
    /// Where the project folder goes, as typed.
    pub project: String,
    /// The user typed a project folder: it no longer follows the dataset folder.
    project_edited: bool,
    /// Use the split lists the scan found.
    pub use_splits: bool,
    /// Keep only a seeded fraction of the masks labelled (off: every mask is labelled).
    pub subsample: bool,
    pub labelled_fraction: f64,
    scan: Option<(String, Task<ScanSummary>)>,
    import: Option<(PathBuf, Task<ImportOutcome>)>,
    /// The app was told to open the imported project.
    opened: bool,
    browse_data: Browser,
    browse_project: Browser,
}

/// What the dialog asks the app to do.
#[derive(Clone, Debug, PartialEq)]
pub enum NewProjectAction {
    None,
    /// The project is ready: open it.
    Open(PathBuf),
    Close,
}

/// `<data>.medmine` beside the dataset folder.
fn default_project(data: &Path) -> PathBuf {
    let name = data
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("dataset");
    data.with_file_name(format!("{name}.medmine"))
}

/// Scans the dataset folder and its split lists.
pub fn scan(data: &Path) -> Result<ScanSummary> {
    let ds = Dataset::scan(data)?;
    let split_dir = ["train.txt", "splits/train.txt"]
        .iter()
        .map(|s| data.join(s))
        .find(|p| p.is_file())
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let mut lists = [None; 3];
    if let Some(d) = &split_dir {
        for (i, f) in ["train.txt", "val.txt", "test.txt"].iter().enumerate() {
            let p = d.join(f);
            if p.is_file() {
                lists[i] = Some(data::read_split_list(&p)?.len());
            }
        }
    }
    Ok(ScanSummary {
        images: ds.samples.len(),
        masks: ds.samples.iter().filter(|s| s.mask.is_some()).count(),
        split_dir,
        lists,
        skipped: ds.skipped,
    })
}

/// Creates the project at `root` and imports `opts` into it, or just reports an existing
/// project. A failed import leaves no half-made project behind.
pub fn create(root: &Path, opts: &ImportOptions) -> Result<ImportOutcome> {
    if root.join(DB_FILE).is_file() {
        return Ok(ImportOutcome::Existing);
    }
    let existed = root.exists();
    let r = Project::init(root)
        .with_context(|| format!("creating the project folder {}", root.display()))
        .and_then(|mut p| {
            p.import(opts)
                .with_context(|| format!("importing {}", opts.data.display()))
        });
    match r {
        Ok(report) => Ok(ImportOutcome::Imported(report)),
        Err(e) => {
            if existed {
                for f in [DB_FILE, "medmine.db-wal", "medmine.db-shm"] {
                    let _ = std::fs::remove_file(root.join(f));
                }
            } else {
                let _ = std::fs::remove_dir_all(root);
            }
            Err(e)
        }
    }
}

impl NewProject {
    /// The dialog for the dataset folder `data` (empty: the user types or browses it).
    pub fn new(data: &str) -> Self {
        let mut n = NewProject {
            data: String::new(),
            project: String::new(),
            project_edited: false,
            use_splits: true,
            subsample: false,
            labelled_fraction: 0.5,
            scan: None,
            import: None,
            opened: false,
            browse_data: Browser::default(),
            browse_project: Browser::default(),
        };
        n.set_data(data);
        n
    }

    /// A new dataset folder (typed, or from the native dialog).
    pub fn set_data(&mut self, data: &str) {
        self.data = data.to_string();
        if !self.project_edited {
            self.project = match validate(data, PathKind::Folder) {
                Ok(p) => default_project(&p).display().to_string(),
                Err(_) => String::new(),
            };
        }
    }

    /// The fraction of the masks that stays labelled.
    pub fn fraction(&self) -> f64 {
        if self.subsample {
            self.labelled_fraction
        } else {
            1.0
        }
    }

    /// What a scan found, once it has finished.
    pub fn scan_summary(&self) -> Option<&ScanSummary> {
        match &self.scan {
            Some((d, t)) if *d == self.data => t.done().and_then(|r| r.as_ref().ok()),
            _ => None, // none yet, or made for another folder
        }
    }

    /// The import's result, once it has finished.
    pub fn import_result(&self) -> Option<&Result<ImportOutcome, String>> {
        self.import.as_ref().and_then(|(_, t)| t.done())
    }

    pub fn importing(&self) -> bool {
        matches!(self.import, Some((_, Task::Running(_))))
    }

    /// The import options the dialog describes.
    pub fn options(&self) -> Result<ImportOptions, String> {
        let data = validate(&self.data, PathKind::Folder).map_err(|e| format!("dataset: {e}"))?;
        let mut opts = ImportOptions::new(&data);
        opts.labelled_fraction = self.fraction();
        opts.skip_unusable = true;
        if self.use_splits {
            opts.split_dir = self.scan_summary().and_then(|s| s.split_dir.clone());
        }
        Ok(opts)
    }

    /// Starts the import on its own thread (the answer wakes the UI).
    pub fn start_import(&mut self, ctx: &egui::Context) -> Result<(), String> {
        let opts = self.options()?;
        let root = validate(&self.project, PathKind::NewFolder)
            .map_err(|e| format!("project folder: {e}"))?;
        let r = root.clone();
        let task = Task::spawn(ctx, move || create(&r, &opts).map_err(|e| format!("{e:#}")));
        self.import = Some((root, task));
        Ok(())
    }

    /// Keeps the scan in step with the dataset field and collects finished work.
    fn poll(&mut self, ctx: &egui::Context) {
        if let Some(p) = self.browse_data.poll() {
            self.set_data(&p.display().to_string());
        }
        if let Some(p) = self.browse_project.poll() {
            self.project = p.display().to_string();
            self.project_edited = true;
        }
        let stale = self.scan.as_ref().is_none_or(|(d, _)| *d != self.data);
        if stale {
            self.scan = validate(&self.data, PathKind::Folder).ok().map(|p| {
                let task = Task::spawn(ctx, move || scan(&p).map_err(|e| format!("{e:#}")));
                (self.data.clone(), task)
            });
        }
        if let Some((_, t)) = &mut self.scan {
            t.poll();
        }
        if let Some((_, t)) = &mut self.import {
            t.poll();
        }
    }

    /// Draws the dialog; returns what the app should do.
    pub fn window_ui(&mut self, ctx: &egui::Context) -> NewProjectAction {
        self.poll(ctx);
        let mut open = true;
        egui::Window::new("New project from dataset")
            .open(&mut open)
            .collapsible(false)
            .default_width(520.0)
            .show(ctx, |ui| self.dialog_ui(ui));
        if !open {
            return NewProjectAction::Close;
        }
        // The import has finished: open the project once (the report stays on screen).
        match &self.import {
            Some((root, Task::Done(Ok(_)))) if !self.opened => {
                self.opened = true;
                NewProjectAction::Open(root.clone())
            }
            _ => NewProjectAction::None,
        }
    }

    fn dialog_ui(&mut self, ui: &mut egui::Ui) {
        let busy = self.importing();
        ui.add_enabled_ui(!busy && self.import_result().is_none_or(|r| r.is_err()), |ui| {
            let r = path_field_ui(ui, "dataset folder", &mut self.data, PathKind::Folder);
            if r.browse {
                self.browse_data.open(
                    ui.ctx(),
                    PathKind::Folder,
                    "Dataset folder (images/, optional masks/ and train.txt)",
                    None,
                );
            }
            if r.changed {
                let d = self.data.clone();
                self.set_data(&d);
            }
            ui.label(
                RichText::new("images/ with the images; optional masks/ (same file stems) and train.txt, val.txt, test.txt")
                    .small()
                    .weak(),
            );
            if self.import_result().is_none_or(|r| r.is_err()) {
                self.scan_ui(ui); // the import's report supersedes it
            }
            ui.separator();
            let r = path_field_ui(ui, "project folder", &mut self.project, PathKind::NewFolder);
            if r.changed {
                self.project_edited = true;
            }
            if r.browse {
                self.browse_project.open(
                    ui.ctx(),
                    PathKind::NewFolder,
                    "Where the project folder goes",
                    None,
                );
            }
            ui.checkbox(
                &mut self.subsample,
                "keep only a fraction of the masks as labelled (the rest is mined)",
            )
            .on_hover_text(
                "Off: every image with a mask is labelled. On: a seeded share keeps its mask, \
                 the others become unlabelled (to simulate fewer labels)",
            );
            if self.subsample {
                ui.add(
                    egui::Slider::new(&mut self.labelled_fraction, 0.05..=1.0)
                        .text("labelled fraction"),
                );
            }
        });
        ui.separator();
        // the scan decides whether the split lists are used: wait for it
        let ready = self.scan_summary().is_some()
            && self.options().is_ok()
            && validate(&self.project, PathKind::NewFolder).is_ok();
        ui.horizontal(|ui| {
            let create = ui
                .add_enabled(ready && !busy, egui::Button::new("Create"))
                .on_hover_text("Import the dataset into the project folder and open it")
                .on_disabled_hover_text(
                    "Choose a dataset folder (and wait for its scan) and a project folder first",
                );
            if create.clicked() {
                if let Err(e) = self.start_import(ui.ctx()) {
                    self.import = Some((PathBuf::new(), Task::Done(Err(e))));
                }
            }
            if busy {
                super::panels::spinner_ui(ui, None, "importing");
                ui.label("importing (every image and mask is decoded and checked)…");
            }
        });
        self.report_ui(ui);
    }

    fn scan_ui(&mut self, ui: &mut egui::Ui) {
        let Some((_, task)) = &self.scan else {
            return;
        };
        match task.done() {
            None => {
                ui.horizontal(|ui| {
                    super::panels::spinner_ui(ui, None, "scanning");
                    ui.label("looking at the folder…");
                });
            }
            Some(Err(e)) => {
                ui.label(RichText::new(e).color(Color32::from_rgb(230, 90, 80)));
            }
            Some(Ok(s)) => {
                ui.label(format!(
                    "found {} images, {} with a mask",
                    s.images, s.masks
                ));
                if let Some(d) = &s.split_dir {
                    let n = |v: Option<usize>| v.map_or("–".into(), |v| v.to_string());
                    ui.checkbox(
                        &mut self.use_splits,
                        format!(
                            "use the split lists in {} (train {}, val {}, test {})",
                            d.display(),
                            n(s.lists[0]),
                            n(s.lists[1]),
                            n(s.lists[2])
                        ),
                    )
                    .on_hover_text(
                        "On: train.txt is the training pool, val.txt and test.txt are held out. \
                         Off: every image with a mask is labelled",
                    );
                }
                skipped_ui(ui, "scan", &s.skipped);
            }
        }
    }

    /// The import's report.
    fn report_ui(&self, ui: &mut egui::Ui) {
        let Some((root, Task::Done(result))) = &self.import else {
            return;
        };
        ui.separator();
        match result {
            Err(e) => {
                ui.label(
                    RichText::new(format!("The project was not created: {e}"))
                        .color(Color32::from_rgb(230, 90, 80)),
                );
                ui.label(
                    "Fix the files named above (or remove them from the folder) and press Create again.",
                );
            }
            Ok(ImportOutcome::Existing) => {
                ui.label(format!(
                    "{} is already a project: it is opened, nothing was imported.",
                    root.display()
                ));
            }
            Ok(ImportOutcome::Imported(r)) => {
                ui.label(
                    RichText::new(format!(
                        "Imported {} images ({} with ground truth) into {}",
                        r.imported,
                        r.ground_truth,
                        root.display()
                    ))
                    .strong(),
                );
                let n = |role| r.by_role.get(&role).copied().unwrap_or(0);
                ui.label(format!(
                    "labelled {} · unlabelled {} · val {} · test {}",
                    n(Role::Labelled),
                    n(Role::Unlabelled),
                    n(Role::Val),
                    n(Role::Test)
                ));
                skipped_ui(ui, "import", &r.skipped);
            }
        }
    }
}

/// The skipped files, each with its reason (collapsed when there are many).
fn skipped_ui(ui: &mut egui::Ui, id: &str, skipped: &[Skipped]) {
    if skipped.is_empty() {
        return;
    }
    let title = format!(
        "{} file{} skipped",
        skipped.len(),
        if skipped.len() == 1 { "" } else { "s" }
    );
    egui::CollapsingHeader::new(RichText::new(title).color(Color32::from_rgb(230, 150, 60)))
        .id_salt(("skipped", id))
        .default_open(skipped.len() <= 20)
        .show(ui, |ui| {
            egui::ScrollArea::vertical()
                .id_salt(("skipped-scroll", id))
                .max_height(160.0)
                .show(ui, |ui| {
                    for k in skipped {
                        let name = k
                            .path
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| k.path.display().to_string());
                        ui.label(format!("{name}: {}", k.reason))
                            .on_hover_text(k.path.display().to_string());
                    }
                });
        });
}
