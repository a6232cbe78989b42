//! The attention operators onnxopt emits, and what each runtime accepts of their inputs.
//!
//! Three operators carry the additive attention bias (the mask, T5's relative positions):
//! `com.microsoft::Attention` and `com.microsoft::MultiHeadAttention` as `attention_bias`,
//! ONNX's `Attention` (opset 23) as `attn_mask`. Exporters write that bias in whatever shape
//! broadcasts against the scores `[batch, heads, q_len, total]` — the classic BERT mask is
//! `[batch, 1, 1, total]` — but the kernels are stricter than broadcasting:
//!
//! - ONNX Runtime's contrib kernels (`CheckAttentionBias` in its attention helpers) take
//!   `[batch | 1, heads | 1, q_len, total]`: dims 0 and 1 may broadcast, dims 2 and 3 must
//!   be the query length and the total key length ("Input 'attention_bias' dimension 2
//!   should be same as sequence_length, got 1").
//! - ONNX Runtime's kernel for the standard `Attention` wants `attn_mask`'s last two dims to
//!   be the query and key lengths too ("inconsistent q_sequence_length (between attn_mask
//!   and Q)"), and so does tract's (`FlashSDPA: incompatible shapes`), although the
//!   standard allows any broadcastable mask.
//!
//! So a fusion hands these operators a bias whose last two dims are proven to be `q_len`
//! and `total`; a bias that only broadcasts over the query rows (`q_len` written as 1) is
//! expanded first, once per distinct bias; anything else keeps the block unfused.

use crate::ir::Dim;

/// The one bias form every attention kernel onnxopt emits for accepts:
/// `[batch | 1, heads | 1, q_len, total]`.
#[derive(Debug)]
pub struct BiasShape<'a> {
    pub batch: &'a Dim,
    pub heads: i64,
    pub q_len: &'a Dim,
    pub total: &'a Dim,
}

/// How a bias of some shape meets the contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BiasFit {
    /// Already `[batch | 1, heads | 1, q_len, total]`.
    Fits,
    /// `[batch | 1, heads | 1, 1, total]` where `q_len` may exceed 1 (a padding mask
    /// broadcast over the query rows): expand dim 2 to `q_len` first.
    ExpandRows,
    /// Neither: why, for the report.
    Refused(String),
}

impl BiasShape<'_> {
    /// Where a bias of `dims` stands against the contract.
    pub fn fit(&self, dims: &[Dim]) -> BiasFit {
        let [b, n, rows, cols] = dims else {
            return BiasFit::Refused(format!("the bias has rank {}, not 4", dims.len()));
        };
        let is_one = |d: &Dim| d.value() == Some(1);
        if !(is_one(b) || b.same(self.batch)) {
            return BiasFit::Refused(format!(
                "bias dim 0 is {b}: not proven to be 1 or the batch {}",
                self.batch
            ));
        }
        if !(is_one(n) || n.value() == Some(self.heads)) {
            return BiasFit::Refused(format!(
                "bias dim 1 is {n}: not proven to be 1 or the {} heads",
                self.heads
            ));
        }
        if !cols.same(self.total) {
            return BiasFit::Refused(format!(
                "bias dim 3 is {cols}: not proven to be the key length {}",
                self.total
            ));
        }
        if rows.same(self.q_len) {
            BiasFit::Fits
        } else if is_one(rows) {
            BiasFit::ExpandRows
        } else {
            BiasFit::Refused(format!(
                "bias dim 2 is {rows}: not proven to be 1 or the query length {}",
                self.q_len
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_classic_padding_mask_is_expanded_over_the_query_rows() {
        let (b, s) = (Dim::symbol("batch"), Dim::symbol("sequence"));
        let shape = BiasShape {
            batch: &b,
            heads: 4,
            q_len: &s,
            total: &s,
        };
        let one = Dim::known(1);
        assert_eq!(
            shape.fit(&[b.clone(), one.clone(), one.clone(), s.clone()]),
            BiasFit::ExpandRows
        );
        assert_eq!(
            shape.fit(&[one.clone(), Dim::known(4), s.clone(), s.clone()]),
            BiasFit::Fits
        );
        // One query row (a decode step) needs no expansion.
        let decode = BiasShape {
            q_len: &one,
            ..shape
        };
        assert_eq!(
            decode.fit(&[b.clone(), one.clone(), one.clone(), s.clone()]),
            BiasFit::Fits
        );
    }

    #[test]
    fn a_bias_whose_dims_are_not_proven_is_refused_with_the_reason() {
        let (b, s) = (Dim::symbol("batch"), Dim::symbol("sequence"));
        let shape = BiasShape {
            batch: &b,
            heads: 4,
            q_len: &s,
            total: &s,
        };
        let one = Dim::known(1);
        let BiasFit::Refused(why) = shape.fit(&[b.clone(), one.clone(), one.clone(), Dim::Unknown])
        else {
            panic!("an unknown key length must be refused");
        };
        assert!(why.contains("dim 3"), "{why}");
        let BiasFit::Refused(why) = shape.fit(&[b.clone(), Dim::known(2), s.clone(), s.clone()])
        else {
            panic!("2 heads of 4 must be refused");
        };
        assert!(why.contains("4 heads"), "{why}");
        assert!(matches!(
            shape.fit(&[s.clone(), s.clone()]),
            BiasFit::Refused(_)
        ));
    }
}
