//! The layout of a store file: its checked header and its chunk table (the byte ranges of
//! each chunk's tensors in the mapped file).

use super::*;

/// A chunk of an open store: first row, rows, and byte ranges in the mapped file.
#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) first_row: usize,
    pub(super) rows: usize,
    pub(super) indices: Range<usize>,
    pub(super) values: Range<usize>,
    pub(super) crc: u32,
    pub(super) verified: OnceLock<bool>,
}

/// `StoreError::Corrupt` of the store at `path`.
pub(super) fn corrupt(path: &Path, reason: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    }
}

/// The checked header of a mapped store: format, version (first: another version may have
/// other keys), the header's own checksum, the typed fields and their consistency; with the
/// value type and the user's metadata.
pub(super) fn read_header(
    map: &[u8],
    path: &Path,
) -> Result<(Header, StoreValues, BTreeMap<String, String>), StoreError> {
    let corrupt = |reason: String| corrupt(path, reason);
    let (_, metadata) = SafeTensors::read_metadata(map)
        .map_err(|e| corrupt(format!("not a complete safetensors file ({e})")))?;
    let meta = metadata
        .metadata()
        .as_ref()
        .ok_or_else(|| corrupt("no store metadata in the header".into()))?;
    let field = |key: &str| {
        meta.get(key)
            .ok_or_else(|| corrupt(format!("no `{key}` in the header")))
    };
    if field("format")? != STORE_FORMAT {
        return Err(corrupt(format!(
            "format `{}`, not `{STORE_FORMAT}`",
            field("format")?
        )));
    }
    let version = field("version")?;
    if version != &STORE_VERSION.to_string() {
        return Err(StoreError::Mismatch {
            path: path.to_path_buf(),
            field: "version",
            found: version.clone(),
            expected: format!("{STORE_VERSION} (this crate's store format)"),
        });
    }
    if field("header_crc32")? != &header_crc(meta).to_string() {
        return Err(corrupt(
            "header checksum mismatch (a damaged header value)".into(),
        ));
    }
    let parse = |key: &str| -> Result<serde_json::Value, StoreError> {
        let text = field(key)?;
        serde_json::from_str(text).or_else(|_| Ok(serde_json::Value::String(text.clone())))
    };
    let header: Header = serde_json::from_value(serde_json::Value::Object(
        [
            "format",
            "version",
            "vocab",
            "k",
            "generation_temperature",
            "index_bits",
            "values",
            "rows",
            "chunk_rows",
            "crc32",
        ]
        .into_iter()
        .map(|key| Ok((key.to_string(), parse(key)?)))
        .collect::<Result<_, StoreError>>()?,
    ))
    .map_err(|e| corrupt(format!("bad header ({e})")))?;
    let values = match header.values.as_str() {
        "f16" => StoreValues::F16,
        "bf16" => StoreValues::Bf16,
        other => return Err(corrupt(format!("value type `{other}`"))),
    };
    let config = TeacherStoreConfig::new(header.vocab, header.k)
        .with_chunk_rows(header.chunk_rows)
        .with_generation_temperature(header.generation_temperature);
    config
        .validate()
        .map_err(|e| corrupt(format!("bad header ({e})")))?;
    let entries = header.rows.checked_mul(header.k);
    if entries.is_none_or(|e| e / 8 > map.len()) || header.index_bits != config.index_bits() {
        return Err(corrupt(format!(
            "k = {}, chunk_rows = {}, index_bits = {} for a vocabulary of {}",
            header.k, header.chunk_rows, header.index_bits, header.vocab
        )));
    }
    let user = meta
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(USER_PREFIX)?.to_string(), v.clone())))
        .collect();
    Ok((header, values, user))
}

/// The chunks of a mapped store: each chunk's two tensors checked for type, shape and place,
/// as byte ranges of the map.
pub(super) fn chunks_of(
    map: &[u8],
    header: &Header,
    values: StoreValues,
    path: &Path,
) -> Result<Vec<Chunk>, StoreError> {
    let corrupt = |reason: String| corrupt(path, reason);
    let tensors = SafeTensors::deserialize(map)
        .map_err(|e| corrupt(format!("not a complete safetensors file ({e})")))?;
    let n_chunks = header.rows.div_ceil(header.chunk_rows);
    if header.crc32.len() != n_chunks || tensors.len() != 2 * n_chunks {
        return Err(corrupt(format!(
            "{} tensors and {} checksums for {} rows in chunks of {}",
            tensors.len(),
            header.crc32.len(),
            header.rows,
            header.chunk_rows
        )));
    }
    let base = map.as_ptr() as usize;
    let tensor = |name: String, dtype: Dtype, shape: Vec<usize>| {
        let t = tensors
            .tensor(&name)
            .map_err(|_| corrupt(format!("no tensor `{name}`")))?;
        if t.dtype() != dtype || t.shape() != shape {
            return Err(corrupt(format!(
                "`{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
                t.dtype(),
                t.shape()
            )));
        }
        let start = t.data().as_ptr() as usize - base;
        Ok(start..start + t.data().len())
    };
    (0..n_chunks)
        .map(|c| {
            let first_row = c * header.chunk_rows;
            let rows = header.chunk_rows.min(header.rows - first_row);
            Ok(Chunk {
                first_row,
                rows,
                indices: tensor(
                    format!("indices.{c}"),
                    Dtype::U8,
                    vec![packed_len(rows, header.k, header.index_bits)],
                )?,
                values: tensor(
                    format!("log_probs.{c}"),
                    values.dtype(),
                    vec![rows, header.k],
                )?,
                crc: header.crc32[c],
                verified: OnceLock::new(),
            })
        })
        .collect()
}
