//! External data: tensors whose bytes live in a separate file (`location`, `offset`,
//! `length` entries), which ONNX uses for models over protobuf's 2 GB limit.
//!
//! Reading maps each data file once and makes every tensor's `raw_data` a slice of the map,
//! so a 3 GB model costs address space, not memory. A location is refused if it is absolute,
//! climbs with `..`, or (through a symbolic link) resolves outside the model's folder: a
//! model file must not make us read arbitrary files.
//!
//! Writing puts every initializer of at least `THRESHOLD` bytes into one data file next to
//! the model, large ones aligned so that runtimes can map them (the layout onnx's
//! `save_as_external_data` uses).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::proto::tensor_proto::DataLocation;
use crate::proto::{StringStringEntryProto, TensorProto};

/// Tensors smaller than this stay inside the model file.
pub const THRESHOLD: usize = 1024;
/// Tensors of at least `ALIGN_FROM` bytes start at a multiple of `ALIGNMENT`.
const ALIGN_FROM: usize = 1 << 20;
const ALIGNMENT: u64 = 1 << 16;
/// Tensors are written in pieces of this size, each handed to the caller once written.
const PIECE: usize = 16 << 20;

/// Resolves external data of the tensors of one model, mapping each file once.
pub struct ExternalReader {
    base_dir: PathBuf,
    maps: HashMap<String, crate::ir::FileMapping>,
}

impl ExternalReader {
    pub fn new(base_dir: &Path) -> ExternalReader {
        ExternalReader {
            base_dir: base_dir.to_path_buf(),
            maps: HashMap::new(),
        }
    }

    /// The data files read, as mappings tensors may still point into.
    pub fn mappings(&self) -> Vec<crate::ir::FileMapping> {
        let mut files: Vec<_> = self.maps.values().cloned().collect();
        files.sort_by(|a, b| a.location.cmp(&b.location));
        files
    }

    /// The data files read so far, with their sizes.
    pub fn files(&self) -> Vec<(String, u64)> {
        let mut files: Vec<_> = self
            .maps
            .iter()
            .map(|(name, mapping)| (name.clone(), mapping.bytes().len() as u64))
            .collect();
        files.sort();
        files
    }

    /// Replaces an external tensor's location entries with its bytes (a slice of the map).
    pub fn resolve(&mut self, t: &mut TensorProto) -> Result<()> {
        if t.data_location() != DataLocation::External {
            return Ok(());
        }
        let fail = |reason: String| Error::ExternalData {
            tensor: t.name().to_string(),
            reason,
        };
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key() == key)
                .map(|e| e.value().to_string())
        };
        let location = entry("location").ok_or_else(|| fail("no location".into()))?;
        let parse = |key: &str| -> Result<Option<u64>> {
            entry(key)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| fail(format!("{key} `{v}` is not a number")))
                })
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let length = parse("length")?;
        let map = self.map(&location).map_err(fail)?;
        let file_len = map.len() as u64;
        let length = length.unwrap_or(file_len.saturating_sub(offset));
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| {
                fail(format!(
                    "bytes {offset}..{} lie outside `{location}` ({file_len} bytes)",
                    offset.saturating_add(length)
                ))
            })?;
        t.raw_data = Some(map.slice(offset as usize..end as usize));
        t.external_data.clear();
        t.data_location = None;
        Ok(())
    }

    fn map(&mut self, location: &str) -> std::result::Result<Bytes, String> {
        if let Some(mapping) = self.maps.get(location) {
            return Ok(mapping.bytes().clone());
        }
        let path = confined_path(&self.base_dir, location)?;
        let file = std::fs::File::open(&path)
            .map_err(|e| format!("cannot open `{}`: {e}", path.display()))?;
        let mapping = crate::ir::FileMapping::map(location, &file)
            .map_err(|e| format!("cannot map `{}`: {e}", path.display()))?;
        let bytes = mapping.bytes().clone();
        self.maps.insert(location.to_string(), mapping);
        Ok(bytes)
    }
}

/// `base/location`, refused unless it names a file inside `base`.
fn confined_path(base: &Path, location: &str) -> std::result::Result<PathBuf, String> {
    let rel = Path::new(location);
    if location.is_empty() {
        return Err("empty location".into());
    }
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "location `{location}` leaves the model's folder (`..`)"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("location `{location}` is an absolute path"))
            }
        }
    }
    let path = base.join(rel);
    let real_base = base
        .canonicalize()
        .map_err(|e| format!("cannot resolve the model's folder: {e}"))?;
    let real = path
        .canonicalize()
        .map_err(|e| format!("missing external data file `{}`: {e}", path.display()))?;
    if !real.starts_with(&real_base) {
        return Err(format!(
            "location `{location}` resolves outside the model's folder (to `{}`)",
            real.display()
        ));
    }
    Ok(real)
}

/// Moves initializer bytes into a data file as they are written.
pub struct ExternalWriter<W: Write> {
    location: String,
    out: W,
    offset: u64,
}

impl<W: Write> ExternalWriter<W> {
    pub fn new(location: &str, out: W) -> Self {
        ExternalWriter {
            location: location.to_string(),
            out,
            offset: 0,
        }
    }

    /// Writes `t`'s bytes to the data file and makes `t` point at them, if `t` is large
    /// enough to be worth it. `written` sees each piece of `raw` once it is written: where
    /// `raw` lies in a memory-mapped input, the caller can hand its pages back piece by piece,
    /// so that even the largest tensor (a decoder's embedding table) is never resident whole.
    pub fn externalize(
        &mut self,
        t: &mut TensorProto,
        raw: &[u8],
        written: &mut dyn FnMut(&[u8]),
    ) -> std::io::Result<bool> {
        if raw.len() < THRESHOLD {
            return Ok(false);
        }
        if raw.len() >= ALIGN_FROM {
            let aligned = self.offset.div_ceil(ALIGNMENT) * ALIGNMENT;
            let pad = (aligned - self.offset) as usize;
            self.out.write_all(&vec![0u8; pad])?;
            self.offset = aligned;
        }
        for piece in raw.chunks(PIECE) {
            self.out.write_all(piece)?;
            written(piece);
        }
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.to_string()),
            value: Some(v),
        };
        t.external_data = vec![
            entry("location", self.location.clone()),
            entry("offset", self.offset.to_string()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        t.raw_data = None;
        t.float_data.clear();
        t.int32_data.clear();
        t.int64_data.clear();
        t.double_data.clear();
        t.uint64_data.clear();
        self.offset += raw.len() as u64;
        Ok(true)
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_leaving_the_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["../x.data", "a/../../x.data", "/etc/passwd", ""] {
            assert!(confined_path(dir.path(), bad).is_err(), "{bad}");
        }
        std::fs::write(dir.path().join("w.data"), b"1234").unwrap();
        assert!(confined_path(dir.path(), "w.data").is_ok());
        assert!(confined_path(dir.path(), "./w.data").is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_out_of_the_folder_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"1234").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("w.data"))
            .unwrap();
        let err = confined_path(dir.path(), "w.data").unwrap_err();
        assert!(err.contains("outside the model's folder"), "{err}");
    }
}
