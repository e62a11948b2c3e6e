use lopper::kernels::gemm::{sgemm, Mat};
use std::time::Instant;
fn main() {
    let shapes = [
        (64usize, 3136usize, 576usize),
        (128, 784, 1152),
        (256, 196, 2304),
        (512, 49, 4608),
        (96, 3136, 16),
        (24, 3136, 96),
        (144, 784, 24),
        (1152, 49, 192),
        (16, 1024, 144),
        (64, 64, 576),
    ];
    for (m, n, k) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let reps = (2e9 / (2.0 * (m * n * k) as f64)).max(3.0) as usize;
        sgemm(
            m,
            n,
            k,
            &mut c,
            Mat::rm(&a, k),
            Mat::rm(&b, n),
            false,
            false,
        );
        let t = Instant::now();
        for _ in 0..reps {
            sgemm(
                m,
                n,
                k,
                &mut c,
                Mat::rm(&a, k),
                Mat::rm(&b, n),
                false,
                false,
            );
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{m}x{n}x{k}: {:.1} GFLOP/s",
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
}
