//! The app's dialogs: open a project / load a checkpoint (a typed path or the native dialog),
//! "New project from dataset" ([`super::new_project`]) and the SAM weights manager
//! ([`super::weights_panel`]). Each returns what it wants done; the app applies it after the
//! frame.
use std::path::{Path, PathBuf};

use egui::{Color32, RichText};

use super::app::{App, Intent};
use super::new_project::{NewProject, NewProjectAction};
use super::path_field::{path_field_ui, validate, Browser, PathKind};
use super::weights_panel::{WeightsAction, WeightsManager};
use super::worker::Pick;
use crate::store::DB_FILE;

/// "Open a project" / "Load SAM" / "Load U-Net++": a path typed or browsed.
pub struct PathPrompt {
    pub purpose: Pick,
    pub text: String,
    error: Option<String>,
    browser: Browser,
}

impl PathPrompt {
    pub fn new(purpose: Pick, initial: Option<&Path>) -> Self {
        Self {
            purpose,
            text: initial.map(|p| p.display().to_string()).unwrap_or_default(),
            error: None,
            browser: Browser::default(),
        }
    }

    fn kind(&self) -> PathKind {
        match self.purpose {
            Pick::Project | Pick::Dataset => PathKind::Folder,
            Pick::Sam | Pick::Unet => PathKind::File,
        }
    }

    fn title(&self) -> &'static str {
        match self.purpose {
            Pick::Project => "Open a project",
            Pick::Dataset => "Dataset folder",
            Pick::Sam => "Load a SAM checkpoint",
            Pick::Unet => "Load a U-Net++ checkpoint",
        }
    }

    /// The path, or what is wrong with it and what to do.
    pub fn check(&self) -> Result<PathBuf, String> {
        let p = validate(&self.text, self.kind())?;
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        match self.purpose {
            Pick::Project if !p.join(DB_FILE).is_file() => Err(format!(
                "{} is not a medmine project (it has no {DB_FILE}): choose the project folder, or make one with Project > New project from dataset…",
                p.display()
            )),
            Pick::Sam if !matches!(ext, "pth" | "pt" | "safetensors") => Err(format!(
                "{} is not a SAM checkpoint (.pth, .pt or .safetensors); the SAM weights window downloads the official ones",
                p.display()
            )),
            Pick::Unet if ext != "safetensors" => Err(format!(
                "{} is not a medmine U-Net++ checkpoint (.safetensors, written by training)",
                p.display()
            )),
            _ => Ok(p),
        }
    }

    /// Draws the window; `Some(Ok(path))` when the user chose, `Some(Err(()))` when closed.
    pub fn window_ui(&mut self, ctx: &egui::Context) -> Option<Result<PathBuf, ()>> {
        let mut chosen = None;
        if let Some(p) = self.browser.poll() {
            self.text = p.display().to_string();
            match self.check() {
                Ok(p) => return Some(Ok(p)),
                Err(e) => self.error = Some(e),
            }
        }
        let mut open = true;
        let kind = self.kind();
        egui::Window::new(self.title())
            .open(&mut open)
            .collapsible(false)
            .default_width(520.0)
            .show(ctx, |ui| {
                let label = match kind {
                    PathKind::File => "file",
                    _ => "folder",
                };
                let r = path_field_ui(ui, label, &mut self.text, kind);
                if r.changed {
                    self.error = None;
                }
                if r.browse {
                    let filter: Option<(&str, &[&str])> = match self.purpose {
                        Pick::Sam => Some(("checkpoint", &["pth", "pt", "safetensors"])),
                        Pick::Unet => Some(("checkpoint", &["safetensors"])),
                        _ => None,
                    };
                    self.browser.open(ctx, kind, self.title(), filter);
                }
                if let Some(e) = &self.error {
                    ui.label(RichText::new(e).color(Color32::from_rgb(230, 90, 80)));
                }
                let ok = ui.button("Open").clicked();
                if ok || r.submitted {
                    match self.check() {
                        Ok(p) => chosen = Some(Ok(p)),
                        Err(e) => self.error = Some(e),
                    }
                }
            });
        if !open {
            return Some(Err(()));
        }
        chosen
    }
}

/// Every dialog of the app.
pub struct Dialogs {
    pub prompt: Option<PathPrompt>,
    pub new_project: Option<NewProject>,
    pub weights: WeightsManager,
}

impl Dialogs {
    pub fn new(weights_dir: Option<&Path>) -> Self {
        let dir = weights_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(super::weights_panel::default_dir);
        Self {
            prompt: None,
            new_project: None,
            weights: WeightsManager::new(&dir),
        }
    }
}

impl App {
    /// Opens the chooser for `purpose` (a typed path, or Browse…).
    pub(super) fn choose(&mut self, purpose: Pick) {
        if purpose == Pick::Dataset {
            // an import in progress keeps its dialog (its result opens the project)
            if !self
                .dialogs
                .new_project
                .as_ref()
                .is_some_and(|n| n.importing())
            {
                self.dialogs.new_project = Some(NewProject::new(""));
            }
            return;
        }
        let initial = match purpose {
            Pick::Project => self.project.clone(),
            Pick::Sam => self.prefs.sam_checkpoint.clone(),
            Pick::Unet => self.model.clone(),
            Pick::Dataset => None,
        };
        self.dialogs.prompt = Some(PathPrompt::new(purpose, initial.as_deref()));
    }

    /// Draws the open dialogs and queues what they ask for.
    pub(super) fn dialogs_ui(&mut self, ctx: &egui::Context) {
        if let Some(p) = &mut self.dialogs.prompt {
            match p.window_ui(ctx) {
                Some(Ok(path)) => {
                    let purpose = p.purpose;
                    self.dialogs.prompt = None;
                    self.picked(purpose, path);
                }
                Some(Err(())) => self.dialogs.prompt = None,
                None => {}
            }
        }
        if let Some(n) = &mut self.dialogs.new_project {
            match n.window_ui(ctx) {
                NewProjectAction::Open(root) => self.intents.push(Intent::Open(root)),
                NewProjectAction::Close => self.dialogs.new_project = None,
                NewProjectAction::None => {}
            }
        }
        let active = self.sam.as_ref().map(|(p, _)| p.clone());
        if let Some(WeightsAction::Use(path)) =
            self.dialogs.weights.window_ui(ctx, active.as_deref())
        {
            self.intents.push(Intent::LoadSam(path));
        }
        if let Some(dir) = self.dialogs.weights.folder() {
            if self.prefs.weights_dir.as_ref() != Some(&dir) {
                self.prefs.weights_dir = Some(dir);
            }
        }
    }

    /// The dialogs (tests and scripted use).
    pub fn dialogs(&self) -> &Dialogs {
        &self.dialogs
    }

    pub fn dialogs_mut(&mut self) -> &mut Dialogs {
        &mut self.dialogs
    }
}
