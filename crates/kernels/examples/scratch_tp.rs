use std::arch::x86_64::*;
use std::time::Instant;
#[target_feature(enable = "avx2,fma")]
unsafe fn madd_tp(n: usize) -> i32 {
    let mut a = [_mm256_set1_epi16(1); 8];
    let b = _mm256_set1_epi16(3);
    for _ in 0..n {
        for k in 0..8 { a[k] = _mm256_madd_epi16(a[k], b); }
    }
    let mut s = _mm256_setzero_si256();
    for k in 0..8 { s = _mm256_add_epi32(s, a[k]); }
    _mm256_extract_epi32(s, 0)
}
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_tp(n: usize) -> f32 {
    let mut a = [_mm256_set1_ps(1.0); 8];
    let b = _mm256_set1_ps(0.999);
    for _ in 0..n {
        for k in 0..8 { a[k] = _mm256_fmadd_ps(a[k], b, b); }
    }
    let mut s = _mm256_setzero_ps();
    for k in 0..8 { s = _mm256_add_ps(s, a[k]); }
    _mm256_cvtss_f32(s)
}
#[target_feature(enable = "avx2,fma")]
unsafe fn zx_tp(n: usize) -> i32 {
    let mut a = [_mm_set1_epi16(1); 8];
    let mut s = _mm256_setzero_si256();
    for _ in 0..n {
        for k in 0..8 { let w = _mm256_cvtepu8_epi16(a[k]); a[k] = _mm256_castsi256_si128(w); }
    }
    for k in 0..8 { s = _mm256_add_epi32(s, _mm256_castsi128_si256(a[k])); }
    _mm256_extract_epi32(s, 0)
}
fn main() {
    let n = 50_000_000;
    unsafe {
        for (name, f) in [("vpmaddwd ymm", madd_tp as unsafe fn(usize) -> i32), ("vpmovzxbw ymm<-xmm", zx_tp)] {
            let t = Instant::now(); let r = f(n); let dt = t.elapsed().as_secs_f64();
            println!("{name}: {:.3} ns per instr ({:.2} per cycle @2.45) {r}", dt * 1e9 / (8 * n) as f64, (8 * n) as f64 / dt / 2.45e9);
        }
        let t = Instant::now(); let r = fma_tp(n); let dt = t.elapsed().as_secs_f64();
        println!("vfmadd ymm: {:.3} ns per instr ({:.2} per cycle @2.45) {r}", dt * 1e9 / (8 * n) as f64, (8 * n) as f64 / dt / 2.45e9);
    }
}
