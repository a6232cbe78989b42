//! SplitMix64 and Box-Muller: deterministic random inputs without a dependency.
//!
//! The same generator `materialize.py` (the corpus skeletons) specifies, so the benchmark
//! can rebuild the full-size corpus weights in Rust bit for bit.

/// Output `k` (1-based) of SplitMix64 seeded with `seed`.
pub fn splitmix64(seed: u64, k: u64) -> u64 {
    let mut x = seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Uniform in the open interval (0, 1), from output `k`.
pub fn uniform(seed: u64, k: u64) -> f64 {
    ((splitmix64(seed, k) >> 11) as f64 + 0.5) / 9007199254740992.0
}

/// Standard normal value number `i` (0-based) of the stream `seed`, by Box-Muller over the
/// uniform outputs 2i+1 and 2i+2.
pub fn normal(seed: u64, i: u64) -> f64 {
    let u1 = uniform(seed, 2 * i + 1);
    let u2 = uniform(seed, 2 * i + 2);
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_the_reference_sequence() {
        // First outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        assert_eq!(splitmix64(0, 1), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(0, 2), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn normals_look_normal() {
        let n = 20_000;
        let v: Vec<f64> = (0..n).map(|i| normal(7, i)).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }
}
