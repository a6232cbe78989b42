//! Which weights to zero: the selection rules of magnitude and N:M pruning, on plain slices.
//!
//! Every rule is deterministic: among weights of equal magnitude, the one met first (lower
//! tensor, then lower flat index) is pruned first, so the same file always gives the same
//! output.

use std::cmp::Ordering;

/// A pruning mask: `true` where the weight is zeroed.
pub type Mask = Vec<bool>;

/// Zeros the `round(sparsity · n)` smallest-magnitude weights of all `tensors` together
/// (`n` = their total length). One tensor alone is per-layer pruning; several is global.
/// Weights already zero count as pruned (they are the smallest); NaN is never pruned.
pub fn smallest_magnitudes(tensors: &[&[f32]], sparsity: f64) -> Vec<Mask> {
    let total: usize = tensors.iter().map(|t| t.len()).sum();
    let target = ((sparsity.clamp(0.0, 1.0) * total as f64).round() as usize).min(total);
    let mut masks: Vec<Mask> = tensors.iter().map(|t| vec![false; t.len()]).collect();
    if target == 0 {
        return masks;
    }
    // The target-th smallest magnitude is the threshold: everything below it goes, and the
    // first weights equal to it make up the count.
    let mut magnitudes: Vec<f32> = tensors
        .iter()
        .flat_map(|t| t.iter().map(|w| w.abs()))
        .collect();
    let (_, &mut threshold, _) = magnitudes.select_nth_unstable_by(target - 1, f32::total_cmp);
    drop(magnitudes);
    let below: usize = tensors
        .iter()
        .flat_map(|t| t.iter())
        .filter(|w| w.abs().total_cmp(&threshold) == Ordering::Less)
        .count();
    let mut ties_left = target - below;
    for (t, mask) in tensors.iter().zip(&mut masks) {
        for (w, m) in t.iter().zip(mask.iter_mut()) {
            match w.abs().total_cmp(&threshold) {
                Ordering::Less => *m = true,
                Ordering::Equal if ties_left > 0 => {
                    *m = true;
                    ties_left -= 1;
                }
                _ => {}
            }
        }
    }
    masks
}

/// The layout of a weight seen along one axis: `outer` blocks, each of `len` steps of
/// `stride` elements. Element `(o, k, i)` is at `(o · len + k) · stride + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisLayout {
    pub outer: usize,
    pub len: usize,
    pub stride: usize,
}

impl AxisLayout {
    pub fn new(dims: &[usize], axis: usize) -> AxisLayout {
        AxisLayout {
            outer: dims[..axis].iter().product(),
            len: dims[axis],
            stride: dims[axis + 1..].iter().product(),
        }
    }

    /// The flat indices of every line along the axis, each in axis order.
    fn lines(self) -> impl Iterator<Item = impl Iterator<Item = usize>> {
        (0..self.outer).flat_map(move |o| {
            (0..self.stride)
                .map(move |i| (0..self.len).map(move |k| (o * self.len + k) * self.stride + i))
        })
    }
}

/// N:M semi-structured pruning: in every group of `m` consecutive weights along the axis
/// `layout` describes, keeps the `n` largest magnitudes (ties: the earlier one stays) and
/// zeros the rest. The axis length must divide by `m` (the caller checks it).
pub fn n_of_m(values: &[f32], layout: AxisLayout, n: usize, m: usize) -> Mask {
    let mut mask = vec![false; values.len()];
    let mut group: Vec<usize> = Vec::with_capacity(m);
    for line in layout.lines() {
        let line: Vec<usize> = line.collect();
        for chunk in line.chunks(m) {
            group.clear();
            group.extend_from_slice(chunk);
            // Largest first; a stable sort keeps the earlier of equal magnitudes ahead.
            group.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()));
            for &i in &group[n.min(group.len())..] {
                mask[i] = true;
            }
        }
    }
    mask
}

/// True when every group of `m` consecutive weights along the axis holds at most `n`
/// non-zero values: the pattern sparse kernels (TensorRT's 2:4) accept.
pub fn has_n_of_m_pattern(values: &[f32], layout: AxisLayout, n: usize, m: usize) -> bool {
    layout.lines().all(|line| {
        let line: Vec<usize> = line.collect();
        line.chunks(m)
            .all(|g| g.iter().filter(|&&i| values[i] != 0.0).count() <= n)
    })
}

/// Zeros the masked weights in place; returns how many it zeroed that were not zero.
pub fn apply(values: &mut [f32], mask: &[bool]) -> usize {
    let mut zeroed = 0;
    for (w, &m) in values.iter_mut().zip(mask) {
        if m && *w != 0.0 {
            *w = 0.0;
            zeroed += 1;
        }
    }
    zeroed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(mask: &[bool]) -> String {
        mask.iter().map(|&m| if m { '0' } else { 'w' }).collect()
    }

    #[test]
    fn per_layer_magnitude_zeros_the_smallest_and_breaks_ties_by_position() {
        let w = [0.5, -0.1, 0.3, 0.1, -0.9, 0.1, 0.0, 2.0];
        // 8 · 0.5 = 4 to zero: 0.0, then the three of magnitude 0.1 (-0.1 first, then 0.1, 0.1).
        assert_eq!(pattern(&smallest_magnitudes(&[&w], 0.5)[0]), "w0w0w00w");
        // 8 · 0.3 = 2.4 → 2: 0.0 and the first 0.1 in position order.
        assert_eq!(pattern(&smallest_magnitudes(&[&w], 0.3)[0]), "w0wwww0w");
        assert_eq!(pattern(&smallest_magnitudes(&[&w], 0.0)[0]), "wwwwwwww");
        assert_eq!(pattern(&smallest_magnitudes(&[&w], 1.0)[0]), "00000000");
    }

    #[test]
    fn global_magnitude_ranks_all_tensors_together() {
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [0.1, 0.2, 5.0, 0.3];
        let masks = smallest_magnitudes(&[&a, &b], 0.5);
        // The 4 smallest of the 8 are 0.1, 0.2, 0.3 (all in b) and 1.0 (in a).
        assert_eq!(pattern(&masks[0]), "0www");
        assert_eq!(pattern(&masks[1]), "00w0");
        // Equal magnitudes across tensors: the earlier tensor's go first.
        let masks = smallest_magnitudes(&[&[1.0, 1.0], &[1.0, 1.0]], 0.75);
        assert_eq!(
            (pattern(&masks[0]), pattern(&masks[1])),
            ("00".into(), "0w".into())
        );
    }

    #[test]
    fn nan_weights_are_never_pruned() {
        let w = [f32::NAN, 1.0, -2.0, 3.0];
        assert_eq!(pattern(&smallest_magnitudes(&[&w], 0.75)[0]), "w000");
    }

    #[test]
    fn two_of_four_keeps_the_two_largest_of_each_group_along_the_axis() {
        // A [8, 2] MatMul weight, reduction axis 0: groups run down each column.
        #[rustfmt::skip]
        let w = [
            0.1, 4.0,
            -0.9, 3.0,
            0.3, 2.0,
            0.2, 1.0,
            0.5, 1.0,
            0.5, 1.0,
            0.5, -1.0,
            0.6, 1.0,
        ];
        let layout = AxisLayout::new(&[8, 2], 0);
        let mask = n_of_m(&w, layout, 2, 4);
        // Column 0: {0.1, -0.9, 0.3, 0.2} keeps -0.9, 0.3; {0.5, 0.5, 0.5, 0.6} keeps 0.6 and
        // the first 0.5. Column 1: keeps 4, 3; then the first two of four equal magnitudes.
        #[rustfmt::skip]
        let expected = [
            true, false,
            false, false,
            false, true,
            true, true,
            false, false,
            true, false,
            true, true,
            false, true,
        ];
        assert_eq!(mask, expected);
        let mut pruned = w;
        assert_eq!(apply(&mut pruned, &mask), 8);
        assert!(has_n_of_m_pattern(&pruned, layout, 2, 4));
        assert!(!has_n_of_m_pattern(&w, layout, 2, 4));
    }

    #[test]
    fn n_of_m_follows_the_axis_of_a_conv_weight() {
        // Conv [M=1, C=4, 1, 2]: groups of 4 input channels for each kernel position.
        let w = [1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0];
        let layout = AxisLayout::new(&[1, 4, 1, 2], 1);
        assert_eq!(
            layout,
            AxisLayout {
                outer: 1,
                len: 4,
                stride: 2
            }
        );
        // Position 0 reads 1, 2, 3, 4 (keeps 3, 4); position 1 reads 8, 7, 6, 5 (keeps 8, 7).
        assert_eq!(pattern(&n_of_m(&w, layout, 2, 4)), "0w0ww0w0");
    }
}
