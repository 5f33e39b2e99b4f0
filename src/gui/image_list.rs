//! The image list (left panel): filters, the sort order (name, pseudo-label quality, Dice
//! against the ground truth, U-Net++ uncertainty) and one row per image with its badge and
//! scores. The scores come cached from the store (see `store::views`); nothing here is
//! computed per frame.
use std::cmp::Ordering;

use egui::RichText;

use super::app::{App, Intent};
use super::panels::{badge, spinner_ui};
use super::worker::ImageRow;
use crate::store::{ReviewState, Role};

/// The order of the image list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SortBy {
    /// File name (the store's order).
    #[default]
    Name,
    /// Pseudo-label quality score, least confident first.
    Quality,
    /// Dice of the newest pseudo-label against the ground truth, worst first.
    PseudoDice,
    /// Dice of the U-Net++ prediction against the ground truth, worst first.
    UnetDice,
    /// Mean binary entropy of the U-Net++ probability map, most uncertain first.
    Uncertainty,
}

impl SortBy {
    pub const ALL: [SortBy; 5] = [
        SortBy::Name,
        SortBy::Quality,
        SortBy::PseudoDice,
        SortBy::UnetDice,
        SortBy::Uncertainty,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SortBy::Name => "name",
            SortBy::Quality => "quality",
            SortBy::PseudoDice => "Dice (pseudo-label)",
            SortBy::UnetDice => "Dice (U-Net++)",
            SortBy::Uncertainty => "uncertainty",
        }
    }

    pub fn tooltip(self) -> &'static str {
        match self {
            SortBy::Name => "By file name",
            SortBy::Quality => {
                "Least confident pseudo-label first (SAM IoU × stability × agreement)"
            }
            SortBy::PseudoDice => {
                "Worst first: Dice of the newest pseudo-label against the ground truth \
                 (images without both last)"
            }
            SortBy::UnetDice => {
                "Worst first: Dice of the U-Net++ prediction against the ground truth (images \
                 shown or scored with the loaded model; others last)"
            }
            SortBy::Uncertainty => {
                "Most uncertain first: mean binary entropy of the U-Net++ probability map \
                 (images shown or scored with the loaded model; others last)"
            }
        }
    }

    /// The value a row is sorted by, and whether larger comes first.
    fn key(self, r: &ImageRow) -> (Option<f64>, bool) {
        match self {
            SortBy::Name => (None, false),
            SortBy::Quality => (r.quality, false),
            SortBy::PseudoDice => (r.pseudo_dice, false),
            SortBy::UnetDice => (r.unet_dice, false),
            SortBy::Uncertainty => (r.uncertainty, true),
        }
    }
}

/// Sorts rows in place: by `by`'s value (rows without one last), ties and the rest by name.
pub fn sort_rows(rows: &mut [&ImageRow], by: SortBy) {
    rows.sort_by(|a, b| {
        let ((ka, desc), (kb, _)) = (by.key(a), by.key(b));
        let by_value = match (ka, kb) {
            (Some(x), Some(y)) if desc => y.total_cmp(&x),
            (Some(x), Some(y)) => x.total_cmp(&y),
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (None, None) => Ordering::Equal,
        };
        by_value.then_with(|| a.name.cmp(&b.name))
    });
}

impl App {
    /// Rows after the filters, in display order.
    pub fn visible_rows(&self) -> Vec<&ImageRow> {
        let mut v: Vec<&ImageRow> = self
            .rows
            .iter()
            .filter(|r| self.filter_state.is_none_or(|s| r.state == s))
            .filter(|r| self.filter_role.is_none_or(|s| r.role == s))
            .collect();
        sort_rows(&mut v, self.sort);
        v
    }

    /// The list's sort order.
    pub fn sort(&self) -> SortBy {
        self.sort
    }

    pub(super) fn image_list_ui(&mut self, ui: &mut egui::Ui) {
        let total = self.rows.iter().filter(|r| r.pseudo_label).count();
        let reviewed = self
            .rows
            .iter()
            .filter(|r| r.pseudo_label && r.state != ReviewState::Pending)
            .count();
        ui.heading("Images");
        ui.label(format!("{reviewed}/{total} pseudo-labels reviewed"))
            .on_hover_text("Images with a pseudo-label that are accepted, rejected or edited");
        ui.horizontal_wrapped(|ui| {
            egui::ComboBox::from_id_salt("filter-state")
                .selected_text(self.filter_state.map_or("any state", |s| s.as_str()))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.filter_state, None, "any state");
                    for s in ReviewState::ALL {
                        ui.selectable_value(&mut self.filter_state, Some(*s), s.as_str());
                    }
                })
                .response
                .on_hover_text("Show only images in this review state");
            egui::ComboBox::from_id_salt("filter-role")
                .selected_text(self.filter_role.map_or("any role", |r| r.as_str()))
                .show_ui(ui, |ui| {
                    ui.selectable_value(&mut self.filter_role, None, "any role");
                    for r in Role::ALL {
                        ui.selectable_value(&mut self.filter_role, Some(*r), r.as_str());
                    }
                })
                .response
                .on_hover_text("Show only images of this split role");
        });
        ui.horizontal_wrapped(|ui| {
            ui.label("sort:");
            for by in SortBy::ALL {
                if ui
                    .selectable_label(self.sort == by, by.label())
                    .on_hover_text(by.tooltip())
                    .clicked()
                {
                    self.sort = by;
                }
            }
            if ui
                .add_enabled(
                    self.model.is_some() && !self.training.running(),
                    egui::Button::new("Score images"),
                )
                .on_hover_text(
                    "Predict every image with the U-Net++ and keep its Dice against the ground \
                     truth and its uncertainty, for the image list's sort",
                )
                .on_disabled_hover_text("Needs a U-Net++ model")
                .clicked()
            {
                self.intents.push(Intent::ScoreAll);
            }
        });
        ui.separator();
        let rows: Vec<_> = self.visible_rows().into_iter().cloned().collect();
        let selected = self.selected.clone();
        egui::ScrollArea::vertical().show_rows(ui, 52.0, rows.len(), |ui, range| {
            for r in &rows[range] {
                let is_sel = selected.as_deref() == Some(r.name.as_str());
                if self.row_ui(ui, r, is_sel).clicked() {
                    self.intents.push(Intent::Select(r.name.clone()));
                }
            }
        });
    }

    fn row_ui(&self, ui: &mut egui::Ui, r: &ImageRow, is_sel: bool) -> egui::Response {
        let (text, color) = badge(r.role, r.state, r.pseudo_label);
        ui.horizontal(|ui| {
            ui.set_min_height(50.0);
            match self.thumbs.get(&r.name) {
                Some(t) => {
                    ui.add(egui::Image::new(t).fit_to_exact_size(egui::vec2(48., 48.)));
                }
                None => {
                    spinner_ui(ui, Some(48.), "loading the thumbnail");
                }
            }
            ui.vertical(|ui| {
                let label = ui.selectable_label(is_sel, &r.name);
                ui.horizontal(|ui| {
                    ui.label(RichText::new(text).color(color).small());
                    if let Some(q) = r.quality {
                        ui.label(RichText::new(format!("q {q:.2}")).small());
                    }
                    let mut scores = Vec::new();
                    if let Some(d) = r.pseudo_dice {
                        scores.push(format!("Dice p {d:.2}"));
                    }
                    if let Some(d) = r.unet_dice {
                        scores.push(format!("u {d:.2}"));
                    }
                    if let Some(h) = r.uncertainty {
                        scores.push(format!("H {h:.2}"));
                    }
                    if !scores.is_empty() {
                        ui.label(RichText::new(scores.join(" · ")).small())
                            .on_hover_text(
                                "Dice against the ground truth of the pseudo-label (p) and of the \
                             U-Net++ prediction (u); H: U-Net++ uncertainty (mean binary \
                             entropy, 0 sure … 1 undecided)",
                            );
                    }
                });
                label
            })
            .inner
        })
        .inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, pseudo: Option<f64>, unet: Option<f64>, h: Option<f64>) -> ImageRow {
        ImageRow {
            name: name.into(),
            role: Role::Unlabelled,
            state: ReviewState::Pending,
            quality: None,
            ground_truth: true,
            pseudo_label: true,
            path: Default::default(),
            pseudo_dice: pseudo,
            unet_dice: unet,
            uncertainty: h,
        }
    }

    fn names(rows: &[ImageRow], by: SortBy) -> Vec<&str> {
        let mut v: Vec<&ImageRow> = rows.iter().collect();
        sort_rows(&mut v, by);
        v.into_iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn sorts_worst_dice_and_most_uncertain_first_unknown_last() {
        let rows = [
            row("a", Some(0.9), None, Some(0.1)),
            row("b", None, Some(0.5), Some(0.4)),
            row("c", Some(0.3), Some(0.7), None),
            row("d", Some(0.3), Some(0.2), Some(0.4)),
        ];
        assert_eq!(names(&rows, SortBy::Name), ["a", "b", "c", "d"]);
        assert_eq!(names(&rows, SortBy::PseudoDice), ["c", "d", "a", "b"]);
        assert_eq!(names(&rows, SortBy::UnetDice), ["d", "b", "c", "a"]);
        assert_eq!(names(&rows, SortBy::Uncertainty), ["b", "d", "a", "c"]);
        // no quality anywhere: by name
        assert_eq!(names(&rows, SortBy::Quality), ["a", "b", "c", "d"]);
    }
}
