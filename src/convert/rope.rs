//! RoPE's inverse frequencies, one per pair of a head's dimensions, computed in f32 in the
//! order transformers computes them (`modeling_rope_utils.py`), so that a converted model's
//! rotation angles are transformers' to the last bit or close to it.

/// How a model rescales RoPE's frequencies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `1 / theta^(2i / head_dim)`.
    None,
    /// Llama 3.1's `rope_type: llama3`: low frequencies divided by `factor`, high ones kept,
    /// a smooth blend in between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original_max_positions / low_freq_factor` are divided.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_positions / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The context length the model was pre-trained with.
        original_max_positions: f32,
    },
    /// Every frequency divided by `factor` (transformers' `rope_type: linear`).
    Linear {
        /// Divisor of every frequency.
        factor: f32,
    },
    /// Each frequency divided by the checkpoint's own factor for its pair: llama.cpp's
    /// `rope_freqs.weight`, which its converter writes for `llama3` scaling.
    FreqFactors,
}

/// `1 / theta^(2i / head_dim)` for `i` in `0..head_dim / 2`.
pub fn default_inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// transformers' `llama3` rescaling of `inv_freq`. PyTorch evaluates `scalar / tensor` as
/// `tensor.reciprocal() * scalar`, so the wavelengths are computed that way here too.
pub fn llama3_inv_freq(
    inv_freq: &[f32],
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max_positions: f32,
) -> Vec<f32> {
    let low_freq_wavelen = original_max_positions / low_freq_factor;
    let high_freq_wavelen = original_max_positions / high_freq_factor;
    let two_pi = std::f64::consts::TAU as f32;
    inv_freq
        .iter()
        .map(|&f| {
            let wavelen = (1.0 / f) * two_pi;
            if wavelen < high_freq_wavelen {
                return f;
            }
            if wavelen > low_freq_wavelen {
                return f / factor;
            }
            let smooth = ((1.0 / wavelen) * original_max_positions - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            (1.0 - smooth) * f / factor + smooth * f
        })
        .collect()
}

/// Each of `inv_freq` divided by its pair's factor (llama.cpp's `rope_freqs.weight`).
pub fn divided_inv_freq(inv_freq: &[f32], factors: &[f32]) -> Vec<f32> {
    inv_freq.iter().zip(factors).map(|(f, d)| f / d).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_fall_from_one() {
        let f = default_inv_freq(10_000.0, 4);
        assert_eq!(f, vec![1.0, 0.01]);
    }

    /// Llama-3.2-1B's scaling (factor 32, low 1, high 4, 8192 original positions) on its
    /// 64-wide heads, theta 500 000: the three bands.
    #[test]
    fn llama3_keeps_high_divides_low_and_blends_between() {
        let base = default_inv_freq(500_000.0, 64);
        let scaled = llama3_inv_freq(&base, 32.0, 1.0, 4.0, 8192.0);
        let wavelen = |f: f32| std::f32::consts::TAU / f;
        let (mut kept, mut divided, mut blended) = (0, 0, 0);
        for (&f, &s) in base.iter().zip(&scaled) {
            if wavelen(f) < 2048.0 {
                assert_eq!(s, f);
                kept += 1;
            } else if wavelen(f) > 8192.0 {
                assert_eq!(s, f / 32.0);
                divided += 1;
            } else {
                assert!(
                    s < f && s > f / 32.0,
                    "{s} not between {f} and {}",
                    f / 32.0
                );
                blended += 1;
            }
        }
        assert_eq!((kept, divided, blended), (15, 14, 3));
    }

    /// llama.cpp's converter stores the llama3 rescaling as per-pair divisors; dividing by
    /// them gives transformers' frequencies back to within rounding.
    #[test]
    fn llama3_as_divisors_agrees_with_llama3() {
        let base = default_inv_freq(500_000.0, 64);
        let scaled = llama3_inv_freq(&base, 32.0, 1.0, 4.0, 8192.0);
        let divisors: Vec<f32> = base.iter().zip(&scaled).map(|(b, s)| b / s).collect();
        for (d, s) in divided_inv_freq(&base, &divisors).iter().zip(&scaled) {
            assert!((d - s).abs() <= s * 2e-7, "{d} vs {s}");
        }
    }
}
