//! Exporting a project: PNG masks in the dataset layout, COCO JSON with RLE masks, and a
//! review report (CSV).
//!
//! What is exported: the ground truth of `labelled`, `val` and `test` images, and for every
//! other image that was accepted or edited its current mask (the edited version, else the
//! newest pseudo-label). Unlabelled images' withheld ground truth is never exported.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::fsutil::{self, write_error};
use super::{rle, ImageRecord, Project, Result, Role, StoreError};

/// Output format of [`Project::export`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// `OUT/images/`, `OUT/masks/<stem>.png`, `manifest.csv`, split lists, review report.
    Png,
    /// COCO JSON with uncompressed RLE masks: `OUT` if it ends in `.json`, else
    /// `OUT/annotations.json` (plus `OUT/review_report.csv`).
    Coco,
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(ExportFormat::Png),
            "coco" => Ok(ExportFormat::Coco),
            _ => Err(format!("{s:?} is not an export format (png or coco)")),
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExportReport {
    /// The folder or file written.
    pub out: PathBuf,
    pub ground_truth: usize,
    /// Accepted pseudo-labels (edited ones included).
    pub pseudo_labels: usize,
    /// Accepted images with no mask to export.
    pub notes: Vec<String>,
}

/// One exported mask.
struct Item {
    image: ImageRecord,
    mask: PathBuf,
    /// `ground_truth`, `pseudo_label` or `edited`.
    source: &'static str,
    review: super::Review,
}

/// Quotes a CSV field when needed (RFC 4180).
pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_line(fields: &[&str]) -> String {
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

impl Project {
    fn export_items(&self, notes: &mut Vec<String>) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        for image in self.images()? {
            let review = self.review(&image.name)?;
            let gt = match image.role {
                Role::Labelled | Role::Val | Role::Test => self.ground_truth(&image.name)?,
                Role::Unlabelled => None,
            };
            let (mask, source) = if let Some(gt) = gt {
                (gt, "ground_truth")
            } else if review.state.is_accepted() {
                match self.current_mask(&image.name)? {
                    Some(m) => m,
                    None => {
                        notes.push(format!(
                            "image {}: {} but it has no pseudo-label or edited mask; not exported",
                            image.name, review.state
                        ));
                        continue;
                    }
                }
            } else {
                continue;
            };
            if !image.path.is_file() {
                return Err(StoreError::MissingImageFile {
                    name: image.name,
                    path: image.path,
                });
            }
            if !mask.is_file() {
                return Err(StoreError::MissingMaskFile {
                    name: image.name,
                    path: mask,
                });
            }
            items.push(Item {
                image,
                mask,
                source,
                review,
            });
        }
        Ok(items)
    }

    /// Exports in `format` to `out` (see [`ExportFormat`]). The output is built beside
    /// `out` and renamed into place, so a failed export leaves nothing half-written; an
    /// existing non-empty `out` is refused.
    pub fn export(&self, format: ExportFormat, out: &Path) -> Result<ExportReport> {
        let mut report = ExportReport {
            out: out.to_path_buf(),
            ..Default::default()
        };
        let items = self.export_items(&mut report.notes)?;
        for it in &items {
            if it.source == "ground_truth" {
                report.ground_truth += 1;
            } else {
                report.pseudo_labels += 1;
            }
        }
        let json_file = format == ExportFormat::Coco
            && out.extension().and_then(|e| e.to_str()) == Some("json");
        if json_file {
            if out.exists() {
                return Err(StoreError::ExportExists {
                    path: out.to_path_buf(),
                });
            }
            let text = self.coco_json(&items)?;
            fsutil::write_durable(out, text.as_bytes())?;
            return Ok(report);
        }
        let non_empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if non_empty || (out.exists() && !out.is_dir()) {
            return Err(StoreError::ExportExists {
                path: out.to_path_buf(),
            });
        }
        let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("export");
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| write_error(&parent, e))?;
        let stage = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&stage);
        let result = (|| -> Result<()> {
            std::fs::create_dir_all(&stage).map_err(|e| write_error(&stage, e))?;
            match format {
                ExportFormat::Png => self.write_png_export(&items, &stage)?,
                ExportFormat::Coco => {
                    let text = self.coco_json(&items)?;
                    let p = stage.join("annotations.json");
                    std::fs::write(&p, text).map_err(|e| write_error(&p, e))?;
                }
            }
            let p = stage.join("review_report.csv");
            std::fs::write(&p, self.review_report_csv()?).map_err(|e| write_error(&p, e))?;
            if out.is_dir() {
                std::fs::remove_dir(out).map_err(|e| write_error(out, e))?;
            }
            std::fs::rename(&stage, out).map_err(|e| write_error(out, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&stage);
        }
        result.map(|()| report)
    }

    fn write_png_export(&self, items: &[Item], dir: &Path) -> Result<()> {
        let (images, masks) = (dir.join("images"), dir.join("masks"));
        for d in [&images, &masks] {
            std::fs::create_dir_all(d).map_err(|e| write_error(d, e))?;
        }
        let mut manifest = csv_line(&[
            "image",
            "mask",
            "role",
            "source",
            "review",
            "reviewer",
            "reviewed_at",
            "image_sha256",
        ]);
        let (mut train, mut val, mut test) = (String::new(), String::new(), String::new());
        for it in items {
            let img_out = images.join(&it.image.name);
            std::fs::copy(&it.image.path, &img_out).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    StoreError::MissingImageFile {
                        name: it.image.name.clone(),
                        path: it.image.path.clone(),
                    }
                } else {
                    write_error(&img_out, e)
                }
            })?;
            let mask_name = format!("{}.png", it.image.stem());
            let mask_out = masks.join(&mask_name);
            std::fs::copy(&it.mask, &mask_out).map_err(|e| write_error(&mask_out, e))?;
            manifest.push_str(&csv_line(&[
                &it.image.name,
                &format!("masks/{mask_name}"),
                it.image.role.as_str(),
                it.source,
                it.review.state.as_str(),
                it.review.reviewer.as_deref().unwrap_or(""),
                it.review.at.as_deref().unwrap_or(""),
                &it.image.sha256,
            ]));
            let list = match it.image.role {
                Role::Val => &mut val,
                Role::Test => &mut test,
                Role::Labelled | Role::Unlabelled => &mut train,
            };
            let _ = writeln!(list, "{}", it.image.name);
        }
        let mut files = vec![("manifest.csv", manifest)];
        for (name, text) in [("train.txt", train), ("val.txt", val), ("test.txt", test)] {
            if !text.is_empty() {
                files.push((name, text));
            }
        }
        for (name, text) in files {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| write_error(&p, e))?;
        }
        Ok(())
    }

    fn coco_json(&self, items: &[Item]) -> Result<String> {
        let mut images = Vec::new();
        let mut annotations = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let id = i + 1;
            images.push(json!({
                "id": id,
                "file_name": it.image.name,
                "width": it.image.width,
                "height": it.image.height,
            }));
            let mask = crate::data::load_mask(&it.mask)?;
            if mask.foreground() == 0 {
                continue;
            }
            let r = rle::encode(&mask);
            annotations.push(json!({
                "id": annotations.len() + 1,
                "image_id": id,
                "category_id": 1,
                "segmentation": r,
                "area": rle::area(&r),
                "bbox": rle::bbox(&mask),
                "iscrowd": 0,
                "medmine_source": it.source,
                "medmine_role": it.image.role,
            }));
        }
        let doc = json!({
            "info": {
                "description": format!("medmine project {}", self.root.display()),
                "version": env!("CARGO_PKG_VERSION"),
                "date_created": super::now_rfc3339(),
            },
            "images": images,
            "annotations": annotations,
            "categories": [{"id": 1, "name": "foreground", "supercategory": "foreground"}],
        });
        serde_json::to_string(&doc)
            .map_err(|e| StoreError::Invalid(format!("cannot serialise COCO JSON: {e}")))
    }

    /// The review log as CSV: `time,image,action,state,reviewer,note,pseudo_label_round,mask_file`,
    /// one line per action, oldest first (who accepted what and when).
    pub fn review_report_csv(&self) -> Result<String> {
        let sql = "SELECT l.at, i.name, l.action, l.state, l.reviewer, l.note, p.round,
                coalesce(v.mask_file, p.mask_file)
            FROM review_log l JOIN images i ON i.id = l.image_id
            LEFT JOIN pseudo_labels p ON p.id = l.pseudo_label_id
            LEFT JOIN mask_versions v ON v.id = l.mask_version_id
            ORDER BY l.id";
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok([
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?.unwrap_or_default(),
                    r.get::<_, Option<String>>(5)?.unwrap_or_default(),
                    r.get::<_, Option<i64>>(6)?
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    r.get::<_, Option<String>>(7)?.unwrap_or_default(),
                ])
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db(e))?;
        let mut out = csv_line(&[
            "time",
            "image",
            "action",
            "state",
            "reviewer",
            "note",
            "pseudo_label_round",
            "mask_file",
        ]);
        for row in rows {
            let refs: Vec<&str> = row.iter().map(String::as_str).collect();
            out.push_str(&csv_line(&refs));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
