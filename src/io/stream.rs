//! Encoding a protobuf message straight into a file.
//!
//! prost encodes into a `BufMut`. Encoding a 400 MB model into a `Vec` first would hold a
//! second copy of every weight in memory; `FileSink` is a `BufMut` that hands each filled
//! chunk to the writer instead, so saving costs one small buffer whatever the model's size,
//! and the bytes are exactly prost's.

use std::io::Write;

use bytes::buf::UninitSlice;
use bytes::BufMut;

const CHUNK: usize = 1 << 20;

pub struct FileSink<W: Write> {
    inner: W,
    buf: Vec<u8>,
    written: u64,
    error: Option<std::io::Error>,
}

impl<W: Write> FileSink<W> {
    pub fn new(inner: W) -> Self {
        FileSink {
            inner,
            buf: Vec::with_capacity(CHUNK),
            written: 0,
            error: None,
        }
    }

    fn drain(&mut self) {
        if self.error.is_none() {
            if let Err(e) = self.inner.write_all(&self.buf) {
                self.error = Some(e);
            }
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
    }

    /// Writes what is buffered and returns the writer and the number of bytes encoded, or the
    /// first write error (`BufMut` cannot report one while encoding).
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        self.drain();
        match self.error.take() {
            Some(e) => Err(e),
            None => {
                self.inner.flush()?;
                Ok((self.inner, self.written))
            }
        }
    }
}

// SAFETY: `chunk_mut` returns the spare capacity of `buf`, which is never empty (a full buffer
// is drained first); `advance_mut` only marks as initialised the bytes the caller wrote into
// that spare capacity, which the trait's contract requires (`cnt <= chunk_mut().len()`).
unsafe impl<W: Write> BufMut for FileSink<W> {
    fn remaining_mut(&self) -> usize {
        usize::MAX - self.buf.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        let len = self.buf.len() + cnt;
        assert!(len <= self.buf.capacity(), "advance_mut past the chunk");
        // SAFETY: see the impl comment; the caller initialised these `cnt` bytes.
        unsafe { self.buf.set_len(len) };
        if self.buf.len() == self.buf.capacity() {
            self.drain();
        }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        if self.buf.len() == self.buf.capacity() {
            self.drain();
        }
        UninitSlice::uninit(self.buf.spare_capacity_mut())
    }

    fn put<T: bytes::Buf>(&mut self, mut src: T)
    where
        Self: Sized,
    {
        // prost writes `Bytes` fields with `put`: route them through `put_slice` so that a
        // large weight is written straight from the memory map.
        while src.has_remaining() {
            let n = src.chunk().len();
            self.put_slice(src.chunk());
            src.advance(n);
        }
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= CHUNK {
            // Weights: skip the intermediate copy.
            self.drain();
            if self.error.is_none() {
                if let Err(e) = self.inner.write_all(src) {
                    self.error = Some(e);
                }
            }
            self.written += src.len() as u64;
        } else {
            let mut rest = src;
            while !rest.is_empty() {
                let room = self.buf.capacity() - self.buf.len();
                let n = room.min(rest.len());
                self.buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if self.buf.len() == self.buf.capacity() {
                    self.drain();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{GraphProto, ModelProto, TensorProto};
    use prost::Message;

    #[test]
    fn streamed_encoding_equals_prost_encoding() {
        let big = bytes::Bytes::from((0..3 * CHUNK + 17).map(|i| i as u8).collect::<Vec<_>>());
        let model = ModelProto {
            ir_version: Some(8),
            producer_name: Some("x".into()),
            graph: Some(GraphProto {
                name: Some("g".into()),
                initializer: vec![TensorProto {
                    name: Some("w".into()),
                    dims: vec![big.len() as i64],
                    data_type: Some(2),
                    raw_data: Some(big),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut sink = FileSink::new(Vec::new());
        model.encode(&mut sink).unwrap();
        let (streamed, n) = sink.finish().unwrap();
        assert_eq!(streamed, model.encode_to_vec());
        assert_eq!(n as usize, streamed.len());
    }
}
