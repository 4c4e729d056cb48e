use moestream_kernels::features::{ActivationPrecision, SimdLevel};
use moestream_kernels::{matmul_with_precision, FloatKind, Matrix, Weights};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bits: u32 = args[1].parse().unwrap();
    let rows: usize = args[2].parse().unwrap();
    let cols: usize = args[3].parse().unwrap();
    let prec = if args[4] == "int16" { ActivationPrecision::Int16 } else { ActivationPrecision::F32 };
    let iters: usize = args[5].parse().unwrap();
    let gs = 64;
    let packed: Vec<u8> = (0..rows * cols * bits as usize / 8).map(|i| (i * 7 + 3) as u8).collect();
    let params: Vec<u8> = (0..rows * cols / gs).flat_map(|_| half::bf16::from_f32(0.01).to_le_bytes()).collect();
    let m = Matrix { rows, cols, weights: Weights::Affine { bits, group_size: gs, packed: &packed, scales: &params, biases: &params, scale_kind: FloatKind::BF16 } };
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; rows];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t = Instant::now();
            for _ in 0..iters { matmul_with_precision(SimdLevel::Avx2, prec, &m, &x, 1, &mut y); }
            best = best.min(t.elapsed().as_secs_f64() / iters as f64);
        }
        let bytes = m.size_bytes() as f64;
        println!("{bits}-bit {rows}x{cols} {:?}: {:.1} us/call, {:.2} GB/s, {:.2} cycles/32 weights @2.45GHz", prec, best * 1e6, bytes / best / 1e9, best * 2.45e9 / (rows * cols / 32) as f64);
    });
}
