//! Model inputs: what a model expects, batches read from `.npy`/`.npz` files, and batches
//! generated from the input types when the user has no data.
//!
//! A batch directory holds, for each batch, one `.npy` per graph input named
//! `<batch>.<input>.npy` (or `<input>.npy` for a single batch), or one `.npz` per batch whose
//! arrays are named after the inputs. Files that name no graph input (reference outputs,
//! say) are ignored. Batches held in memory as arrays by input name (`NamedArrays`) get the
//! same checks and conversions. Generated inputs are deterministic: symbolic dims take their
//! `--dim` value, the size the graph fixes (an image's channels and size,
//! `convolved_sizes`), or a default (1 for a batch-like name, 16 otherwise); integer inputs are drawn
//! from `--input-range` or, for token ids, from the rows of the embedding table they index,
//! and float inputs from a standard normal.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tract_onnx::prelude::{DatumType, Tensor};
use tract_onnx::tract_hir::internal::tract_ndarray::{ArrayD, IxDyn};

use super::rng;
use super::ExecError;
use crate::ir::{DataType, Model};
use crate::ops::embed_layer_norm;
use crate::proto::tensor_shape_proto::dimension::Value as Dim;
use crate::proto::type_proto::Value as Type;

/// One dimension of a declared input shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimSpec {
    Fixed(usize),
    Symbol(String),
    Unknown,
}

/// A graph input that the caller must feed (inputs backed by an initializer are not listed).
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: String,
    pub dtype: DatumType,
    pub dims: Vec<DimSpec>,
    /// Integer range `[lo, hi]` inferred from the graph (the rows of an indexed table).
    pub inferred_range: Option<(i64, i64)>,
    /// Sizes the graph fixes for its free dims, by axis (`convolved_sizes`); empty when it
    /// fixes none.
    pub inferred_dims: Vec<Option<usize>>,
}

/// Named tensors fed to a model in one run, in graph input order.
#[derive(Clone, Debug)]
pub struct Batch {
    pub name: String,
    pub tensors: Vec<(String, Tensor)>,
}

impl InputSpec {
    /// The size the graph fixes for `axis`, if it does.
    fn inferred_dim(&self, axis: usize) -> Option<usize> {
        self.inferred_dims.get(axis).copied().flatten()
    }
}

impl Batch {
    /// The tensor fed to the input `name`, if the batch has one.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// How to make inputs when none are given.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Values of symbolic dims, by name.
    pub dims: HashMap<String, usize>,
    /// Inclusive value ranges, by input name.
    pub ranges: HashMap<String, (f64, f64)>,
    pub seed: u64,
    /// The size of a symbolic dim named like a batch, when `dims` does not give it.
    pub default_batch: usize,
    /// The size of any other symbolic dim, when `dims` does not give it.
    pub default_length: usize,
    /// Right-pad the rows of a 2-D integer mask after the first (row r of R loses its last
    /// r/(2R) of positions), so that a mask read the wrong way changes the outputs.
    pub pad_masks: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            dims: HashMap::new(),
            ranges: HashMap::new(),
            seed: 0,
            default_batch: 1,
            default_length: 16,
            pad_masks: false,
        }
    }
}

impl GenerateOptions {
    /// The size of a symbolic dim: its `dims` value, the default for its kind, or, for an
    /// expression of symbols such as `past_sequence + sequence` (the legacy exporter's
    /// attention mask with past key/values), the expression evaluated on those.
    fn symbol_size(&self, symbol: &str) -> usize {
        if let Some(&n) = self.dims.get(symbol) {
            return n;
        }
        let factor = |f: &str| -> Option<usize> {
            let f = f.trim();
            match f.parse::<usize>() {
                Ok(n) => Some(n),
                Err(_) if is_identifier(f) => Some(self.named_size(f)),
                Err(_) => None,
            }
        };
        let term = |t: &str| t.split('*').map(factor).product::<Option<usize>>();
        let sum: Option<usize> = symbol.split('+').map(term).sum();
        sum.unwrap_or_else(|| self.named_size(symbol))
    }

    fn named_size(&self, symbol: &str) -> usize {
        match self.dims.get(symbol) {
            Some(&n) => n,
            None if symbol.to_ascii_lowercase().contains("batch") => self.default_batch,
            None => self.default_length,
        }
    }
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The inputs `model` must be fed.
pub fn input_specs(model: &Model) -> Result<Vec<InputSpec>, ExecError> {
    let g = &model.graph;
    let caches = cache_sizes(model);
    g.inputs
        .iter()
        .filter(|p| g.initializer(p.value).is_none())
        .map(|port| {
            let name = g.value_name(port.value).to_string();
            let Some(Type::TensorType(tt)) =
                port.decl.r#type.as_ref().and_then(|t| t.value.as_ref())
            else {
                return Err(ExecError::Input(format!("input `{name}` is not a tensor")));
            };
            let dtype = datum_type(tt.elem_type()).ok_or_else(|| {
                ExecError::Input(format!(
                    "input `{name}` has element type {}, which cannot be fed",
                    crate::ir::tensor::dtype_name(tt.elem_type())
                ))
            })?;
            let dims: Vec<DimSpec> = tt
                .shape
                .as_ref()
                .map(|s| {
                    s.dim
                        .iter()
                        .map(|d| match &d.value {
                            Some(Dim::DimValue(v)) if *v >= 0 => DimSpec::Fixed(*v as usize),
                            Some(Dim::DimParam(p)) if !p.is_empty() => DimSpec::Symbol(p.clone()),
                            _ => DimSpec::Unknown,
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(InputSpec {
                inferred_range: embedding_rows(model, port.value).map(|rows| (0, rows - 1)),
                inferred_dims: match caches.get(&port.value) {
                    Some(sizes) if dims.len() == 4 => sizes.to_vec(),
                    _ => convolved_sizes(model, port.value, dims.len()),
                },
                name,
                dtype,
                dims,
            })
        })
        .collect()
}

/// The element type tract uses for an ONNX element type code.
pub fn datum_type(code: i32) -> Option<DatumType> {
    Some(match DataType::try_from(code).ok()? {
        DataType::Float => DatumType::F32,
        DataType::Double => DatumType::F64,
        DataType::Float16 => DatumType::F16,
        DataType::Int64 => DatumType::I64,
        DataType::Int32 => DatumType::I32,
        DataType::Int16 => DatumType::I16,
        DataType::Int8 => DatumType::I8,
        DataType::Uint64 => DatumType::U64,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint8 => DatumType::U8,
        DataType::Bool => DatumType::Bool,
        DataType::String => DatumType::String,
        _ => return None,
    })
}

/// Rows of the table (`table_dims`) that `input` indexes through a `Gather` or an
/// EmbedLayerNormalization, quantized or not (token ids into an embedding table), looking through Casts and
/// the Expand of position ids to the batch (`fuse::embed_layernorm`).
fn embedding_rows(model: &Model, input: crate::ir::ValueId) -> Option<i64> {
    use crate::ir::Use;
    let g = &model.graph;
    let mut frontier = vec![input];
    while let Some(v) = frontier.pop() {
        for &(reader, use_) in g.uses(v) {
            let node = g.node(reader);
            if node.is("Cast") || (node.is("Expand") && use_ == Use::Input(0)) {
                frontier.extend(node.output(0));
            } else if node.domain() == crate::ops::MS_DOMAIN {
                let Use::Input(slot) = use_ else { continue };
                let Some(table) = embed_layer_norm::table_of_op(node.op_type(), slot) else {
                    continue;
                };
                let table = node.input(table);
                let dims = table_dims(model, table?)?;
                return dims.first().copied().filter(|&r| r > 0);
            } else if node.is("Gather") && use_ == Use::Input(1) {
                let dims = table_dims(model, node.input(0)?)?;
                let axis = crate::ir::attr::get_int(&node.proto, "axis").unwrap_or(0);
                let rank = dims.len() as i64;
                let axis = if axis < 0 { axis + rank } else { axis };
                return dims.get(axis as usize).copied().filter(|&r| r > 0);
            }
        }
    }
    None
}

/// Sizes of the KV cache inputs that an attention operator reads as its past key or value
/// (`ops::attention::cache_layout`), by input: `[batch, cache heads, past, head size]` with
/// the heads and the head size known, the head size being the query's last dim over the heads
/// it holds. ONNX Runtime GenAI's model builder names the head size `kv_cache_dim`, which a
/// generated 16 does not fit ("Input 'past_key' dimension 3 should match the packed KV head
/// dimension"). Shape inference runs only when some input is such a cache.
fn cache_sizes(model: &Model) -> HashMap<crate::ir::ValueId, [Option<usize>; 4]> {
    use crate::ir::Use;
    use crate::ops::attention::cache_layout;
    let g = &model.graph;
    let mut caches = HashMap::new();
    let mut inference = None;
    for port in &g.inputs {
        for &(reader, use_) in g.uses(port.value) {
            let node = g.node(reader);
            let (Some(layout), Use::Input(slot)) = (cache_layout(node), use_) else {
                continue;
            };
            if !layout.past_slots.contains(&slot) {
                continue;
            }
            let inference = inference.get_or_insert_with(|| crate::passes::shape::infer(model));
            let query_width = node
                .input(0)
                .and_then(|q| inference.shape(q)?.last()?.value())
                .and_then(|w| usize::try_from(w).ok());
            let head_size = query_width
                .filter(|w| w % layout.query_heads == 0)
                .map(|w| w / layout.query_heads);
            caches.insert(
                port.value,
                [None, Some(layout.cache_heads), None, head_size],
            );
        }
    }
    caches
}

/// Sizes the graph fixes for the dims of an input of rank `rank` that a convolution reads
/// (pixels, audio features, raw audio), by axis: the channels (axis 1) its weight takes
/// (`[O, C/group, k...]`), and a spatial size. Exporters name these dims (Optimum's
/// `num_channels`, `height`, `width`, `feature_size`, `encoder_sequence_length`), and a
/// generated size of 16 runs no such model. The convolutions in a row (through the
/// operators of `CONV_CHAIN`) stride by the product of their strides. Where the embedding's
/// tokens meet a table of fixed positions, the spatial size makes their counts agree: `q`
/// times that product, where `q^spatial rank` is the table's length less 0, 1 or 2 leading
/// tokens (class, distillation), square images. ViT's stride-8 patches of a 32-pixel image
/// are the 16 tokens its `[1, 17, 64]` table adds to; Whisper's strides 1 and 2 halve 3000
/// frames to its 1500 positions. A table is an initializer of rank 2 or 3 whose last dim is
/// the last convolution's channels and which an `Add` reads (through Gather, Slice, Unsqueeze,
/// Reshape, Expand, Cast); the longest one counts, and a model that interpolates its
/// positions runs at that size too. Without a table, a stride past 1 gets 16 positions'
/// worth: wav2vec2's feature encoder strides by 320, and 16 samples ran none of its seven
/// convolutions ("Invalid input shape"). Raw audio (`[batch, samples]`, unsqueezed into one
/// channel) has no channel axis. `None` where the graph says nothing.
fn convolved_sizes(model: &Model, input: crate::ir::ValueId, rank: usize) -> Vec<Option<usize>> {
    use crate::ir::attr::{get_int, get_ints};
    use crate::ir::Use;
    let g = &model.graph;
    // The Conv reading `v` as its data (through `through`), with its weight's dims.
    let conv_reading = |v: crate::ir::ValueId, through: &dyn Fn(&str) -> bool| {
        let mut frontier = vec![v];
        let mut seen = 0;
        while let Some(v) = frontier.pop() {
            seen += 1;
            if seen > 64 {
                break;
            }
            for &(reader, use_) in g.uses(v) {
                let node = g.node(reader);
                if node.is("Conv") && use_ == Use::Input(0) {
                    let weight = g.initializer(node.input(1)?)?;
                    let dims = weight.dims();
                    return (dims.len() >= 3 && dims.iter().all(|&d| d > 0))
                        .then(|| (node, dims.to_vec()));
                }
                if through(node.op_type()) {
                    frontier.extend(node.output(0));
                }
            }
        }
        None
    };
    let to_first = |op: &str| matches!(op, "Cast" | "Unsqueeze" | "Reshape" | "Sub" | "Div");
    let Some((conv, weight)) = conv_reading(input, &to_first) else {
        return Vec::new();
    };
    let group = get_int(&conv.proto, "group").unwrap_or(1).max(1) as usize;
    let mut sizes = vec![None; rank];
    let spatial: Vec<usize> = if rank == weight.len() {
        sizes[1] = (weight[1] as usize).checked_mul(group);
        (2..rank).collect()
    } else if rank + 1 == weight.len()
        && (weight[1] as usize).checked_mul(group) == Some(1)
        && rank >= 2
    {
        vec![rank - 1]
    } else {
        return Vec::new();
    };
    // One stride for every spatial axis, or no size for them.
    let stride_of = |node: &crate::ir::Node| match get_ints(&node.proto, "strides") {
        None => Some(1),
        Some(s) if !s.is_empty() && s.iter().all(|&x| x == s[0] && x > 0) => Some(s[0] as usize),
        Some(_) => None,
    };
    let Some(mut stride) = stride_of(conv) else {
        return sizes;
    };
    let mut channels = weight[0] as usize;
    let mut last = conv;
    let in_chain = |op: &str| crate::ops::ELEMENTWISE.contains(&op) || CONV_CHAIN.contains(&op);
    while let Some((next, w)) = last.output(0).and_then(|v| conv_reading(v, &in_chain)) {
        let Some(s) = stride_of(next) else {
            return sizes;
        };
        stride = stride.saturating_mul(s);
        channels = w[0] as usize;
        last = next;
    }
    let size = match position_table_length(model, channels) {
        Some(length) => {
            let axes = spatial.len() as u32;
            let side = (0..=2).find_map(|leading| {
                let tokens = length.checked_sub(leading)?;
                let q = (tokens as f64).powf(1.0 / axes as f64).round() as usize;
                (q > 0 && q.checked_pow(axes) == Some(tokens)).then_some(q)
            });
            side.and_then(|q| q.checked_mul(stride))
        }
        None if stride > 1 => stride.checked_mul(POSITIONS_WITHOUT_A_TABLE),
        None => None,
    };
    for axis in spatial {
        sizes[axis] = size;
    }
    sizes
}

/// Operators between convolutions in a row: layout and normalization (a feature encoder's
/// `Conv → Transpose → LayerNormalization → Transpose → Gelu → Conv`), besides elementwise ones.
const CONV_CHAIN: &[&str] = &[
    "Transpose",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "BatchNormalization",
];

/// The positions a strided input without a table of positions is generated for.
const POSITIONS_WITHOUT_A_TABLE: usize = 16;

/// The length of the longest table of positions for an embedding of `channels`: an
/// initializer `[length, channels]` or `[1, length, channels]` (length > 1) that an `Add`
/// reads, directly or through the operators that select or place its rows.
fn position_table_length(model: &Model, channels: usize) -> Option<usize> {
    use crate::ir::Use;
    let g = &model.graph;
    let added = |table: crate::ir::ValueId| {
        let mut frontier = vec![table];
        let mut seen = 0;
        while let Some(v) = frontier.pop() {
            seen += 1;
            if seen > 16 {
                return false;
            }
            for &(reader, use_) in g.uses(v) {
                let node = g.node(reader);
                match node.op_type() {
                    "Add" => return true,
                    "Gather" if use_ == Use::Input(0) => frontier.extend(node.output(0)),
                    "Slice" | "Unsqueeze" | "Reshape" | "Expand" | "Cast" | "Identity"
                        if use_ == Use::Input(0) =>
                    {
                        frontier.extend(node.output(0))
                    }
                    _ => {}
                }
            }
        }
        false
    };
    g.initializers()
        .filter_map(|(v, t)| {
            let dims = t.dims();
            let length = match dims {
                [length, c] | [1, length, c] if *c as usize == channels => *length as usize,
                _ => return None,
            };
            (length > 1 && added(v)).then_some(length)
        })
        .max()
}

/// The dims of the constant table `v`: an initializer, or one that a DequantizeLinear or a
/// Cast turns into `v` (an INT8 QDQ model's embeddings, a float16 model's).
fn table_dims(model: &Model, v: crate::ir::ValueId) -> Option<&[i64]> {
    let g = &model.graph;
    if let Some(t) = g.initializer(v) {
        return Some(t.dims());
    }
    let node = g.node(g.producer(v)?);
    if !(node.is("DequantizeLinear") || node.is("Cast")) {
        return None;
    }
    g.initializer(node.input(0)?).map(|t| t.dims())
}

/// Makes `count` deterministic batches for `specs`.
pub fn generate(
    specs: &[InputSpec],
    options: &GenerateOptions,
    count: usize,
) -> Result<Vec<Batch>, ExecError> {
    let options = &with_role_sizes(specs, options);
    let past = past_length(specs, options).unwrap_or(0);
    (0..count)
        .map(|b| {
            let tensors = specs
                .iter()
                .enumerate()
                .map(|(i, spec)| {
                    let seed = options.seed ^ ((b as u64) << 32) ^ (i as u64 + 1);
                    let tensor = if is_positions(spec, options) {
                        positions(spec, options, past)?
                    } else {
                        generate_one(spec, options, seed)?
                    };
                    Ok((spec.name.clone(), tensor))
                })
                .collect::<Result<_, ExecError>>()?;
            Ok(Batch {
                name: format!("generated_{b:02}"),
                tensors,
            })
        })
        .collect()
}

/// `options` with sizes for the opaque symbols (the dynamo exporter's `s10`, `s70`) that the
/// inputs' roles fix: such a model only runs when its inputs agree, which their names cannot
/// say. Axis 0 of an input of rank 2 or more is the batch; the sequence axis of a 2-D mask is
/// the past length plus the new tokens' when the model has past key/values (a past length of
/// `default_length`, as a `past_sequence` symbol gets), the new tokens' otherwise; other
/// symbols keep their size by name. A symbol the graph fixes (`InputSpec::inferred_dims`: an
/// image's channels and size) takes that size. A symbol `dims` gives, or one already placed,
/// is kept.
fn with_role_sizes(specs: &[InputSpec], options: &GenerateOptions) -> GenerateOptions {
    let mut options = options.clone();
    for spec in specs {
        for (axis, dim) in spec.dims.iter().enumerate() {
            if let (DimSpec::Symbol(symbol), Some(size)) = (dim, spec.inferred_dim(axis)) {
                options.dims.entry(symbol.clone()).or_insert(size);
            }
        }
    }
    let has_past = past_input(specs).is_some();
    let opaque = |symbol: &str, options: &GenerateOptions| {
        is_identifier(symbol)
            && !options.dims.contains_key(symbol)
            && !symbol.to_ascii_lowercase().contains("batch")
    };
    for spec in specs.iter().filter(|s| s.dims.len() >= 2) {
        if let DimSpec::Symbol(symbol) = &spec.dims[0] {
            if opaque(symbol, &options) {
                options.dims.insert(symbol.clone(), options.default_batch);
            }
        }
    }
    let length = options.default_length;
    // With a past, the mask spans the past and the new tokens whatever its dim says: Optimum
    // names it `past_sequence_length + 1` (one new token) while the new tokens have their own
    // symbol.
    let total = match (past_length(specs, &options), new_tokens(specs, &options)) {
        (Some(past), Some(new)) => past + new,
        (Some(past), None) => past + length,
        (None, _) => length,
    };
    for spec in specs {
        let name = spec.name.to_ascii_lowercase();
        // An encoder's mask spans the encoder's tokens, never a decoder's past.
        let is_mask = name.contains("mask") && !name.contains("encoder");
        if let (true, [_, DimSpec::Symbol(symbol)]) = (is_mask, spec.dims.as_slice()) {
            let expression = !is_identifier(symbol) && !options.dims.contains_key(symbol);
            if opaque(symbol, &options) || (has_past && expression) {
                options.dims.insert(symbol.clone(), total);
            }
        }
    }
    options
}

/// A decoder's KV cache input: `past…` of rank 3 or more, its past positions on axis -2.
fn past_input(specs: &[InputSpec]) -> Option<&InputSpec> {
    specs.iter().find(|s| is_cache(s))
}

fn is_cache(spec: &InputSpec) -> bool {
    spec.name.to_ascii_lowercase().contains("past") && spec.dims.len() >= 3
}

fn dim_size(spec: &InputSpec, axis: usize, options: &GenerateOptions) -> usize {
    match &spec.dims[axis] {
        DimSpec::Fixed(n) => *n,
        DimSpec::Symbol(s) => options.symbol_size(s),
        DimSpec::Unknown => spec.inferred_dim(axis).unwrap_or(options.default_length),
    }
}

/// The past length a decoder's cache inputs are generated with.
fn past_length(specs: &[InputSpec], options: &GenerateOptions) -> Option<usize> {
    past_input(specs).map(|p| dim_size(p, p.dims.len() - 2, options))
}

/// The number of new tokens: axis 1 of the token ids.
fn new_tokens(specs: &[InputSpec], options: &GenerateOptions) -> Option<usize> {
    specs
        .iter()
        .find(|s| s.name.to_ascii_lowercase().contains("input_ids") && s.dims.len() == 2)
        .map(|ids| dim_size(ids, 1, options))
}

/// `position_ids` of the new tokens, `[batch, new]`: they follow the past (`past + j` in
/// every row), as a generation step feeds them. Random positions could index past the
/// rotary table a legacy export slices to the total length.
fn is_positions(spec: &InputSpec, options: &GenerateOptions) -> bool {
    names_positions(spec) && !options.ranges.contains_key(&spec.name)
}

/// `position_ids`: integer `[batch, new tokens]`.
fn names_positions(spec: &InputSpec) -> bool {
    spec.name.to_ascii_lowercase().contains("position_ids")
        && spec.dims.len() == 2
        && !spec.dtype.is_float()
}

fn positions(
    spec: &InputSpec,
    options: &GenerateOptions,
    past: usize,
) -> Result<Tensor, ExecError> {
    let bad = |e: &dyn std::fmt::Display| ExecError::Input(format!("input `{}`: {e}", spec.name));
    let (rows, new) = (dim_size(spec, 0, options), dim_size(spec, 1, options));
    let values: Vec<i64> = (0..rows * new).map(|i| (past + i % new) as i64).collect();
    let ids =
        Tensor::from(ArrayD::from_shape_vec(IxDyn(&[rows, new]), values).map_err(|e| bad(&e))?);
    ids.cast_to_dt(spec.dtype)
        .map(|t| t.into_owned())
        .map_err(|e| bad(&e))
}

fn generate_one(
    spec: &InputSpec,
    options: &GenerateOptions,
    seed: u64,
) -> Result<Tensor, ExecError> {
    let shape: Vec<usize> = (0..spec.dims.len())
        .map(|axis| dim_size(spec, axis, options))
        .collect();
    let n: usize = shape.iter().product();
    if spec.dtype == DatumType::String {
        return Err(ExecError::Input(format!(
            "input `{}` holds strings: give it in a batch file",
            spec.name
        )));
    }
    let range = options.ranges.get(&spec.name).copied();
    let cast = |t: Tensor| {
        t.cast_to_dt(spec.dtype)
            .map(|t| t.into_owned())
            .map_err(|e| ExecError::Input(format!("input `{}`: {e}", spec.name)))
    };
    let shaped = |e: tract_onnx::tract_hir::internal::tract_ndarray::ShapeError| {
        ExecError::Input(format!("input `{}`: {e}", spec.name))
    };
    if spec.dtype.is_float() {
        let values: Vec<f32> = (0..n as u64)
            .map(|i| match range {
                Some((lo, hi)) => (lo + (hi - lo) * rng::uniform(seed, i + 1)) as f32,
                None => rng::normal(seed, i) as f32,
            })
            .collect();
        return cast(
            ArrayD::from_shape_vec(IxDyn(&shape), values)
                .map_err(shaped)?
                .into(),
        );
    }
    let (lo, hi) = match range {
        Some((lo, hi)) => (lo.ceil() as i64, hi.floor() as i64),
        None if spec.dtype == DatumType::Bool => (0, 1),
        None => match spec.inferred_range {
            Some(r) => r,
            None if spec.name.to_ascii_lowercase().contains("mask") => (1, 1),
            None => (0, 9),
        },
    };
    if hi < lo {
        return Err(ExecError::Input(format!(
            "input `{}`: empty range {lo}:{hi}",
            spec.name
        )));
    }
    let span = (hi - lo + 1) as u64;
    let mut values: Vec<i64> = (0..n as u64)
        .map(|i| lo + (rng::splitmix64(seed, i + 1) % span) as i64)
        .collect();
    let is_mask = range.is_none()
        && spec.inferred_range.is_none()
        && spec.name.to_ascii_lowercase().contains("mask");
    if options.pad_masks && is_mask && shape.len() == 2 {
        let (rows, len) = (shape[0], shape[1]);
        for (r, row) in values.chunks_mut(len.max(1)).enumerate() {
            let padded = len * r / (2 * rows);
            let kept = len - padded;
            row[kept..].iter_mut().for_each(|v| *v = 0);
        }
    }
    cast(
        ArrayD::from_shape_vec(IxDyn(&shape), values)
            .map_err(shaped)?
            .into(),
    )
}

/// Reads every batch in `dir` (sorted by batch name).
pub fn load_batches(dir: &Path, specs: &[InputSpec]) -> Result<Vec<Batch>, ExecError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| ExecError::Input(format!("{}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    // batch name -> input name -> source
    let mut batches: BTreeMap<String, BTreeMap<String, Source>> = BTreeMap::new();
    for path in files {
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(stem) = file_name.strip_suffix(".npy") {
            if let Some((batch, input)) = split_batch_name(stem, specs) {
                batches
                    .entry(batch.to_string())
                    .or_default()
                    .insert(input.to_string(), Source::Npy(path.clone()));
            }
        } else if let Some(stem) = file_name.strip_suffix(".npz") {
            let names = npz_names(&path)?;
            for spec in specs.iter().filter(|s| names.contains(&s.name)) {
                batches.entry(stem.to_string()).or_default().insert(
                    spec.name.clone(),
                    Source::Npz(path.clone(), spec.name.clone()),
                );
            }
        }
    }
    if batches.is_empty() {
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        return Err(ExecError::Input(format!(
            "{}: no .npy or .npz file holds any of the inputs {names:?}",
            dir.display()
        )));
    }
    batches
        .into_iter()
        .map(|(name, sources)| {
            let mut given = Vec::new();
            for spec in specs {
                if let Some(source) = sources.get(&spec.name) {
                    let tensor = read_array(source, spec.dtype)?;
                    check_shape(spec, &tensor, source)?;
                    given.push((spec.name.clone(), tensor));
                }
            }
            let tensors = with_prompt_defaults(specs, given, |spec| {
                format!(
                    "batch `{name}` in {} has no array for input `{}`",
                    dir.display(),
                    spec.name
                )
            })?;
            check_symbols(&name, specs, &tensors)?;
            Ok(Batch { name, tensors })
        })
        .collect()
}

/// The tensors of `specs` in their order: each `given` one, or the one a prompt's batch may
/// leave out (`prompt_default`); else the error `missing` words.
fn with_prompt_defaults(
    specs: &[InputSpec],
    mut given: Vec<(String, Tensor)>,
    missing: impl Fn(&InputSpec) -> String,
) -> Result<Vec<(String, Tensor)>, ExecError> {
    let mut defaults = Vec::new();
    for spec in specs {
        if !given.iter().any(|(name, _)| *name == spec.name) {
            let made = prompt_default(spec, &given)
                .ok_or_else(|| ExecError::Input(missing(spec)))?
                .map_err(|e| ExecError::Input(format!("input `{}`: {e}", spec.name)))?;
            defaults.push((spec.name.clone(), made));
        }
    }
    given.append(&mut defaults);
    Ok(specs
        .iter()
        .filter_map(|spec| {
            let at = given.iter().position(|(name, _)| *name == spec.name)?;
            Some(given.swap_remove(at))
        })
        .collect())
}

/// An input that calibration text may leave out, as a generation loop's first step feeds
/// it: a decoder's KV cache empty (`[batch, heads, 0, head size]`, the heads and head size
/// the graph fixes), its `position_ids` following the attention mask (`cumsum(mask) - 1`, 1
/// where masked, as transformers' `generate` counts them; `0, 1, …` without a mask). Text
/// batches hold `input_ids` and `attention_mask` only, and every exporter of a decoder with a
/// cache (Optimum, the dynamo exporter, ONNX Runtime GenAI's model builder) adds these
/// inputs: a prompt is such a model's first step. `None` for any other input, or when the
/// batch has no token ids to size it.
fn prompt_default(spec: &InputSpec, given: &[(String, Tensor)]) -> Option<Result<Tensor, String>> {
    let lower = |name: &str| name.to_ascii_lowercase();
    let ids = given
        .iter()
        .find(|(name, t)| lower(name).contains("input_ids") && t.rank() == 2)
        .map(|(_, t)| t.shape());
    let (rows, new) = (ids?[0], ids?[1]);
    let rank = spec.dims.len();
    if is_cache(spec) {
        let shape: Option<Vec<usize>> = (0..rank)
            .map(|axis| match (axis, &spec.dims[axis]) {
                (0, _) => Some(rows),
                (a, _) if a == rank - 2 => Some(0),
                (_, DimSpec::Fixed(n)) => Some(*n),
                (a, _) => spec.inferred_dim(a),
            })
            .collect();
        let Some(shape) = shape else {
            return Some(Err(format!(
                "the cache's heads and head size ({}) are not fixed by the graph: give it \
                 in each batch",
                dims_text(&spec.dims)
            )));
        };
        return Some(Tensor::zero_dt(spec.dtype, &shape).map_err(|e| e.to_string()));
    }
    if !names_positions(spec) {
        return None;
    }
    let mask = given
        .iter()
        .find(|(name, t)| lower(name).contains("attention_mask") && t.rank() == 2)
        .and_then(|(_, t)| {
            t.cast_to_dt(DatumType::I64)
                .ok()?
                .into_owned()
                .into_plain_array::<i64>()
                .ok()
        });
    let mut values = Vec::with_capacity(rows * new);
    for row in 0..rows {
        match &mask {
            Some(mask) if mask.shape()[0] == rows && mask.shape()[1] >= new => {
                let total = mask.shape()[1];
                let mut count = 0;
                for j in 0..total {
                    count += mask[[row, j]];
                    if j >= total - new {
                        values.push(if mask[[row, j]] == 0 { 1 } else { count - 1 });
                    }
                }
            }
            _ => values.extend((0..new).map(|j| j as i64)),
        }
    }
    let positions = ArrayD::from_shape_vec(IxDyn(&[rows, new]), values)
        .map(Tensor::from)
        .map_err(|e| e.to_string())
        .and_then(|t| {
            t.cast_to_dt(spec.dtype)
                .map(|t| t.into_owned())
                .map_err(|e| e.to_string())
        });
    Some(positions)
}

/// One batch given as arrays by input name, in any order: a caller's own data in memory
/// (a dict of NumPy arrays, through the Python binding).
#[derive(Clone, Debug)]
pub struct NamedArrays {
    pub name: String,
    pub arrays: Vec<(String, Tensor)>,
}

/// Batches for `specs` from arrays given by name, checked as `load_batches` checks a
/// folder's: an array for every input (arrays that name no input, reference outputs say, are
/// ignored, as files are), element types converted as a file's would be (or kept, when they
/// are the input's own), shapes that fit the declared ones, and named dims that agree within
/// a batch.
pub fn batches_from_arrays(
    given: &[NamedArrays],
    specs: &[InputSpec],
) -> Result<Vec<Batch>, ExecError> {
    given
        .iter()
        .map(|batch| {
            let mut given = Vec::new();
            for spec in specs {
                if let Some((_, t)) = batch.arrays.iter().find(|(name, _)| *name == spec.name) {
                    let at = format!("batch `{}`, array `{}`", batch.name, spec.name);
                    let tensor = convert_array(t, spec.dtype, &at)?;
                    check_shape(spec, &tensor, &at)?;
                    given.push((spec.name.clone(), tensor));
                }
            }
            let tensors = with_prompt_defaults(specs, given, |spec| {
                format!(
                    "batch `{}` has no array for input `{}`",
                    batch.name, spec.name
                )
            })?;
            check_symbols(&batch.name, specs, &tensors)?;
            Ok(Batch {
                name: batch.name.clone(),
                tensors,
            })
        })
        .collect()
}

/// `t` as `want`, if it holds `want` or a type `accepted_types` converts.
fn convert_array(t: &Tensor, want: DatumType, at: &str) -> Result<Tensor, ExecError> {
    let dt = t.datum_type();
    let accepted = accepted_types(want).unwrap_or_default();
    if dt != want && !accepted.contains(&dt) {
        return Err(ExecError::Input(format!(
            "{at}: expected an array of {want:?}, got {dt:?}"
        )));
    }
    t.cast_to_dt(want)
        .map(|t| t.into_owned())
        .map_err(|e| ExecError::Input(format!("{at}: {e}")))
}

/// `("batch_00", "input_ids")` for `batch_00.input_ids`, `("", "input_ids")` for
/// `input_ids`; `None` when the name ends with no input's name. Input names may contain dots
/// (`past_key_values.0.key`), so the longest matching input name wins.
fn split_batch_name<'a>(stem: &'a str, specs: &'a [InputSpec]) -> Option<(&'a str, &'a str)> {
    specs
        .iter()
        .filter_map(|s| {
            if stem == s.name {
                return Some(("", s.name.as_str()));
            }
            let batch = stem.strip_suffix(s.name.as_str())?.strip_suffix('.')?;
            Some((batch, s.name.as_str()))
        })
        .max_by_key(|(_, input)| input.len())
}

#[derive(Clone, Debug)]
enum Source {
    Npy(PathBuf),
    Npz(PathBuf, String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Npy(p) => write!(f, "{}", p.display()),
            Source::Npz(p, name) => write!(f, "{}[{name}]", p.display()),
        }
    }
}

fn npz_names(path: &Path) -> Result<Vec<String>, ExecError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ExecError::Input(format!("{}: {e}", path.display())))?;
    ndarray_npy::NpzReader::new(file)
        .and_then(|mut z| z.names())
        .map_err(|e| ExecError::Input(format!("{}: not a readable .npz: {e}", path.display())))
}

/// The element types an array may hold to be fed as `want`: `want` itself, or one NumPy
/// users commonly save instead (int32 for int64 ids, float64 for float32, float32 for a
/// float16 model's inputs), converted on reading. `None`: such inputs cannot be read.
fn accepted_types(want: DatumType) -> Option<&'static [DatumType]> {
    Some(match want {
        DatumType::I64 => &[DatumType::I64, DatumType::I32],
        DatumType::I32 => &[DatumType::I32, DatumType::I64],
        DatumType::F32 => &[DatumType::F32, DatumType::F64],
        DatumType::F64 => &[DatumType::F64, DatumType::F32],
        // ndarray-npy reads no float16: the float32 arrays float16 models are fed.
        DatumType::F16 => &[DatumType::F32, DatumType::F64],
        DatumType::I8 => &[DatumType::I8],
        DatumType::I16 => &[DatumType::I16],
        DatumType::U8 => &[DatumType::U8],
        DatumType::U16 => &[DatumType::U16],
        DatumType::U32 => &[DatumType::U32],
        DatumType::U64 => &[DatumType::U64],
        DatumType::Bool => &[DatumType::Bool],
        _ => return None,
    })
}

/// Reads an array as `want`, accepting the element types `accepted_types` lists and
/// converting them.
fn read_array(source: &Source, want: DatumType) -> Result<Tensor, ExecError> {
    let candidates = accepted_types(want).ok_or_else(|| {
        ExecError::Input(format!(
            "{source}: reading {want:?} arrays is not supported"
        ))
    })?;
    let mut last = String::new();
    for &dt in candidates {
        match read_as(source, dt) {
            Ok(t) => {
                return t
                    .cast_to_dt(want)
                    .map(|t| t.into_owned())
                    .map_err(|e| ExecError::Input(format!("{source}: {e}")))
            }
            Err(e) => last = e,
        }
    }
    Err(ExecError::Input(format!(
        "{source}: expected an array of {want:?}: {last}"
    )))
}

fn read_as(source: &Source, dt: DatumType) -> Result<Tensor, String> {
    fn read<T: ndarray_npy::ReadableElement>(source: &Source) -> Result<Tensor, String>
    where
        Tensor: From<ArrayD<T>>,
    {
        let open = |p: &Path| std::fs::File::open(p).map_err(|e| e.to_string());
        let array: ArrayD<T> = match source {
            Source::Npy(p) => {
                ndarray_npy::ReadNpyExt::read_npy(open(p)?).map_err(|e| e.to_string())?
            }
            Source::Npz(p, name) => ndarray_npy::NpzReader::new(open(p)?)
                .and_then(|mut z| z.by_name(name))
                .map_err(|e| e.to_string())?,
        };
        Ok(array.into())
    }
    match dt {
        DatumType::F32 => read::<f32>(source),
        DatumType::F64 => read::<f64>(source),
        DatumType::I64 => read::<i64>(source),
        DatumType::I32 => read::<i32>(source),
        DatumType::I16 => read::<i16>(source),
        DatumType::I8 => read::<i8>(source),
        DatumType::U64 => read::<u64>(source),
        DatumType::U32 => read::<u32>(source),
        DatumType::U16 => read::<u16>(source),
        DatumType::U8 => read::<u8>(source),
        DatumType::Bool => read::<bool>(source),
        other => Err(format!("{other:?} is not readable")),
    }
}

/// An error unless `t`, read from `source`, fits the declared shape of `spec`.
fn check_shape(
    spec: &InputSpec,
    t: &Tensor,
    source: &dyn std::fmt::Display,
) -> Result<(), ExecError> {
    let shape = t.shape();
    let fits = shape.len() == spec.dims.len()
        && spec.dims.iter().zip(shape).all(|(d, &n)| match d {
            DimSpec::Fixed(f) => *f == n,
            _ => true,
        });
    if spec.dims.is_empty() || fits {
        return Ok(());
    }
    Err(ExecError::Input(format!(
        "{source}: shape {shape:?} does not fit input `{}` of shape {}",
        spec.name,
        dims_text(&spec.dims)
    )))
}

/// An error unless the arrays of one batch agree on every named dim (`input_ids` and
/// `attention_mask` on `sequence`): tract would otherwise stop deep inside the graph, at the
/// first operator that cannot broadcast one against the other.
fn check_symbols(
    batch: &str,
    specs: &[InputSpec],
    tensors: &[(String, Tensor)],
) -> Result<(), ExecError> {
    let mut seen: HashMap<&str, (&str, usize)> = HashMap::new();
    for (spec, (_, tensor)) in specs.iter().zip(tensors) {
        for (dim, &size) in spec.dims.iter().zip(tensor.shape()) {
            let DimSpec::Symbol(symbol) = dim else {
                continue;
            };
            match seen.get(symbol.as_str()) {
                Some(&(first, first_size)) if first_size != size => {
                    return Err(ExecError::Input(format!(
                        "batch `{batch}`: input `{}` has {symbol} = {size} where input `{first}` \
                         has {first_size}",
                        spec.name
                    )))
                }
                Some(_) => {}
                None => {
                    seen.insert(symbol, (&spec.name, size));
                }
            }
        }
    }
    Ok(())
}

pub fn dims_text(dims: &[DimSpec]) -> String {
    let d: Vec<String> = dims
        .iter()
        .map(|d| match d {
            DimSpec::Fixed(n) => n.to_string(),
            DimSpec::Symbol(s) => s.clone(),
            DimSpec::Unknown => "?".into(),
        })
        .collect();
    format!("[{}]", d.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_hir::internal::tract_ndarray::arr2;

    fn spec(name: &str, dtype: DatumType, dims: Vec<DimSpec>) -> InputSpec {
        InputSpec {
            name: name.into(),
            dtype,
            dims,
            inferred_range: None,
            inferred_dims: Vec::new(),
        }
    }

    fn specs() -> Vec<InputSpec> {
        let seq = || {
            vec![
                DimSpec::Symbol("batch".into()),
                DimSpec::Symbol("seq".into()),
            ]
        };
        vec![
            spec("ids", DatumType::I64, seq()),
            spec("mask", DatumType::I64, seq()),
        ]
    }

    fn batch(arrays: Vec<(&str, Tensor)>) -> NamedArrays {
        NamedArrays {
            name: "b".into(),
            arrays: arrays
                .into_iter()
                .map(|(n, t)| (n.to_string(), t))
                .collect(),
        }
    }

    fn weights(name: &str, dims: &[i64]) -> crate::ir::Tensor {
        let n = dims.iter().product::<i64>() as usize;
        crate::ir::Tensor::from_f32(name, dims, &vec![0.5; n]).unwrap()
    }

    /// The shapes generated for the inputs of `model`.
    fn generated_shapes(model: &Model) -> Vec<Vec<usize>> {
        let specs = input_specs(model).unwrap();
        let batch = generate(&specs, &GenerateOptions::default(), 1).unwrap();
        batch[0]
            .tensors
            .iter()
            .map(|(_, t)| t.shape().to_vec())
            .collect()
    }

    /// Optimum's ViT: every dim of `pixel_values` free; 8-pixel patches of a 32-pixel image
    /// are the 16 tokens a `[1, 17, 4]` table (one class token) adds to.
    #[test]
    fn an_image_gets_the_channels_and_size_its_patch_embedding_takes() {
        use crate::ir::attr;
        use crate::ir::testing::builder;
        use crate::proto::tensor_proto::DataType::Float;
        let model = builder()
            .input(
                "pixel_values",
                Float,
                &["batch_size", "num_channels", "height", "width"],
            )
            .output("tokens", Float, &["batch_size", "?", "4"])
            .init(weights("patch", &[4, 3, 8, 8]))
            .init(weights("cls", &[1, 1, 4]))
            .init(weights("positions", &[1, 17, 4]))
            .init(crate::ir::Tensor::from_i64("flat", &[3], &[0, 4, -1]).unwrap())
            .node(
                "Conv",
                &["pixel_values", "patch"],
                &["patches"],
                vec![attr::ints("strides", &[8, 8])],
            )
            .node("Reshape", &["patches", "flat"], &["rows"], vec![])
            .node(
                "Transpose",
                &["rows"],
                &["embedded"],
                vec![attr::ints("perm", &[0, 2, 1])],
            )
            .node(
                "Concat",
                &["cls", "embedded"],
                &["with_cls"],
                vec![attr::int("axis", 1)],
            )
            .node("Add", &["with_cls", "positions"], &["tokens"], vec![])
            .build();
        let specs = input_specs(&model).unwrap();
        assert_eq!(specs[0].inferred_dims, [None, Some(3), Some(32), Some(32)]);
        assert_eq!(generated_shapes(&model), [[1, 3, 32, 32]]);
        // A size the user gives wins.
        let options = GenerateOptions {
            dims: HashMap::from([("height".to_string(), 64), ("width".to_string(), 64)]),
            ..Default::default()
        };
        let given = generate(&specs, &options, 1).unwrap();
        assert_eq!(given[0].tensors[0].1.shape(), [1, 3, 64, 64]);
    }

    /// Whisper's encoder: 80 mel bins, a stride-1 and a stride-2 convolution (a GELU between)
    /// down to its 1500 positions: 3000 frames.
    #[test]
    fn audio_features_get_the_frames_their_positions_count() {
        use crate::ir::attr;
        use crate::ir::testing::builder;
        use crate::proto::tensor_proto::DataType::Float;
        let encoder = |positions: Option<i64>| {
            let mut b = builder()
                .input(
                    "input_features",
                    Float,
                    &["batch_size", "feature_size", "frames"],
                )
                .output("states", Float, &["batch_size", "?", "4"])
                .init(weights("conv1", &[4, 80, 3]))
                .init(weights("conv2", &[4, 4, 3]))
                .node(
                    "Conv",
                    &["input_features", "conv1"],
                    &["c1"],
                    vec![attr::ints("pads", &[1, 1])],
                )
                .node("Gelu", &["c1"], &["g1"], vec![])
                .node(
                    "Conv",
                    &["g1", "conv2"],
                    &["c2"],
                    vec![attr::ints("pads", &[1, 1]), attr::ints("strides", &[2])],
                )
                .node(
                    "Transpose",
                    &["c2"],
                    &["t"],
                    vec![attr::ints("perm", &[0, 2, 1])],
                );
            b = match positions {
                Some(n) => b.init(weights("positions", &[n, 4])).node(
                    "Add",
                    &["t", "positions"],
                    &["states"],
                    vec![],
                ),
                None => b.node("Identity", &["t"], &["states"], vec![]),
            };
            b.build()
        };
        let specs = input_specs(&encoder(Some(1500))).unwrap();
        assert_eq!(specs[0].inferred_dims, [None, Some(80), Some(3000)]);
        // Without a table, 16 positions' worth of frames.
        let specs = input_specs(&encoder(None)).unwrap();
        assert_eq!(specs[0].inferred_dims, [None, Some(80), Some(32)]);
        assert_eq!(generated_shapes(&encoder(None)), [[1, 80, 32]]);
    }

    /// wav2vec2's raw audio: `[batch, samples]`, unsqueezed into one channel, through
    /// convolutions of strides 5 and 2 with a normalization between: 16 positions' worth.
    #[test]
    fn raw_audio_gets_the_samples_of_sixteen_positions() {
        use crate::ir::attr;
        use crate::ir::testing::builder;
        use crate::proto::tensor_proto::DataType::Float;
        let model = builder()
            .input("input_values", Float, &["batch_size", "sequence_length"])
            .output("features", Float, &["batch_size", "4", "?"])
            .init(weights("conv0", &[4, 1, 10]))
            .init(weights("conv1", &[4, 4, 3]))
            .init(weights("scale", &[4]))
            .init(weights("bias", &[4]))
            .init(crate::ir::Tensor::from_i64("channel_axis", &[1], &[1]).unwrap())
            .node(
                "Unsqueeze",
                &["input_values", "channel_axis"],
                &["waves"],
                vec![],
            )
            .node(
                "Conv",
                &["waves", "conv0"],
                &["c0"],
                vec![attr::ints("strides", &[5])],
            )
            .node(
                "InstanceNormalization",
                &["c0", "scale", "bias"],
                &["n0"],
                vec![],
            )
            .node("Gelu", &["n0"], &["g0"], vec![])
            .node(
                "Conv",
                &["g0", "conv1"],
                &["features"],
                vec![attr::ints("strides", &[2])],
            )
            .build();
        let specs = input_specs(&model).unwrap();
        assert_eq!(specs[0].inferred_dims, [None, Some(160)]);
        assert_eq!(generated_shapes(&model), [[1, 160]]);
    }

    /// An INT8 QDQ model's embeddings: the Gather reads the table through a
    /// DequantizeLinear; token ids are drawn from its rows (2 token types here, where a
    /// default 0..9 ran out of the table).
    #[test]
    fn ids_index_the_rows_of_a_dequantized_table() {
        use crate::ir::testing::builder;
        use crate::proto::tensor_proto::DataType::{Float, Int64};
        let codes = crate::ir::Tensor::from_raw(
            "types_q",
            DataType::Int8,
            &[2, 4],
            bytes::Bytes::from(vec![1u8; 8]),
        )
        .unwrap();
        let model = builder()
            .input("token_type_ids", Int64, &["batch", "sequence"])
            .output("embedded", Float, &["batch", "sequence", "4"])
            .init(codes)
            .init(crate::ir::Tensor::from_f32("scale", &[], &[0.1]).unwrap())
            .node(
                "DequantizeLinear",
                &["types_q", "scale"],
                &["types"],
                vec![],
            )
            .node(
                "Gather",
                &["types", "token_type_ids"],
                &["embedded"],
                vec![],
            )
            .build();
        let specs = input_specs(&model).unwrap();
        assert_eq!(specs[0].inferred_range, Some((0, 1)));
    }

    /// ONNX Runtime GenAI's decoders name the cache's head size `kv_cache_dim`: it is the
    /// packed query's width over its heads (2 query and 1 key-value heads of 6: 24).
    #[test]
    fn a_kv_cache_gets_the_heads_and_head_size_its_attention_reads() {
        use crate::ir::attr;
        use crate::ir::testing::builder;
        use crate::proto::tensor_proto::DataType::{Float, Int32};
        let past = ["batch_size", "1", "past_sequence_length", "kv_cache_dim"];
        let mut model = builder()
            .input("hidden", Float, &["batch_size", "sequence_length", "8"])
            .input("past_key_values.0.key", Float, &past)
            .input("past_key_values.0.value", Float, &past)
            .input("seqlens_k", Int32, &["batch_size"])
            .input("total_sequence_length", Int32, &[])
            .output("attended", Float, &["batch_size", "sequence_length", "12"])
            .init(weights("qkv", &[8, 24]))
            .node("MatMul", &["hidden", "qkv"], &["packed"], vec![])
            .node(
                "GroupQueryAttention",
                &[
                    "packed",
                    "",
                    "",
                    "past_key_values.0.key",
                    "past_key_values.0.value",
                    "seqlens_k",
                    "total_sequence_length",
                ],
                &["attended", "present.0.key", "present.0.value"],
                vec![attr::int("num_heads", 2), attr::int("kv_num_heads", 1)],
            )
            .build();
        let gqa = model
            .graph
            .nodes()
            .find(|(_, n)| n.op_type() == "GroupQueryAttention");
        let id = gqa.unwrap().0;
        model.graph.node_mut_proto(id).domain = Some(crate::ops::MS_DOMAIN.into());
        let specs = input_specs(&model).unwrap();
        for spec in &specs[1..3] {
            assert_eq!(
                spec.inferred_dims,
                [None, Some(1), None, Some(6)],
                "{}",
                spec.name
            );
        }
        let batch = generate(&specs, &GenerateOptions::default(), 1).unwrap();
        assert_eq!(batch[0].tensors[1].1.shape(), [1, 1, 16, 6]);
    }

    /// A dynamo export of a decoder with past names every dim apart (`s10`, `s70`, ...): the
    /// generated inputs still agree, as the model needs to run.
    #[test]
    fn opaque_symbols_get_the_sizes_of_their_roles() {
        let sym = |s: &str| DimSpec::Symbol(s.into());
        let past = vec![
            sym("s10"),
            DimSpec::Fixed(2),
            sym("s15"),
            DimSpec::Fixed(16),
        ];
        let specs = vec![
            spec("input_ids", DatumType::I64, vec![sym("s10"), sym("s70")]),
            spec(
                "attention_mask",
                DatumType::I64,
                vec![sym("s43"), sym("s53")],
            ),
            spec("past_key_values.0.key", DatumType::F32, past),
        ];
        let options = GenerateOptions {
            default_batch: 2,
            default_length: 8,
            ..Default::default()
        };
        let batch = &generate(&specs, &options, 1).unwrap()[0];
        let shapes: Vec<&[usize]> = batch.tensors.iter().map(|(_, t)| t.shape()).collect();
        assert_eq!(shapes, [&[2, 8][..], &[2, 16], &[2, 2, 8, 16]]);
        // Without past, the mask spans the new tokens only.
        let batch = &generate(&specs[..2], &options, 1).unwrap()[0];
        assert_eq!(batch.tensors[1].1.shape(), [2, 8]);
    }

    /// Optimum names a decoder's mask `past_sequence_length + 1` and its new tokens
    /// `sequence_length`: the mask spans the past and the new tokens whatever their number,
    /// and the positions follow the past, as in a generation step (a legacy export's rotary
    /// table, sliced to the total length, has no row for a position past it).
    #[test]
    fn a_decoders_mask_spans_its_past_and_its_positions_follow_it() {
        let sym = |s: &str| DimSpec::Symbol(s.into());
        let batch = || sym("batch_size");
        let specs = vec![
            spec(
                "input_ids",
                DatumType::I64,
                vec![batch(), sym("sequence_length")],
            ),
            spec(
                "attention_mask",
                DatumType::I64,
                vec![batch(), sym("past_sequence_length + 1")],
            ),
            spec(
                "position_ids",
                DatumType::I64,
                vec![batch(), sym("sequence_length")],
            ),
            spec(
                "past_key_values.0.key",
                DatumType::F32,
                vec![
                    batch(),
                    DimSpec::Fixed(2),
                    sym("past_sequence_length"),
                    DimSpec::Fixed(16),
                ],
            ),
        ];
        let options = GenerateOptions {
            default_batch: 2,
            default_length: 4,
            ..Default::default()
        };
        let batch = &generate(&specs, &options, 1).unwrap()[0];
        let shapes: Vec<&[usize]> = batch.tensors.iter().map(|(_, t)| t.shape()).collect();
        assert_eq!(shapes, [&[2, 4][..], &[2, 8], &[2, 4], &[2, 2, 4, 16]]);
        let positions = batch.tensor("position_ids").unwrap();
        let positions: Vec<i64> = positions
            .to_plain_array_view::<i64>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        assert_eq!(positions, [4, 5, 6, 7, 4, 5, 6, 7]);
    }

    #[test]
    fn arrays_are_put_in_input_order_and_converted() {
        let given = batch(vec![
            ("mask", arr2(&[[1i32, 1, 0]]).into_dyn().into()),
            // An array that names no input is left out, as a file would be.
            ("logits", arr2(&[[0.5f32]]).into_dyn().into()),
            ("ids", arr2(&[[5i64, 6, 7]]).into_dyn().into()),
        ]);
        let batches = batches_from_arrays(&[given], &specs()).unwrap();
        let names: Vec<&str> = batches[0].tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ids", "mask"]);
        assert_eq!(batches[0].tensors[1].1.datum_type(), DatumType::I64);
    }

    #[test]
    fn arrays_get_the_checks_of_a_folder() {
        let ids: Tensor = arr2(&[[5i64, 6, 7]]).into_dyn().into();
        let error = |arrays| {
            batches_from_arrays(&[batch(arrays)], &specs())
                .unwrap_err()
                .to_string()
        };
        assert!(error(vec![("ids", ids.clone())]).contains("no array for input `mask`"));
        let floats: Tensor = arr2(&[[1f32, 1., 0.]]).into_dyn().into();
        let typed = error(vec![("ids", ids.clone()), ("mask", floats)]);
        assert!(
            typed.contains("expected an array of I64, got F32"),
            "{typed}"
        );
        let short: Tensor = arr2(&[[1i64, 1]]).into_dyn().into();
        let dims = error(vec![("ids", ids), ("mask", short)]);
        assert!(dims.contains("seq = 2 where input `ids` has 3"), "{dims}");
    }

    /// Calibration text for a decoder with a cache: `input_ids` and `attention_mask` only. The
    /// cache comes empty, with the heads and head size the graph fixes (here the model
    /// builder's named `kv_cache_dim`), and the positions follow the mask: 0, 1, … over the
    /// real tokens, 1 where padded.
    #[test]
    fn a_prompt_gets_an_empty_cache_and_its_positions() {
        let named = |n: &str| DimSpec::Symbol(n.into());
        let mut past = spec(
            "past_key_values.0.key",
            DatumType::F32,
            vec![
                named("batch"),
                DimSpec::Fixed(3),
                named("past"),
                named("kv_cache_dim"),
            ],
        );
        past.inferred_dims = vec![None, Some(3), None, Some(64)];
        let specs = vec![
            spec(
                "input_ids",
                DatumType::I64,
                vec![named("batch"), named("seq")],
            ),
            spec(
                "attention_mask",
                DatumType::I64,
                vec![named("batch"), named("total")],
            ),
            spec(
                "position_ids",
                DatumType::I64,
                vec![named("batch"), named("seq")],
            ),
            past,
        ];
        let prompt = NamedArrays {
            name: "text".into(),
            arrays: vec![
                (
                    "input_ids".into(),
                    arr2(&[[5i64, 6, 7], [5, 6, 0]]).into_dyn().into(),
                ),
                (
                    "attention_mask".into(),
                    arr2(&[[1i64, 1, 1], [0, 1, 1]]).into_dyn().into(),
                ),
            ],
        };
        let batches = batches_from_arrays(std::slice::from_ref(&prompt), &specs).unwrap();
        let tensors = &batches[0].tensors;
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "input_ids",
                "attention_mask",
                "position_ids",
                "past_key_values.0.key"
            ]
        );
        let positions: Tensor = arr2(&[[0i64, 1, 2], [1, 0, 1]]).into_dyn().into();
        assert_eq!(tensors[2].1, positions);
        assert_eq!(tensors[3].1.shape(), [2, 3, 0, 64]);
        // A cache whose head size the graph does not fix cannot be made up.
        let mut unsized_specs = specs.clone();
        unsized_specs[3].inferred_dims.clear();
        let error = batches_from_arrays(&[prompt], &unsized_specs)
            .unwrap_err()
            .to_string();
        assert!(error.contains("give it in each batch"), "{error}");
    }
}
