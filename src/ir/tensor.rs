//! Tensors as the IR holds them: the `TensorProto` exactly as it was read, with its bytes
//! still pointing into the memory-mapped file. Values are decoded only when a pass asks.
//!
//! Keeping the proto (not a decoded array) is what makes the round trip lossless (typed
//! fields stay typed, `raw_data` stays raw, doc strings and metadata stay) and what keeps a
//! 400 MB model at 400 MB of address space instead of three copies.

use std::borrow::Cow;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::proto::tensor_proto::DataLocation;
pub use crate::proto::tensor_proto::DataType;
use crate::proto::TensorProto;

/// Facts about ONNX element types that the IR, the loader and the dump need.
pub trait DataTypeExt {
    /// Bits per element in `raw_data`, or `None` where ONNX does not pin a packed layout
    /// that this crate knows (strings, float6).
    fn bit_width(self) -> Option<usize>;
    /// Short lower-case name for dumps and reports: `f32`, `i64`, …
    fn short_name(self) -> &'static str;
    fn is_float(&self) -> bool;
}

impl DataTypeExt for DataType {
    fn bit_width(self) -> Option<usize> {
        use DataType::*;
        Some(match self {
            Int2 | Uint2 => 2,
            Int4 | Uint4 | Float4e2m1 => 4,
            Uint8 | Int8 | Bool | Float8e4m3fn | Float8e4m3fnuz | Float8e5m2 | Float8e5m2fnuz
            | Float8e8m0 => 8,
            Uint16 | Int16 | Float16 | Bfloat16 => 16,
            Float | Int32 | Uint32 => 32,
            Int64 | Uint64 | Double | Complex64 => 64,
            Complex128 => 128,
            Undefined | String | Float6e2m3 | Float6e3m2 => return None,
        })
    }

    fn short_name(self) -> &'static str {
        use DataType::*;
        match self {
            Undefined => "undefined",
            Float => "f32",
            Uint8 => "u8",
            Int8 => "i8",
            Uint16 => "u16",
            Int16 => "i16",
            Int32 => "i32",
            Int64 => "i64",
            String => "string",
            Bool => "bool",
            Float16 => "f16",
            Double => "f64",
            Uint32 => "u32",
            Uint64 => "u64",
            Complex64 => "c64",
            Complex128 => "c128",
            Bfloat16 => "bf16",
            Float8e4m3fn => "f8e4m3fn",
            Float8e4m3fnuz => "f8e4m3fnuz",
            Float8e5m2 => "f8e5m2",
            Float8e5m2fnuz => "f8e5m2fnuz",
            Uint4 => "u4",
            Int4 => "i4",
            Float4e2m1 => "f4e2m1",
            Float8e8m0 => "f8e8m0",
            Uint2 => "u2",
            Int2 => "i2",
            Float6e2m3 => "f6e2m3",
            Float6e3m2 => "f6e3m2",
        }
    }

    fn is_float(&self) -> bool {
        use DataType::*;
        matches!(
            *self,
            Float
                | Double
                | Float16
                | Bfloat16
                | Float8e4m3fn
                | Float8e4m3fnuz
                | Float8e5m2
                | Float8e5m2fnuz
                | Float8e8m0
                | Float4e2m1
                | Float6e2m3
                | Float6e3m2
        )
    }
}

/// Name of an element type code as it appears in dumps; unknown codes print as `dtype(N)`.
pub fn dtype_name(code: i32) -> Cow<'static, str> {
    match DataType::try_from(code) {
        Ok(dt) => Cow::Borrowed(dt.short_name()),
        Err(_) => Cow::Owned(format!("dtype({code})")),
    }
}

/// Number of elements described by `dims`, refusing negative dims and overflow.
pub fn element_count(dims: &[i64]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
    })
}

/// Bytes that `n` elements of `dt` occupy in `raw_data` (sub-byte types are packed).
pub fn raw_byte_len(dt: DataType, n: usize) -> Option<usize> {
    let bits = dt.bit_width()?;
    n.checked_mul(bits).map(|b| b.div_ceil(8))
}

/// A tensor: its proto, validated so that its dims and its data agree.
/// The little-endian bytes of `values` as element type `dt`: float32, or float16 rounded to
/// nearest (a value past float16's ±65 504 becomes infinite: `quant::fp16` clamps first).
pub fn float_bytes(values: &[f32], dt: DataType) -> Result<Vec<u8>> {
    Ok(match dt {
        DataType::Float => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DataType::Float16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        other => {
            return Err(Error::InvalidArgument(format!(
                "float values cannot be written as {}",
                other.short_name()
            )))
        }
    })
}

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    proto: TensorProto,
}

impl Tensor {
    /// Wraps a proto after checking that its data holds exactly what its dims claim.
    /// External data must have been resolved by `io` before this is called.
    pub fn from_proto(proto: TensorProto) -> Result<Tensor> {
        check_tensor_proto(&proto)?;
        Ok(Tensor { proto })
    }

    /// A tensor of `dt` whose little-endian `raw_data` is `data`.
    pub fn from_raw(name: &str, dt: DataType, dims: &[i64], data: Bytes) -> Result<Tensor> {
        Tensor::from_proto(TensorProto {
            name: Some(name.to_string()),
            dims: dims.to_vec(),
            data_type: Some(dt as i32),
            raw_data: Some(data),
            ..Default::default()
        })
    }

    pub fn from_f32(name: &str, dims: &[i64], values: &[f32]) -> Result<Tensor> {
        Tensor::from_f32_as(name, DataType::Float, dims, values)
    }

    /// `values` stored as `dt`, float32 or float16 (`float_bytes`).
    pub fn from_f32_as(name: &str, dt: DataType, dims: &[i64], values: &[f32]) -> Result<Tensor> {
        Tensor::from_raw(name, dt, dims, Bytes::from(float_bytes(values, dt)?))
    }

    pub fn from_i64(name: &str, dims: &[i64], values: &[i64]) -> Result<Tensor> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::Int64, dims, Bytes::from(bytes))
    }

    pub fn proto(&self) -> &TensorProto {
        &self.proto
    }

    pub fn into_proto(self) -> TensorProto {
        self.proto
    }

    pub fn name(&self) -> &str {
        self.proto.name()
    }

    pub fn set_name(&mut self, name: &str) {
        self.proto.name = Some(name.to_string());
    }

    /// The element type; `Undefined` for a code this schema does not know.
    pub fn dtype(&self) -> DataType {
        DataType::try_from(self.proto.data_type()).unwrap_or(DataType::Undefined)
    }

    pub fn dims(&self) -> &[i64] {
        &self.proto.dims
    }

    pub fn numel(&self) -> usize {
        // Checked in `from_proto`.
        element_count(&self.proto.dims).unwrap_or(0)
    }

    /// Bytes the data occupies in its raw little-endian form.
    pub fn byte_len(&self) -> usize {
        match &self.proto.raw_data {
            Some(raw) => raw.len(),
            None if self.dtype() == DataType::String => {
                self.proto.string_data.iter().map(|s| s.len()).sum()
            }
            None => raw_byte_len(self.dtype(), self.numel()).unwrap_or(0),
        }
    }

    /// The data in its little-endian `raw_data` form: borrowed when the proto stores raw
    /// bytes, encoded from the typed field otherwise. `None` for strings and for types
    /// whose packing this crate does not know.
    pub fn raw_bytes(&self) -> Option<Cow<'_, [u8]>> {
        if let Some(raw) = &self.proto.raw_data {
            return Some(Cow::Borrowed(raw));
        }
        let p = &self.proto;
        let dt = self.dtype();
        let bytes: Vec<u8> = match dt {
            DataType::Float | DataType::Complex64 => {
                p.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            DataType::Double | DataType::Complex128 => {
                p.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            DataType::Int64 => p.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DataType::Uint64 => p.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DataType::Uint32 => p
                .uint64_data
                .iter()
                .flat_map(|&v| (v as u32).to_le_bytes())
                .collect(),
            DataType::Int32 => p.int32_data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DataType::Int16 | DataType::Uint16 | DataType::Float16 | DataType::Bfloat16 => p
                .int32_data
                .iter()
                .flat_map(|&v| (v as u16).to_le_bytes())
                .collect(),
            DataType::Int8
            | DataType::Uint8
            | DataType::Bool
            | DataType::Float8e4m3fn
            | DataType::Float8e4m3fnuz
            | DataType::Float8e5m2
            | DataType::Float8e5m2fnuz
            | DataType::Float8e8m0
            | DataType::Int4
            | DataType::Uint4
            | DataType::Float4e2m1
            | DataType::Int2
            | DataType::Uint2 => p.int32_data.iter().map(|&v| v as u8).collect(),
            DataType::String
            | DataType::Undefined
            | DataType::Float6e2m3
            | DataType::Float6e3m2 => return None,
        };
        Some(Cow::Owned(bytes))
    }

    /// Rewrites the proto so its data is in `raw_data` (strings and unknown packings stay as
    /// they are). Readers that mishandle typed fields then see the one layout all agree on.
    pub fn into_raw_form(self) -> Tensor {
        if self.proto.raw_data.is_some() {
            return self;
        }
        let Some(raw) = self.raw_bytes().map(|b| bytes::Bytes::copy_from_slice(&b)) else {
            return self;
        };
        let proto = TensorProto {
            raw_data: Some(raw),
            float_data: Vec::new(),
            int32_data: Vec::new(),
            int64_data: Vec::new(),
            double_data: Vec::new(),
            uint64_data: Vec::new(),
            ..self.proto
        };
        Tensor { proto }
    }

    /// Values as f32, for float element types (f16, bf16 and f64 are converted).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let raw = self.raw_bytes().ok_or_else(|| self.unsupported("f32"))?;
        Ok(match self.dtype() {
            DataType::Float => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DataType::Double => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            DataType::Float16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DataType::Bfloat16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => return Err(self.unsupported("f32")),
        })
    }

    /// Values as i64, for integer and bool element types of at least 8 bits.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        let raw = self.raw_bytes().ok_or_else(|| self.unsupported("i64"))?;
        Ok(match self.dtype() {
            DataType::Int64 => raw
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
            DataType::Uint64 => raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as i64)
                .collect(),
            DataType::Int32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            DataType::Uint32 => raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            DataType::Int16 => raw
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            DataType::Uint16 => raw
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            DataType::Int8 => raw.iter().map(|&b| b as i8 as i64).collect(),
            DataType::Uint8 | DataType::Bool => raw.iter().map(|&b| b as i64).collect(),
            _ => return Err(self.unsupported("i64")),
        })
    }

    /// The single value of a one-element numeric tensor, as f64.
    pub fn scalar_f64(&self) -> Option<f64> {
        if self.numel() != 1 {
            return None;
        }
        if self.dtype().is_float() {
            self.to_f32_vec().ok().map(|v| v[0] as f64)
        } else {
            self.to_i64_vec().ok().map(|v| v[0] as f64)
        }
    }

    fn unsupported(&self, what: &str) -> Error {
        Error::invalid_tensor(
            self.name(),
            format!("cannot read {} values as {what}", self.dtype().short_name()),
        )
    }
}

/// Checks that a tensor's data holds exactly as many elements as its dims declare. This is
/// what stops a crafted file from making a pass read past the end of a buffer, or allocate
/// what the file never held.
pub fn check_tensor_proto(p: &TensorProto) -> Result<()> {
    let name = p.name();
    let bad = |reason: String| Err(Error::invalid_tensor(name, reason));
    let Some(n) = element_count(&p.dims) else {
        return bad(format!("invalid dims {:?}", p.dims));
    };
    if p.data_location() == DataLocation::External {
        return bad("external data was not resolved".into());
    }
    let Ok(dt) = DataType::try_from(p.data_type()) else {
        return bad(format!("unknown data type {}", p.data_type()));
    };
    if dt == DataType::Undefined {
        return bad("data type is UNDEFINED".into());
    }
    if dt == DataType::String {
        if p.string_data.len() != n {
            return bad(format!(
                "dims {:?} declare {n} strings but it holds {}",
                p.dims,
                p.string_data.len()
            ));
        }
        return Ok(());
    }
    let Some(expected_bytes) = raw_byte_len(dt, n) else {
        // float6 and future packed types: nothing this crate reads, nothing to check.
        return Ok(());
    };
    if let Some(raw) = &p.raw_data {
        if raw.len() != expected_bytes {
            return bad(format!(
                "dims {:?} of {} need {expected_bytes} bytes but raw_data holds {}",
                p.dims,
                dt.short_name(),
                raw.len()
            ));
        }
        return Ok(());
    }
    let (field, held, expected) = typed_field_len(p, dt, n);
    if held != expected {
        return bad(format!(
            "dims {:?} of {} need {expected} entries in {field} but it holds {held}",
            p.dims,
            dt.short_name()
        ));
    }
    Ok(())
}

/// Which typed field stores `dt` when there is no `raw_data`, how many entries it holds, and
/// how many `n` elements need (ONNX packs sub-byte types into int32_data, and complex numbers
/// take two entries).
fn typed_field_len(p: &TensorProto, dt: DataType, n: usize) -> (&'static str, usize, usize) {
    use DataType::*;
    match dt {
        Float => ("float_data", p.float_data.len(), n),
        Complex64 => ("float_data", p.float_data.len(), 2 * n),
        Double => ("double_data", p.double_data.len(), n),
        Complex128 => ("double_data", p.double_data.len(), 2 * n),
        Int64 => ("int64_data", p.int64_data.len(), n),
        Uint32 | Uint64 => ("uint64_data", p.uint64_data.len(), n),
        Int4 | Uint4 | Float4e2m1 => ("int32_data", p.int32_data.len(), n.div_ceil(2)),
        Int2 | Uint2 => ("int32_data", p.int32_data.len(), n.div_ceil(4)),
        _ => ("int32_data", p.int32_data.len(), n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_tensor_round_trips_values() {
        let t = Tensor::from_f32("w", &[2, 2], &[1.0, -2.0, 0.5, 3.25]).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.0, -2.0, 0.5, 3.25]);
        assert_eq!(t.byte_len(), 16);
        let i = Tensor::from_i64("s", &[3], &[1, -1, 7]).unwrap();
        assert_eq!(i.to_i64_vec().unwrap(), vec![1, -1, 7]);
        assert_eq!(i.scalar_f64(), None);
    }

    #[test]
    fn typed_fields_decode_like_raw() {
        let p = TensorProto {
            name: Some("h".into()),
            dims: vec![2],
            data_type: Some(DataType::Float16 as i32),
            int32_data: vec![
                half::f16::from_f32(1.5).to_bits() as i32,
                half::f16::from_f32(-2.0).to_bits() as i32,
            ],
            ..Default::default()
        };
        let t = Tensor::from_proto(p).unwrap();
        assert_eq!(t.to_f32_vec().unwrap(), vec![1.5, -2.0]);
        assert_eq!(t.byte_len(), 4);
    }

    #[test]
    fn typed_uint32_becomes_raw_little_endian() {
        let p = TensorProto {
            dims: vec![2],
            data_type: Some(DataType::Uint32 as i32),
            uint64_data: vec![1, 0xFFFF_FFFF],
            ..Default::default()
        };
        let raw = Tensor::from_proto(p).unwrap().into_raw_form();
        assert_eq!(
            raw.proto().raw_data.as_deref(),
            Some(&[1, 0, 0, 0, 255, 255, 255, 255][..])
        );
        assert!(raw.proto().uint64_data.is_empty());
        assert_eq!(raw.to_i64_vec().unwrap(), vec![1, 0xFFFF_FFFF]);
    }

    #[test]
    fn dims_claiming_more_than_the_data_are_refused() {
        let p = TensorProto {
            name: Some("big".into()),
            dims: vec![1000, 1000],
            data_type: Some(DataType::Float as i32),
            raw_data: Some(Bytes::from_static(&[0; 16])),
            ..Default::default()
        };
        let err = Tensor::from_proto(p).unwrap_err().to_string();
        assert!(
            err.contains("need 4000000 bytes but raw_data holds 16"),
            "{err}"
        );
    }

    #[test]
    fn empty_typed_field_is_refused_and_negative_dims_too() {
        let p = TensorProto {
            name: Some("w".into()),
            dims: vec![4],
            data_type: Some(DataType::Int64 as i32),
            ..Default::default()
        };
        assert!(Tensor::from_proto(p).is_err());
        let p = TensorProto {
            dims: vec![-1],
            data_type: Some(DataType::Float as i32),
            ..Default::default()
        };
        assert!(Tensor::from_proto(p).is_err());
    }

    #[test]
    fn sub_byte_types_are_packed() {
        assert_eq!(raw_byte_len(DataType::Int4, 5), Some(3));
        assert_eq!(raw_byte_len(DataType::Uint2, 5), Some(2));
        assert_eq!(raw_byte_len(DataType::String, 5), None);
    }
}
