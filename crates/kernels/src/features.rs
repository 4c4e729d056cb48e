//! Run-time CPU feature detection, done once and cached.
//!
//! Binaries are built for baseline x86-64 (no `target-cpu=native`); the SIMD kernels are
//! `#[target_feature]` functions that may only be called after [`cpu_level`] has confirmed the
//! instruction sets they enable.
use std::sync::OnceLock;

/// The SIMD instruction sets a kernel may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// Portable Rust, no intrinsics.
    Scalar,
    /// AVX2 + FMA + F16C (x86-64).
    Avx2,
    /// AVX-512F/BW (x86-64), on top of everything [`SimdLevel::Avx2`] needs.
    Avx512,
}

/// The best level this CPU supports, capped by `MOESTREAM_SIMD=scalar|avx2|avx512` when set.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = cpu_level();
        match std::env::var("MOESTREAM_SIMD").ok().as_deref() {
            Some("scalar") => SimdLevel::Scalar,
            Some("avx2") => best.min(SimdLevel::Avx2),
            _ => best,
        }
    })
}

/// The best level this CPU supports, ignoring `MOESTREAM_SIMD`. Every kernel of a level needs all
/// the features checked here: a result of [`SimdLevel::Avx512`] implies the AVX2 set as well.
pub fn cpu_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if avx2 && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
            return SimdLevel::Avx512;
        }
        if avx2 {
            return SimdLevel::Avx2;
        }
    }
    SimdLevel::Scalar
}
