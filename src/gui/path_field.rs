//! A path typed or browsed: a text field, a "Browse…" button (a native dialog, where a desktop
//! portal runs) and a message that says what is wrong with the path and what to do. Every
//! chooser of the app uses it, so a machine without a portal (where the native dialog returns
//! nothing) can still open everything.
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};

use egui::{Color32, RichText};

/// What the path must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// An existing file.
    File,
    /// An existing folder.
    Folder,
    /// A folder that may not exist yet (it is created); its parent must exist.
    NewFolder,
}

/// What the field did this frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathFieldResponse {
    /// The text changed.
    pub changed: bool,
    /// Enter was pressed in the field.
    pub submitted: bool,
    /// "Browse…" was pressed: open the native dialog.
    pub browse: bool,
}

/// `~` and `~/…` expanded with `$HOME`; surrounding blanks and quotes removed (a path pasted
/// from a file manager often has them).
pub fn expand(text: &str) -> PathBuf {
    let t = text.trim().trim_matches(|c| c == '"' || c == '\'');
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    match (t, home()) {
        ("~", Some(h)) => h,
        (t, Some(h)) if t.starts_with("~/") => h.join(&t[2..]),
        (t, _) => PathBuf::from(t),
    }
}

/// The path the text names, or a message that says what to do.
pub fn validate(text: &str, kind: PathKind) -> Result<PathBuf, String> {
    if text.trim().is_empty() {
        return Err(match kind {
            PathKind::File => "type the path of the file, or press Browse…".into(),
            _ => "type the path of the folder, or press Browse…".into(),
        });
    }
    let p = expand(text);
    let shown = p.display();
    match kind {
        PathKind::File if p.is_dir() => Err(format!(
            "{shown} is a folder: choose a file inside it"
        )),
        PathKind::File if !p.is_file() => Err(format!(
            "{shown} does not exist: check the spelling or press Browse…"
        )),
        PathKind::Folder if p.is_file() => Err(format!(
            "{shown} is a file: choose the folder that contains it"
        )),
        PathKind::Folder if !p.is_dir() => Err(format!(
            "{shown} does not exist: check the spelling or press Browse…"
        )),
        PathKind::NewFolder if p.is_file() => Err(format!(
            "{shown} is a file: choose a folder (it is created if missing)"
        )),
        PathKind::NewFolder if !p.is_dir() && !parent_exists(&p) => Err(format!(
            "the folder that would contain {shown} does not exist: create it first or choose another place"
        )),
        _ => Ok(p),
    }
}

fn parent_exists(p: &Path) -> bool {
    match p.parent() {
        Some(d) if d.as_os_str().is_empty() => true, // relative to the working directory
        Some(d) => d.is_dir(),
        None => false,
    }
}

/// One row: `label`, the text field (labelled for screen readers and tests), "Browse…"; below
/// it the validation message when the text names nothing usable. `id_salt` keeps two fields
/// with the same label apart.
pub fn path_field_ui(
    ui: &mut egui::Ui,
    label: &str,
    text: &mut String,
    kind: PathKind,
) -> PathFieldResponse {
    let mut out = PathFieldResponse::default();
    ui.horizontal(|ui| {
        let l = ui.label(label);
        let width = (ui.available_width() - 80.0).max(120.0);
        let edit = ui
            .add(
                egui::TextEdit::singleline(text)
                    .desired_width(width)
                    .hint_text(match kind {
                        PathKind::File => "/path/to/file",
                        _ => "/path/to/folder",
                    }),
            )
            .labelled_by(l.id);
        out.changed = edit.changed();
        out.submitted = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        out.browse = ui
            .button("Browse…")
            .on_hover_text(
                "Open the system's file dialog (where none is available, type the path instead)",
            )
            .clicked();
    });
    if let Err(msg) = validate(text, kind) {
        ui.label(
            RichText::new(msg)
                .small()
                .color(Color32::from_rgb(230, 150, 60)),
        );
    }
    out
}

/// A native file or folder dialog on its own thread (the UI keeps running). Where no desktop
/// portal runs it answers nothing, and the typed path is what counts.
#[derive(Default)]
pub struct Browser {
    rx: Option<Receiver<Option<PathBuf>>>,
}

impl Browser {
    /// Opens the dialog (`filter`: a name and extensions, for files).
    pub fn open(
        &mut self,
        ctx: &egui::Context,
        kind: PathKind,
        title: &str,
        filter: Option<(&str, &[&str])>,
    ) {
        let (tx, rx) = channel();
        let ctx = ctx.clone();
        let title = title.to_string();
        let filter = filter.map(|(n, e)| {
            (
                n.to_string(),
                e.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        });
        std::thread::spawn(move || {
            let mut d = rfd::FileDialog::new().set_title(&title);
            if let Some((name, exts)) = &filter {
                d = d.add_filter(name, exts);
            }
            let picked = match kind {
                PathKind::File => d.pick_file(),
                PathKind::Folder | PathKind::NewFolder => d.pick_folder(),
            };
            let _ = tx.send(picked);
            ctx.request_repaint();
        });
        self.rx = Some(rx);
    }

    /// The chosen path, once (nothing while the dialog is open or when it was cancelled).
    pub fn poll(&mut self) -> Option<PathBuf> {
        let r = self.rx.as_ref()?.try_recv();
        match r {
            Ok(p) => {
                self.rx = None;
                p
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                self.rx = None;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.pth");
        std::fs::write(&file, b"x").unwrap();
        let d = dir.path().display().to_string();
        let f = file.display().to_string();
        assert_eq!(validate(&f, PathKind::File), Ok(file.clone()));
        assert_eq!(validate(&d, PathKind::Folder), Ok(dir.path().to_path_buf()));
        assert!(validate("", PathKind::File).unwrap_err().contains("Browse"));
        assert!(validate(&d, PathKind::File)
            .unwrap_err()
            .contains("is a folder"));
        assert!(validate(&f, PathKind::Folder)
            .unwrap_err()
            .contains("is a file"));
        let missing = dir.path().join("nope").display().to_string();
        assert!(validate(&missing, PathKind::Folder)
            .unwrap_err()
            .contains("does not exist"));
        assert!(validate(&missing, PathKind::NewFolder).is_ok());
        let deep = dir.path().join("no/such/x").display().to_string();
        assert!(validate(&deep, PathKind::NewFolder)
            .unwrap_err()
            .contains("create it first"));
        assert_eq!(validate(&format!(" '{f}' "), PathKind::File), Ok(file));
    }
}
