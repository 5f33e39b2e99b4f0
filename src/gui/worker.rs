//! Background threads of the app. The UI sends commands and receives [`Event`]s; every event
//! wakes the UI with `request_repaint`. Nothing here blocks a frame.
//!
//! - the **store** thread owns the project connection: listing, loading an image with its
//!   layers, reviews and edits (durable before their event is sent);
//! - the **model** thread (`model_thread.rs`) owns the device and the models (SAM, U-Net++):
//!   SAM clicks on cached embeddings, probability maps, and the long jobs (fine-tuning,
//!   mining) with a shared cancel flag checked every batch/image; what runs next is decided
//!   by `scheduler.rs` (clicks first, stale prefetches dropped, nothing else ever dropped);
//!   every job ends with exactly one [`Event::JobDone`]; a dead model thread is reported
//!   ([`Event::ModelThreadRestarted`]) and restarted;
//! - the **thumbnail** thread decodes small previews.
//!
//! A panic inside a command becomes an [`Event::Error`]; the thread keeps serving.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use candle_core::Device;

use crate::data::{self, Mask};
use crate::mining::finetune::FinetuneConfig;
use crate::mining::{LabelerKind, MiningConfig, MiningSummary};
use crate::progress::TrainEvent;
use crate::store::{PseudoLabel, ReviewState, Role, ViewWindow};
use crate::train::TrainStatus;

/// One row of the image list.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageRow {
    pub name: String,
    pub role: Role,
    pub state: ReviewState,
    pub quality: Option<f64>,
    pub ground_truth: bool,
    pub pseudo_label: bool,
    pub path: PathBuf,
    /// Dice of the newest pseudo-label against the ground truth (cached in the store).
    pub pseudo_dice: Option<f64>,
    /// Dice of the loaded U-Net++'s prediction against the ground truth.
    pub unet_dice: Option<f64>,
    /// Mean binary entropy of the loaded U-Net++'s probability map.
    pub uncertainty: Option<f64>,
}

/// An image with everything the canvas shows.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    pub name: String,
    pub path: PathBuf,
    pub role: Role,
    pub state: ReviewState,
    pub width: usize,
    pub height: usize,
    /// RGBA8 pixels ([`super::overlay::image_rgba`]: 16-bit gray in R/G for grayscale images).
    pub rgba: Vec<u8>,
    /// All three channels equal (window/level applies).
    pub grayscale: bool,
    pub ground_truth: Option<Mask>,
    /// Newest pseudo-label mask.
    pub pseudo: Option<Mask>,
    /// The current edited mask, if the reviewer saved one.
    pub edit: Option<Mask>,
    /// Every round's pseudo-label (prompts and scores), oldest first.
    pub rounds: Vec<PseudoLabel>,
    /// What the image's `[0, 1]` values stand for (window/level units, the DICOM window).
    pub range: data::ValueRange,
    /// The window the user set for this image, and the project's window.
    pub window_image: Option<ViewWindow>,
    pub window_project: Option<ViewWindow>,
}

/// Work for the store thread.
#[derive(Debug)]
pub enum StoreCommand {
    Open(PathBuf),
    /// Opens `project`, creating it from the dataset folder `data` first if it does not exist.
    OpenOrCreate {
        project: PathBuf,
        data: PathBuf,
        split_dir: Option<PathBuf>,
        labelled_fraction: f64,
    },
    Refresh,
    Load(String),
    Review {
        image: String,
        state: ReviewState,
    },
    SaveEdit {
        image: String,
        mask: Mask,
    },
    Undo(String),
    Redo(String),
    /// Drops the edit: the SAM proposal (newest pseudo-label) is current again (pending).
    ResetToProposal(String),
    /// Keeps a display window: for `image`, or the project's when `None`; `window: None`
    /// removes it (the image follows the project's window again).
    SetWindow {
        image: Option<String>,
        window: Option<ViewWindow>,
    },
    /// The U-Net++ the list's Dice and uncertainty are for (`None`: no model).
    SetModel(Option<PathBuf>),
    /// Caches the U-Net++ score of an image: its Dice against the ground truth (computed
    /// here, where the truth is) and its uncertainty; answered with [`Event::Scored`].
    SaveScore {
        image: String,
        model: PathBuf,
        /// The prediction, 0/1 per pixel.
        prediction: Vec<u8>,
        uncertainty: f64,
    },
}

/// A SAM prompt from the canvas, in original-image pixels.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClickPrompt {
    /// (x, y, positive)
    pub points_in_image: Vec<(f32, f32, bool)>,
    pub box_in_image: Option<[f32; 4]>,
    /// The previous answer's low-res logits (`256 x 256`) for a follow-up click on the same
    /// object.
    pub mask_input: Option<Arc<Vec<f32>>>,
}

/// Work for the model thread.
#[derive(Debug)]
pub enum ModelCommand {
    /// A SAM checkpoint, and the variant asked for (`None`: from the file).
    LoadSam(PathBuf, Option<crate::models::sam::Variant>),
    LoadUnet(PathBuf),
    /// A project was opened: drop the previous project's U-Net++ and SAM embedding cache, and
    /// load the project's own model (`model`, if it has one).
    SetProject {
        root: PathBuf,
        model: Option<PathBuf>,
    },
    /// Encode an image ahead of the first click (cached in memory and in the project).
    Embed {
        project: PathBuf,
        image: String,
        path: PathBuf,
    },
    Sam {
        project: PathBuf,
        image: String,
        path: PathBuf,
        prompt: ClickPrompt,
        seq: u64,
    },
    /// U-Net++ probability map of an image.
    Probability {
        image: String,
        path: PathBuf,
    },
    Finetune(FinetuneJob),
    /// Encode every listed image into the project's embedding cache (a background job).
    Precompute {
        project: PathBuf,
        paths: Vec<PathBuf>,
    },
    /// One mining pass ([`crate::mining::mine_project`]); `sam` is needed by the SAM labeler
    /// only.
    Mine {
        project: PathBuf,
        labeler: LabelerKind,
        sam: Option<PathBuf>,
        unet: PathBuf,
        cfg: Box<MiningConfig>,
    },
    /// Any other background job, run like the built-in ones (one at a time, with the cancel
    /// flag, yielding nothing, ending with exactly one [`Event::JobDone`]).
    Job(CustomJob),
}

/// What a [`CustomJob`] gets: the cancel flag and a progress sink.
pub struct JobContext<'a> {
    pub cancel: &'a AtomicBool,
    pub progress: &'a mut dyn FnMut(usize, usize),
}

/// A job given as a function: `Ok(message)` ends it as done; an error or a panic as failed.
pub struct CustomJob {
    pub what: String,
    #[allow(clippy::type_complexity)]
    pub run: Box<dyn FnOnce(&mut JobContext<'_>) -> Result<String> + Send>,
}

impl std::fmt::Debug for CustomJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({})", self.what)
    }
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Done,
    Cancelled,
    Failed,
}

/// A fine-tuning request from the training panel.
#[derive(Clone, Debug)]
pub struct FinetuneJob {
    pub project: PathBuf,
    /// Start from this checkpoint; `None` trains a fresh U-Net++ of `size`/`base`.
    pub checkpoint: Option<PathBuf>,
    pub size: usize,
    pub base: usize,
    pub cfg: FinetuneConfig,
}

/// What a finished fine-tuning round reports.
#[derive(Clone, Debug, PartialEq)]
pub struct FinetuneResult {
    /// The project it was trained for.
    pub project: PathBuf,
    pub best: PathBuf,
    pub status: TrainStatus,
    pub new_dice: Option<f64>,
    pub old_dice: Option<f64>,
    pub epochs_done: usize,
}

/// What comes back to the UI.
#[derive(Debug)]
pub enum Event {
    Opened {
        root: PathBuf,
        rows: Vec<ImageRow>,
        model: Option<PathBuf>,
    },
    Listing(Vec<ImageRow>),
    /// The U-Net++ score of one image is kept (for the list's row).
    Scored {
        image: String,
        model: PathBuf,
        dice: Option<f64>,
        uncertainty: f64,
    },
    Loaded(Box<LoadedImage>),
    /// A review is committed to the store.
    Reviewed {
        image: String,
        state: ReviewState,
    },
    /// The current mask changed in the store (edit, undo, redo, reset).
    MaskSaved {
        image: String,
        state: ReviewState,
        edit: Option<Mask>,
    },
    /// Nothing to undo/redo.
    Nothing(String),
    Thumbnail {
        image: String,
        size: [usize; 2],
        rgba: Vec<u8>,
    },
    SamLoaded {
        path: PathBuf,
        variant: String,
    },
    /// A U-Net++ is loaded, for `project` (the project the model thread had then).
    UnetLoaded {
        project: Option<PathBuf>,
        path: PathBuf,
        size: usize,
        dice: Option<f64>,
    },
    Embedded {
        image: String,
    },
    SamMask {
        image: String,
        seq: u64,
        mask: Mask,
        iou: f32,
        /// The answer's low-res logits (`256 x 256`): the next click's mask input.
        low_res: Arc<Vec<f32>>,
    },
    Probability {
        image: String,
        probs: Vec<u8>,
        /// Mean binary entropy of the map ([`crate::metrics::mean_binary_entropy`]).
        uncertainty: f64,
    },
    JobStarted {
        what: String,
    },
    JobProgress {
        done: usize,
        total: usize,
    },
    Train(TrainEvent),
    FinetuneDone(FinetuneResult),
    /// A mining pass ended (also when cancelled); sent before its [`Event::JobDone`].
    Mined {
        project: PathBuf,
        summary: Box<MiningSummary>,
    },
    /// The one terminal event of every job, whatever happened (a guard sends it on panic).
    JobDone {
        what: String,
        outcome: JobOutcome,
        message: String,
    },
    /// The model thread crashed outside any job and was restarted: no model is loaded.
    ModelThreadRestarted,
    Error {
        context: String,
        message: String,
    },
    /// A file dialog answered.
    Picked {
        purpose: Pick,
        path: PathBuf,
    },
}

pub use super::store_thread::project_model;

/// What a file dialog is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Project,
    Dataset,
    Sam,
    Unet,
}

/// The UI's handle on the threads.
pub struct Workers {
    pub store: Sender<StoreCommand>,
    pub model: Sender<ModelCommand>,
    pub thumbs: Sender<(String, PathBuf)>,
    pub events: Receiver<Event>,
    /// Cancels the running long job (checked every batch / image).
    pub cancel: Arc<AtomicBool>,
    out: Outbox,
}

/// Sends an event and wakes the UI.
#[derive(Clone)]
pub(super) struct Outbox {
    tx: Sender<Event>,
    ctx: egui::Context,
}

impl Outbox {
    pub(super) fn send(&self, e: Event) {
        let _ = self.tx.send(e);
        self.ctx.request_repaint();
    }

    pub(super) fn error(&self, context: &str, e: &anyhow::Error) {
        tracing::error!("{context}: {e:#}");
        self.send(Event::Error {
            context: context.into(),
            message: format!("{e:#}"),
        });
    }
}

/// Runs `f`, turning an error or a panic into an error event.
pub(super) fn guarded(out: &Outbox, context: &str, f: impl FnOnce() -> Result<()>) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => out.error(context, &e),
        Err(p) => {
            let msg = super::scheduler::panic_message(p.as_ref());
            out.error(context, &anyhow!("crashed: {msg}"));
        }
    }
}

impl Workers {
    pub fn spawn(ctx: &egui::Context, device: Device) -> Workers {
        let (event_tx, events) = channel();
        let out = Outbox {
            tx: event_tx,
            ctx: ctx.clone(),
        };
        let (store, store_rx) = channel();
        let (model, model_rx) = channel();
        let (thumbs, thumbs_rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let o = out.clone();
        let outbox = out.clone();
        std::thread::Builder::new()
            .name("medmine-store".into())
            .spawn(move || super::store_thread::store_thread(store_rx, o))
            .expect("spawn the store thread");
        let (o, c) = (out.clone(), cancel.clone());
        std::thread::Builder::new()
            .name("medmine-model".into())
            .spawn(move || super::model_thread::thread_main(device, o, c, model_rx))
            .expect("spawn the model thread");
        std::thread::Builder::new()
            .name("medmine-thumbnails".into())
            .spawn(move || thumbnail_thread(thumbs_rx, out))
            .expect("spawn the thumbnail thread");
        Workers {
            store,
            model,
            thumbs,
            events,
            cancel,
            out: outbox,
        }
    }

    /// Opens a native file dialog on its own thread (the UI keeps running); the answer comes
    /// back as [`Event::Picked`] (nothing when cancelled or when no dialog is available).
    pub fn pick(&self, purpose: Pick) {
        let out = self.out.clone();
        std::thread::spawn(move || {
            let d = rfd::FileDialog::new();
            let path = match purpose {
                Pick::Project => d.set_title("Open a medmine project folder").pick_folder(),
                Pick::Dataset => d
                    .set_title("Dataset folder (images/, optional masks/ and train.txt)")
                    .pick_folder(),
                Pick::Sam => d
                    .set_title("SAM checkpoint")
                    .add_filter("checkpoint", &["pth", "pt", "safetensors"])
                    .pick_file(),
                Pick::Unet => d
                    .set_title("U-Net++ checkpoint")
                    .add_filter("checkpoint", &["safetensors"])
                    .pick_file(),
            };
            if let Some(path) = path {
                out.send(Event::Picked { purpose, path });
            }
        });
    }
}

fn thumbnail_thread(rx: Receiver<(String, PathBuf)>, out: Outbox) {
    for (name, path) in rx {
        // a file that cannot be read simply has no thumbnail (the list shows its name)
        if let Ok(img) = data::load_image(&path) {
            let rgb = crate::mining::to_rgb(&img);
            let t = image::imageops::thumbnail(&rgb, 48, 48);
            let rgba = image::DynamicImage::ImageRgb8(t).to_rgba8();
            out.send(Event::Thumbnail {
                image: name,
                size: [rgba.width() as usize, rgba.height() as usize],
                rgba: rgba.into_raw(),
            });
        }
    }
}
