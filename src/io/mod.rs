//! Reading and writing ONNX files.
//!
//! `load` maps the file and decodes it in place: every weight's `raw_data` is a slice of the
//! map (prost's `Bytes` fields), so loading costs no copy of the weights. External data is
//! resolved the same way. Every tensor anywhere in the model is checked against its dims
//! before the IR is built.
//!
//! `save` writes to a temporary file in the target folder and renames it over the target, so
//! a failed save never leaves a half-written model, and it streams the encoding (see
//! `stream`), so saving holds no second copy of the weights.

mod external;
mod stream;
pub mod walk;

use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use crate::error::{Error, Result};
use crate::ir::tensor::check_tensor_proto;
use crate::ir::{Model, Source, Tensor};
use crate::proto::ModelProto;

pub use external::THRESHOLD as EXTERNAL_THRESHOLD;

/// Protobuf refuses messages of 2 GiB and more.
pub const PROTOBUF_LIMIT: u64 = (1 << 31) - 1;

/// Loads a model file, resolving external data relative to the file's folder.
pub fn load(path: &Path) -> Result<Model> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let base_dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let mapping = crate::ir::FileMapping::map(name.as_deref().unwrap_or_default(), &file)
        .map_err(|e| Error::io(path, e))?;
    let mut model = load_bytes(mapping.bytes().clone(), &base_dir)?;
    if let Some(source) = &mut model.source {
        source.path = path.to_path_buf();
        if name.is_some() {
            source.mappings.push(mapping);
        }
    }
    Ok(model)
}

/// Decodes a model held in memory; external data is looked up in `base_dir`.
pub fn load_bytes(bytes: Bytes, base_dir: &Path) -> Result<Model> {
    let file_bytes = bytes.len() as u64;
    let mut proto = ModelProto::decode(bytes)?;
    let unknown_field_bytes = file_bytes.saturating_sub(proto.encoded_len() as u64);
    let mut reader = external::ExternalReader::new(base_dir);
    walk::model_tensors(&mut proto, &mut |t| {
        reader.resolve(t)?;
        check_tensor_proto(t)
    })?;
    let mut model = Model::from_proto(proto)?;
    model.source = Some(Source {
        path: PathBuf::new(),
        dir: base_dir.to_path_buf(),
        file_bytes,
        external_files: reader.files(),
        unknown_field_bytes,
        mappings: reader.mappings(),
    });
    Ok(model)
}

/// Where weights go when saving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ExternalData {
    /// External when the input had external data or the model would pass 2 GB.
    #[default]
    Auto,
    /// Every initializer of at least `EXTERNAL_THRESHOLD` bytes goes to `<file>.data`.
    Always,
    /// Everything in one file; refused over 2 GB.
    Never,
}

/// What `save` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Saved {
    pub path: PathBuf,
    pub bytes: u64,
    /// The data file and its size, when weights were written externally.
    pub external_data: Option<(PathBuf, u64)>,
}

/// Writes `model` to `path` (atomically: temporary file, then rename).
pub fn save(model: &Model, path: &Path, external: ExternalData) -> Result<Saved> {
    let proto = model.to_proto()?;
    let had_external = model
        .source
        .as_ref()
        .is_some_and(|s| !s.external_files.is_empty());
    save_proto(proto, path, external, had_external, model.source.as_ref())
}

/// Writes a `ModelProto` as `save` does; `had_external` is what `ExternalData::Auto` follows.
/// The pages of `source`'s files that a weight written to the data file was read from are
/// handed back as it is written, so that copying a model's weights does not leave them all
/// resident. (Weights written into the model file itself are not: a model under 2 GB.)
pub fn save_proto(
    mut proto: ModelProto,
    path: &Path,
    external: ExternalData,
    had_external: bool,
    source: Option<&Source>,
) -> Result<Saved> {
    let externalize = writes_external(
        proto.encoded_len() as u64,
        PROTOBUF_LIMIT,
        external,
        had_external,
    )?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::io(path, std::io::Error::other("not a file path")))?;

    let data = if externalize {
        let location = format!("{file_name}.data");
        let data_path = dir.join(&location);
        let tmp = temp_file(&dir)?;
        let io_err = |e| Error::io(&data_path, e);
        let mut writer = external::ExternalWriter::new(&location, std::io::BufWriter::new(tmp));
        if let Some(g) = &mut proto.graph {
            for t in &mut g.initializer {
                let tensor = Tensor::from_proto(t.clone())?;
                if let Some(raw) = tensor.raw_bytes() {
                    let mut release = |piece: &[u8]| {
                        if let Some(source) = source {
                            source.release_pages_of(piece);
                        }
                    };
                    writer.externalize(t, &raw, &mut release).map_err(io_err)?;
                }
            }
        }
        let tmp = writer
            .finish()
            .map_err(io_err)?
            .into_inner()
            .map_err(|e| io_err(e.into_error()))?;
        Some((tmp, data_path))
    } else {
        None
    };

    let tmp = temp_file(&dir)?;
    let mut sink = stream::FileSink::new(tmp);
    proto
        .encode(&mut sink)
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
    let (tmp, bytes) = sink.finish().map_err(|e| Error::io(path, e))?;

    let external_data = match data {
        Some((data_tmp, data_path)) => {
            let size = persist(data_tmp, &data_path)?;
            Some((data_path, size))
        }
        None => None,
    };
    persist(tmp, path)?;
    Ok(Saved {
        path: path.to_path_buf(),
        bytes,
        external_data,
    })
}

/// Whether a model of `encoded_len` bytes goes out with external data.
fn writes_external(
    encoded_len: u64,
    limit: u64,
    external: ExternalData,
    had_external: bool,
) -> Result<bool> {
    let too_big = encoded_len > limit;
    match external {
        ExternalData::Always => Ok(true),
        ExternalData::Auto => Ok(too_big || had_external),
        ExternalData::Never if too_big => Err(Error::InvalidModel(format!(
            "the model is {encoded_len} bytes, over protobuf's 2 GB limit: write it with external data"
        ))),
        ExternalData::Never => Ok(false),
    }
}

fn temp_file(dir: &Path) -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".onnxopt-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))
}

/// Renames a finished temporary file over `path`, readable like a file `cp` would write.
fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> Result<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    let size = tmp
        .as_file()
        .metadata()
        .map_err(|e| Error::io(tmp.path(), e))?
        .len();
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_data_is_chosen_past_the_limit() {
        let limit = 1000;
        assert!(!writes_external(999, limit, ExternalData::Auto, false).unwrap());
        assert!(writes_external(1001, limit, ExternalData::Auto, false).unwrap());
        assert!(writes_external(10, limit, ExternalData::Auto, true).unwrap());
        assert!(writes_external(10, limit, ExternalData::Always, false).unwrap());
        assert!(!writes_external(10, limit, ExternalData::Never, true).unwrap());
        assert!(writes_external(1001, limit, ExternalData::Never, false).is_err());
    }
}
