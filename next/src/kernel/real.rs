//! The float types the CPU kernel runs in, with an exponential that vectorizes.

use core::ops::{Add, Div, Mul, Neg, Sub};

/// A float the CPU row kernel computes in (`f32` or `f64`).
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + bytemuck::Pod
    + burn::tensor::Element
    + 'static
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// `−∞`.
    const NEG_INFINITY: Self;
    /// NaN.
    const NAN: Self;
    /// Conversion from `f64` (rounding for `f32`).
    fn of(x: f64) -> Self;
    /// Conversion to `f64`.
    fn to_f64(self) -> f64;
    /// `e^x`, exactly `0` for `x = −∞`; branch-free so that loops over it vectorize.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Larger of two values (`self` if `other` is NaN).
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if other > self { other } else { self }
    }
    /// Is the value neither infinite nor NaN?
    fn is_finite(self) -> bool;
    /// Is this logit a class, not padding? (`self > MASKED_LOGIT`: the one padding rule of
    /// [`crate::MASKED_LOGIT`].)
    #[inline(always)]
    fn is_class(self) -> bool {
        self > Self::of(crate::vocab::MASKED_LOGIT)
    }
}

/// The members of [`Real`] that `f32` and `f64` implement alike, from their own methods.
macro_rules! real_common {
    ($t:ident) => {
        const ZERO: Self = 0.0;
        const ONE: Self = 1.0;
        const NEG_INFINITY: Self = $t::NEG_INFINITY;
        const NAN: Self = $t::NAN;
        #[inline(always)]
        fn ln(self) -> Self {
            $t::ln(self)
        }
        #[inline(always)]
        fn is_finite(self) -> bool {
            $t::is_finite(self)
        }
    };
}

impl Real for f64 {
    real_common!(f64);
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

impl Real for f32 {
    real_common!(f32);
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
}

/// `e^x` in f32 (Cephes' `expf` reduction and polynomial, ≈1 ulp), written without branches
/// or calls so that LLVM vectorizes the loops that use it.
///
/// `x < −87.34` (including `−∞`) gives exactly 0; `x > 88.38` (past the range of the
/// reduction) gives `+∞`, a slight early overflow (f32 itself overflows past 88.72), never a
/// finite value far from `e^x`; NaN propagates. The kernel only calls it with `x ≤ 0`.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MIN: f32 = -87.336_55;
    const MAX: f32 = 88.376_26;
    // Round to nearest by the 1.5·2^23 trick (vectorizes, unlike `f32::round`).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(MIN, MAX);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let poly = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = poly * r2 + r + 1.0;
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    if x < MIN {
        0.0
    } else if x > MAX {
        f32::INFINITY
    } else {
        y * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate_and_exact_at_the_edges() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - e).abs() / e);
            x += 0.001_7;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
