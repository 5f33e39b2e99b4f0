//! Window/level for the radiologist: the window in the image's own values (Hounsfield units
//! for CT and other rescaled DICOM, modality values for other DICOM, gray levels `0..=255`
//! otherwise), its presets, what the shader gets, and which window an image starts with.
//!
//! Which window an image shows, first found wins: the window the user set for that image, the
//! project's window (when it is in the image's unit), the DICOM file's own window, the full
//! range. All of them are kept in the project store (see `store::views`).
use crate::data::ValueRange;
use crate::store::ViewWindow;

/// A display window: `center` and `width` in the image's own values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub center: f64,
    pub width: f64,
}

/// The unit an image's values are in (a stored window applies only to images of its unit).
pub fn unit(range: &ValueRange) -> &'static str {
    match (range.dicom, range.rescaled) {
        (true, true) => "hu",
        (true, false) => "modality",
        (false, _) => "gray8",
    }
}

/// Window presets.
///
/// For rescaled DICOM (CT: Hounsfield units) they are the usual CT windows (centre / width):
/// lung -600 / 1500, mediastinum 50 / 350, bone 400 / 1800, soft tissue 40 / 400.
///
/// For every other image (8-bit gray `0..=255`, 16-bit images stretched to that range, and
/// DICOM X-rays without rescale, in their own min..max) there are no Hounsfield units, so the
/// presets are fixed parts of the image's own range `lo..hi` (as fractions of it): lung
/// 0..0.55 (spreads the dark, air-filled structures), mediastinum 0.35..0.85 (the mid-gray
/// soft tissue behind the heart), bone 0.55..1 (the bright end), soft tissue 0.2..0.8 (a
/// moderate contrast boost); full range is `lo..hi` for every image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Lung,
    Mediastinum,
    Bone,
    SoftTissue,
    FullRange,
}

impl Preset {
    pub const ALL: [Preset; 5] = [
        Preset::Lung,
        Preset::Mediastinum,
        Preset::Bone,
        Preset::SoftTissue,
        Preset::FullRange,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Preset::Lung => "lung",
            Preset::Mediastinum => "mediastinum",
            Preset::Bone => "bone",
            Preset::SoftTissue => "soft tissue",
            Preset::FullRange => "full range",
        }
    }

    /// The preset's window for an image of `range`.
    pub fn window(self, range: &ValueRange) -> Window {
        if self == Preset::FullRange {
            return full_range(range);
        }
        if range.dicom && range.rescaled {
            let (center, width) = match self {
                Preset::Lung => (-600.0, 1500.0),
                Preset::Mediastinum => (50.0, 350.0),
                Preset::Bone => (400.0, 1800.0),
                Preset::SoftTissue => (40.0, 400.0),
                Preset::FullRange => unreachable!("handled above"),
            };
            return Window { center, width };
        }
        let (a, b) = match self {
            Preset::Lung => (0.0, 0.55),
            Preset::Mediastinum => (0.35, 0.85),
            Preset::Bone => (0.55, 1.0),
            Preset::SoftTissue => (0.2, 0.8),
            Preset::FullRange => unreachable!("handled above"),
        };
        let span = span(range);
        Window {
            center: range.lo + (a + b) / 2.0 * span,
            width: (b - a) * span,
        }
    }
}

/// `hi - lo`, at least a tiny positive number (a constant image).
fn span(range: &ValueRange) -> f64 {
    (range.hi - range.lo).max(1e-6)
}

/// The whole range of the image.
pub fn full_range(range: &ValueRange) -> Window {
    Window {
        center: (range.lo + range.hi) / 2.0,
        width: span(range),
    }
}

impl Window {
    /// `(level, width)` in the `[0, 1]` display values of the image (the shader's `window`):
    /// those values are `(v - lo) / (hi - lo)`, or one minus that for `MONOCHROME1`.
    pub fn to_shader(self, range: &ValueRange) -> [f32; 2] {
        let s = span(range);
        let level = (self.center - range.lo) / s;
        let level = if range.inverted { 1.0 - level } else { level };
        [level as f32, (self.width / s) as f32]
    }

    /// The window after a right-drag of `dlevel`, `dwidth` (fractions of the display range,
    /// as the canvas reports them); the width stays between 1/1000 of the range and 4 times
    /// the range.
    pub fn dragged(self, range: &ValueRange, dlevel: f32, dwidth: f32) -> Window {
        let s = span(range);
        let dl = f64::from(dlevel) * s;
        Window {
            center: self.center + if range.inverted { -dl } else { dl },
            width: (self.width + f64::from(dwidth) * s).clamp(s / 1000.0, 4.0 * s),
        }
    }

    pub fn stored(self, range: &ValueRange) -> ViewWindow {
        ViewWindow {
            center: self.center,
            width: self.width,
            unit: unit(range).into(),
        }
    }

    /// A stored window, if it is in the unit of `range`.
    pub fn from_stored(w: &ViewWindow, range: &ValueRange) -> Option<Window> {
        (w.unit == unit(range) && w.width > 0.0 && w.center.is_finite()).then_some(Window {
            center: w.center,
            width: w.width,
        })
    }
}

/// Where the window on screen came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSource {
    /// Set by the user for this image (kept in the project).
    Image,
    /// The project's window.
    Project,
    /// The DICOM file's WindowCenter/WindowWidth.
    File,
    /// The image's full range.
    FullRange,
}

impl WindowSource {
    pub fn describe(self) -> &'static str {
        match self {
            WindowSource::Image => "this image's window",
            WindowSource::Project => "the project's window",
            WindowSource::File => "the DICOM file's window",
            WindowSource::FullRange => "full range",
        }
    }
}

/// The window an image starts with (see the module docs for the order).
pub fn initial(
    range: &ValueRange,
    image: Option<&ViewWindow>,
    project: Option<&ViewWindow>,
) -> (Window, WindowSource) {
    if let Some(w) = image.and_then(|w| Window::from_stored(w, range)) {
        return (w, WindowSource::Image);
    }
    if let Some(w) = project.and_then(|w| Window::from_stored(w, range)) {
        return (w, WindowSource::Project);
    }
    if let Some((center, width)) = range.window {
        return (Window { center, width }, WindowSource::File);
    }
    (full_range(range), WindowSource::FullRange)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct() -> ValueRange {
        ValueRange {
            lo: -1024.0,
            hi: 3071.0,
            inverted: false,
            rescaled: true,
            dicom: true,
            window: Some((40.0, 400.0)),
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn ct_presets_are_hounsfield_windows_and_map_to_the_display_range() {
        let r = ct();
        assert_eq!(
            Preset::Lung.window(&r),
            Window {
                center: -600.0,
                width: 1500.0
            }
        );
        assert_eq!(Preset::Bone.window(&r).center, 400.0);
        // full range is the identity in the shader
        let [l, w] = Preset::FullRange.window(&r).to_shader(&r);
        assert!((l - 0.5).abs() < 1e-6 && (w - 1.0).abs() < 1e-6);
        // mediastinum: centre 50 HU is (50 + 1024) / 4095 of the display range
        let [l, w] = Preset::Mediastinum.window(&r).to_shader(&r);
        assert!((f64::from(l) - 1074.0 / 4095.0).abs() < 1e-6);
        assert!((f64::from(w) - 350.0 / 4095.0).abs() < 1e-6);
        // MONOCHROME1: the level is mirrored, the width kept
        let inv = ValueRange {
            inverted: true,
            ..r
        };
        let [li, wi] = Preset::Mediastinum.window(&inv).to_shader(&inv);
        assert!((li - (1.0 - l)).abs() < 1e-6 && (wi - w).abs() < 1e-6);
    }

    #[test]
    fn gray_presets_are_parts_of_the_image_range() {
        let g = ValueRange::GRAY8;
        let lung = Preset::Lung.window(&g);
        assert!(close(lung.center, 0.275 * 255.0) && close(lung.width, 0.55 * 255.0));
        let bone = Preset::Bone.window(&g);
        assert!(close(bone.center + bone.width / 2.0, 255.0));
        for p in Preset::ALL {
            let w = p.window(&g);
            assert!(w.width > 0.0 && w.center - w.width / 2.0 >= -1e-9, "{p:?}");
            assert!(w.center + w.width / 2.0 <= 255.0 + 1e-9, "{p:?}");
        }
        // an X-ray DICOM without rescale: the same fractions of its own range
        let dx = ValueRange {
            lo: 100.0,
            hi: 4100.0,
            rescaled: false,
            ..ct()
        };
        assert!(close(
            Preset::Bone.window(&dx).center,
            100.0 + 0.775 * 4000.0
        ));
    }

    #[test]
    fn dragging_moves_the_centre_and_clamps_the_width() {
        let g = ValueRange::GRAY8;
        let w = full_range(&g).dragged(&g, 0.1, -2.0);
        assert!(close(w.center, 127.5 + 25.5));
        assert!(close(w.width, 0.255), "{w:?}");
        let inv = ValueRange {
            inverted: true,
            ..g
        };
        assert!(close(
            full_range(&inv).dragged(&inv, 0.1, 0.0).center,
            127.5 - 25.5
        ));
        // the shader sees the same change either way
        let a = full_range(&g).dragged(&g, 0.1, 0.0).to_shader(&g);
        let b = full_range(&inv).dragged(&inv, 0.1, 0.0).to_shader(&inv);
        assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.6).abs() < 1e-6);
    }

    #[test]
    fn image_beats_project_beats_file_beats_full_range() {
        let r = ct();
        let stored = |c: f64, unit: &str| ViewWindow {
            center: c,
            width: 100.0,
            unit: unit.into(),
        };
        let (img, proj) = (stored(1.0, "hu"), stored(2.0, "hu"));
        assert_eq!(initial(&r, Some(&img), Some(&proj)).1, WindowSource::Image);
        assert_eq!(initial(&r, Some(&img), Some(&proj)).0.center, 1.0);
        assert_eq!(initial(&r, None, Some(&proj)).0.center, 2.0);
        // a window of another unit does not apply
        assert_eq!(
            initial(&r, None, Some(&stored(2.0, "gray8"))),
            (
                Window {
                    center: 40.0,
                    width: 400.0
                },
                WindowSource::File
            )
        );
        let g = ValueRange::GRAY8;
        assert_eq!(
            initial(&g, None, None),
            (full_range(&g), WindowSource::FullRange)
        );
        let w = Preset::Lung.window(&g);
        assert_eq!(Window::from_stored(&w.stored(&g), &g), Some(w));
        assert_eq!(Window::from_stored(&w.stored(&g), &r), None);
    }
}
