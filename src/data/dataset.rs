//! Scanning a dataset folder, split lists and the labelled-fraction protocol.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::DataError;

/// File extensions (lower case) accepted for images and masks.
/// `dcm` and `dicom` are DICOM images (see [`crate::data::read_dicom`]).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff", "dcm", "dicom"];

/// One image and, when labelled, its mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Image file name, e.g. `"abc.jpg"`.
    pub name: String,
    pub image: PathBuf,
    pub mask: Option<PathBuf>,
}

impl Sample {
    /// The file name without its extension (the key masks are matched by).
    pub fn stem(&self) -> &str {
        stem_of(&self.name)
    }
}

/// A file found while scanning that is not part of the dataset, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// The images (and masks) of one dataset folder.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub root: PathBuf,
    /// Sorted by name.
    pub samples: Vec<Sample>,
    /// Files that were found but not used, sorted by path.
    pub skipped: Vec<Skipped>,
}

/// The file stem of a name (`abc.jpg` -> `abc`), or the name itself.
pub fn stem_of(name: &str) -> &str {
    Path::new(name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(name)
}

fn is_supported(name: &str) -> bool {
    has_image_extension(Path::new(name))
}

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

struct Found {
    name: String,
    path: PathBuf,
}

/// The supported files of `dir`, sorted by name; everything else goes to
/// `skipped` with a reason.
fn read_files(dir: &Path, skipped: &mut Vec<Skipped>) -> Result<Vec<Found>, DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let mut skip = |reason: String| {
            skipped.push(Skipped {
                path: path.clone(),
                reason,
            })
        };
        let Ok(name) = entry.file_name().into_string() else {
            skip("file name is not valid UTF-8".into());
            continue;
        };
        match fs::metadata(&path) {
            Err(e) => skip(format!("cannot read: {e}")),
            Ok(m) if m.is_dir() => skip("is a folder (sub-folders are not scanned)".into()),
            Ok(_) if name.starts_with('.') => skip("hidden file".into()),
            Ok(_) if !is_supported(&name) => skip(format!(
                "unsupported file type (expected one of: {})",
                IMAGE_EXTENSIONS.join(", ")
            )),
            Ok(_) => found.push(Found { name, path }),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

impl Dataset {
    /// Scans `root/images/` (required) and `root/masks/` (optional) without
    /// decoding anything. Masks are matched to images by file stem; when
    /// several masks share a stem, the one with the image's exact file name
    /// wins (else the first by name). Images that share a stem with an
    /// earlier image (by name) are skipped, because masks and stem-only split
    /// entries could not tell them apart.
    pub fn scan(root: &Path) -> Result<Dataset, DataError> {
        if !root.is_dir() {
            return Err(DataError::DatasetNotFound {
                path: root.to_path_buf(),
            });
        }
        let images_dir = root.join("images");
        if !images_dir.is_dir() {
            return Err(DataError::ImagesDirNotFound { path: images_dir });
        }
        let mut skipped = Vec::new();
        let mut samples: Vec<Sample> = Vec::new();
        let mut by_stem: HashMap<String, usize> = HashMap::new();
        for f in read_files(&images_dir, &mut skipped)? {
            let stem = stem_of(&f.name).to_string();
            if let Some(&first) = by_stem.get(&stem) {
                skipped.push(Skipped {
                    path: f.path,
                    reason: format!(
                        "another image with the same stem ({}) is used; masks are matched by stem",
                        samples[first].name
                    ),
                });
                continue;
            }
            by_stem.insert(stem, samples.len());
            samples.push(Sample {
                name: f.name,
                image: f.path,
                mask: None,
            });
        }
        if samples.is_empty() {
            return Err(DataError::NoImages {
                path: images_dir,
                skipped: skipped.len(),
            });
        }

        let masks_dir = root.join("masks");
        match fs::metadata(&masks_dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DataError::Io {
                    path: masks_dir,
                    source,
                })
            }
            Ok(m) if !m.is_dir() => return Err(DataError::NotADirectory { path: masks_dir }),
            Ok(_) => {
                for f in read_files(&masks_dir, &mut skipped)? {
                    let Some(&i) = by_stem.get(stem_of(&f.name)) else {
                        skipped.push(Skipped {
                            path: f.path,
                            reason: "mask has no image with the same stem in images/".into(),
                        });
                        continue;
                    };
                    let sample = &mut samples[i];
                    let exact = f.name == sample.name;
                    match sample.mask.take() {
                        None => sample.mask = Some(f.path),
                        Some(prev) => {
                            let prev_exact = prev.file_name().and_then(|n| n.to_str())
                                == Some(sample.name.as_str());
                            let (keep, drop) = if exact && !prev_exact {
                                (f.path, prev)
                            } else {
                                (prev, f.path)
                            };
                            let reason = format!(
                                "another mask for image {} is used: {}",
                                sample.name,
                                keep.display()
                            );
                            sample.mask = Some(keep);
                            skipped.push(Skipped { path: drop, reason });
                        }
                    }
                }
            }
        }
        skipped.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Dataset {
            root: root.to_path_buf(),
            samples,
            skipped,
        })
    }

    fn find(&self, name: &str) -> Option<usize> {
        if let Ok(i) = self.samples.binary_search_by(|s| s.name.as_str().cmp(name)) {
            return Some(i);
        }
        // Not sorted (built by hand) or a bare stem.
        self.samples
            .iter()
            .position(|s| s.name == name)
            .or_else(|| self.samples.iter().position(|s| s.stem() == name))
    }

    /// The sample with this file name, or else with this stem.
    pub fn get(&self, name: &str) -> Option<&Sample> {
        self.find(name).map(|i| &self.samples[i])
    }

    /// The samples named in `names` (file names or bare stems), in list
    /// order. `list_path` is the split file the names came from; it is used in
    /// error messages (and re-read to give the exact line number).
    pub fn select(&self, names: &[String], list_path: &Path) -> Result<Vec<Sample>, DataError> {
        let mut seen: HashMap<usize, usize> = HashMap::new();
        let mut out = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let Some(idx) = self.find(name) else {
                return Err(DataError::UnknownName {
                    list: list_path.to_path_buf(),
                    line: line_of(list_path, names, i),
                    name: name.clone(),
                    root: self.root.clone(),
                });
            };
            if let Some(first) = seen.insert(idx, i) {
                return Err(DataError::DuplicateName {
                    list: list_path.to_path_buf(),
                    line: line_of(list_path, names, i),
                    first: line_of(list_path, names, first),
                    name: name.clone(),
                });
            }
            out.push(self.samples[idx].clone());
        }
        Ok(out)
    }

    /// Samples with a mask.
    pub fn labelled(&self) -> Vec<Sample> {
        self.samples
            .iter()
            .filter(|s| s.mask.is_some())
            .cloned()
            .collect()
    }

    /// Samples without a mask.
    pub fn unlabelled(&self) -> Vec<Sample> {
        self.samples
            .iter()
            .filter(|s| s.mask.is_none())
            .cloned()
            .collect()
    }

    /// A human-readable listing of the skipped files, `None` if there are
    /// none.
    pub fn skipped_report(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let n = self.skipped.len();
        let mut s = format!(
            "{}: {n} file{} skipped while scanning the dataset:",
            self.root.display(),
            if n == 1 { "" } else { "s" }
        );
        for k in &self.skipped {
            s.push_str(&format!("\n  {}: {}", k.path.display(), k.reason));
        }
        Some(s)
    }
}

/// `(line number, entry)` for every entry of a split list.
fn entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_start_matches('\u{feff}').trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// The line of `list_path` that holds `names[i]`, when `names` was read from
/// it; else `i + 1`.
fn line_of(list_path: &Path, names: &[String], i: usize) -> usize {
    let Ok(text) = fs::read_to_string(list_path) else {
        return i + 1;
    };
    let all: Vec<(usize, &str)> = entries(&text).collect();
    if let Some(&(line, e)) = all.get(i) {
        if e == names[i] {
            return line;
        }
    }
    all.iter()
        .find(|(_, e)| *e == names[i])
        .map(|&(line, _)| line)
        .unwrap_or(i + 1)
}

/// Reads a split list: one image file name (or bare stem) per line; entries
/// are trimmed; blank lines and lines starting with `#` are ignored. An empty
/// list or a repeated entry is an error.
pub fn read_split_list(path: &Path) -> Result<Vec<String>, DataError> {
    let text = fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut first_line: HashMap<&str, usize> = HashMap::new();
    let mut names = Vec::new();
    for (line, e) in entries(&text) {
        if let Some(&first) = first_line.get(e) {
            return Err(DataError::DuplicateName {
                list: path.to_path_buf(),
                line,
                first,
                name: e.to_string(),
            });
        }
        first_line.insert(e, line);
        names.push(e.to_string());
    }
    if names.is_empty() {
        return Err(DataError::EmptyList {
            path: path.to_path_buf(),
        });
    }
    Ok(names)
}

/// The semi-supervised protocol: a seeded subset of the training split is
/// labelled, the rest is the unlabelled pool.
///
/// The names are sorted and de-duplicated, shuffled with
/// `ChaCha8Rng::seed_from_u64(seed)`, and the first `round(fraction * n)`
/// (at least 1 when `n > 0`) are labelled. The result depends only on the
/// set of names, `fraction` and `seed`, not on the input order. Both outputs
/// are sorted by name. `fraction` must lie in `(0, 1]`.
pub fn split_labelled(
    names: &[String],
    fraction: f64,
    seed: u64,
) -> Result<(Vec<String>, Vec<String>), DataError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(DataError::BadFraction { fraction });
    }
    let mut all = names.to_vec();
    all.sort();
    all.dedup();
    let n = all.len();
    let count = if n == 0 {
        0
    } else {
        ((fraction * n as f64).round() as usize).clamp(1, n)
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    all.shuffle(&mut rng);
    let mut unlabelled = all.split_off(count);
    let mut labelled = all;
    labelled.sort();
    unlabelled.sort();
    Ok((labelled, unlabelled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("img_{i:04}.png")).collect()
    }

    #[test]
    fn split_counts() {
        let all = names(880);
        for (f, expect) in [
            (0.1, 88),
            (0.25, 220),
            (0.5, 440),
            (1.0, 880),
            (0.0001, 1),
            (0.3333, 293),
        ] {
            let (l, u) = split_labelled(&all, f, 7).unwrap();
            assert_eq!(l.len(), expect, "fraction {f}");
            assert_eq!(u.len(), 880 - expect, "fraction {f}");
        }
        let (l, u) = split_labelled(&[], 0.5, 1).unwrap();
        assert!(l.is_empty() && u.is_empty());
        let (l, u) = split_labelled(&names(3), 0.01, 1).unwrap();
        assert_eq!((l.len(), u.len()), (1, 2));
    }

    #[test]
    fn split_is_deterministic_and_seed_dependent() {
        let all = names(200);
        let a = split_labelled(&all, 0.2, 42).unwrap();
        let b = split_labelled(&all, 0.2, 42).unwrap();
        assert_eq!(a, b);
        let c = split_labelled(&all, 0.2, 43).unwrap();
        assert_ne!(a.0, c.0);
    }

    #[test]
    fn split_ignores_input_order_and_duplicates() {
        let all = names(150);
        let mut rev = all.clone();
        rev.reverse();
        rev.swap(3, 77);
        assert_eq!(
            split_labelled(&all, 0.3, 5).unwrap(),
            split_labelled(&rev, 0.3, 5).unwrap()
        );
        let mut dup = all.clone();
        dup.extend(all.iter().take(10).cloned());
        assert_eq!(
            split_labelled(&all, 0.3, 5).unwrap(),
            split_labelled(&dup, 0.3, 5).unwrap()
        );
    }

    #[test]
    fn split_is_disjoint_covering_and_sorted() {
        let all = names(97);
        let (l, u) = split_labelled(&all, 0.37, 9).unwrap();
        let ls: HashSet<_> = l.iter().collect();
        let us: HashSet<_> = u.iter().collect();
        assert!(ls.is_disjoint(&us));
        let mut both: Vec<String> = l.iter().chain(&u).cloned().collect();
        both.sort();
        assert_eq!(both, all);
        assert!(l.windows(2).all(|w| w[0] < w[1]));
        assert!(u.windows(2).all(|w| w[0] < w[1]));
        // Not simply the first names in sorted order.
        assert_ne!(l, all[..l.len()].to_vec());
    }

    #[test]
    fn split_rejects_bad_fractions() {
        for f in [0.0, -0.1, 1.0001, 2.0, f64::NAN, f64::INFINITY] {
            let e = split_labelled(&names(10), f, 0).unwrap_err();
            assert!(matches!(e, DataError::BadFraction { .. }), "{f}");
        }
    }

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"x").unwrap();
    }

    #[test]
    fn scan_matches_by_stem_and_reports_skips() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for f in [
            "images/b.jpg",
            "images/a.png",
            "images/c.PNG",
            "images/c.jpg",
        ] {
            touch(&r.join(f));
        }
        touch(&r.join("images/notes.txt"));
        touch(&r.join("masks/b.png")); // other extension
        touch(&r.join("masks/a.png"));
        touch(&r.join("masks/a.bmp")); // second mask for a: exact name wins
        touch(&r.join("masks/zz.png")); // orphan
        let ds = Dataset::scan(r).unwrap();
        let got: Vec<_> = ds.samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(got, ["a.png", "b.jpg", "c.PNG"]);
        assert_eq!(ds.get("a.png").unwrap().mask, Some(r.join("masks/a.png")));
        assert_eq!(ds.get("b").unwrap().mask, Some(r.join("masks/b.png")));
        assert_eq!(ds.get("c.PNG").unwrap().mask, None);
        assert_eq!(ds.labelled().len(), 2);
        assert_eq!(ds.unlabelled().len(), 1);
        let skipped: Vec<_> = ds.skipped.iter().map(|s| s.path.clone()).collect();
        assert_eq!(
            skipped,
            [
                r.join("images/c.jpg"),
                r.join("images/notes.txt"),
                r.join("masks/a.bmp"),
                r.join("masks/zz.png"),
            ]
        );
        let report = ds.skipped_report().unwrap();
        assert!(report.contains("4 files skipped"), "{report}");
        assert!(report.contains("zz.png: mask has no image"), "{report}");
    }

    #[test]
    fn select_by_name_or_stem_with_line_numbers() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for f in ["images/a.jpg", "images/b.jpg", "masks/a.jpg"] {
            touch(&r.join(f));
        }
        let ds = Dataset::scan(r).unwrap();
        let list = r.join("list.txt");
        fs::write(&list, "# header\n\nb\n  a.jpg  \n").unwrap();
        let names = read_split_list(&list).unwrap();
        assert_eq!(names, ["b", "a.jpg"]);
        let sel = ds.select(&names, &list).unwrap();
        assert_eq!(sel[0].name, "b.jpg");
        assert_eq!(sel[1].name, "a.jpg");

        fs::write(&list, "a.jpg\n\n# c\nmissing.jpg\n").unwrap();
        let names = read_split_list(&list).unwrap();
        let e = ds.select(&names, &list).unwrap_err().to_string();
        assert!(e.contains("list.txt: line 4: missing.jpg"), "{e}");

        fs::write(&list, "a.jpg\nb\na\n").unwrap();
        let names = read_split_list(&list).unwrap();
        let e = ds.select(&names, &list).unwrap_err().to_string();
        assert!(
            e.contains("line 3: a is listed twice (first on line 1)"),
            "{e}"
        );

        fs::write(&list, "a.jpg\nb\na.jpg\n").unwrap();
        let e = read_split_list(&list).unwrap_err().to_string();
        assert!(e.contains("line 3: a.jpg is listed twice"), "{e}");

        fs::write(&list, "# only a comment\n\n").unwrap();
        let e = read_split_list(&list).unwrap_err().to_string();
        assert!(e.contains("list.txt: split list has no entries"), "{e}");
    }
}
