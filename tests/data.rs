//! Dataset readers and views on the real files.

use lopper::data::{self, Split};

#[test]
fn digits_are_embedded_and_split() {
    let tr = data::load("digits", Split::Train, None).unwrap();
    let te = data::load("digits", Split::Test, None).unwrap();
    assert_eq!(tr.len() + te.len(), 1797);
    assert_eq!(te.len(), 360);
    assert_eq!(tr.shape, [1, 8, 8]);
    assert_eq!(tr.max_value, 16.0);
    assert!(tr.pixels(0).iter().all(|&p| p <= 16));
}

#[test]
fn mnist_and_fashion_mnist_have_the_published_sizes() {
    for name in ["mnist", "fashion-mnist"] {
        let tr = data::load(name, Split::Train, None).unwrap();
        let te = data::load(name, Split::Test, None).unwrap();
        assert_eq!((tr.len(), te.len()), (60_000, 10_000), "{name}");
        assert_eq!(tr.num_classes, 10);
        let counts = (0..te.len()).fold(vec![0; 10], |mut c, i| {
            c[te.label(i) as usize] += 1;
            c
        });
        assert!(counts.iter().all(|&c| c > 800), "{name} {counts:?}");
    }
}

#[test]
fn class_and_sample_subsets_relabel_and_sample_without_replacement() {
    let te = data::load("mnist", Split::Test, None).unwrap();
    let sub = te.class_subset(&[7, 3]).unwrap();
    assert_eq!(sub.num_classes, 2);
    let n7 = (0..te.len()).filter(|&i| te.label(i) == 7).count();
    let n3 = (0..te.len()).filter(|&i| te.label(i) == 3).count();
    assert_eq!(sub.len(), n7 + n3);
    assert!((0..sub.len()).all(|i| sub.label(i) < 2));
    assert_eq!((0..sub.len()).filter(|&i| sub.label(i) == 0).count(), n7);
    // A class subset of a class subset composes.
    let only3 = sub.class_subset(&[1]).unwrap();
    assert_eq!(only3.len(), n3);
    assert!((0..only3.len()).all(|i| only3.label(i) == 0));
    let s = te.sample(1000, 5).unwrap();
    assert_eq!(s.len(), 1000);
    assert_eq!(
        te.sample(1000, 5).unwrap().pixels(17),
        s.pixels(17),
        "seeded"
    );
    let e = te.sample(20_000, 0).unwrap_err().to_string();
    assert!(e.contains("20000") && e.contains("10000"), "{e}");
    assert!(te.class_subset(&[10]).is_err());
}

#[test]
fn batches_are_normalised_and_augmentation_keeps_shape() {
    use lopper::data::Augment;
    use rand::SeedableRng;
    let te = data::load("mnist", Split::Test, None).unwrap();
    let (x, y) = te
        .batch(&[0, 1, 2], None, &candle_core::Device::Cpu)
        .unwrap();
    let x = x.into_images().unwrap();
    assert_eq!(x.dims(), &[3, 1, 28, 28]);
    assert_eq!(
        y.to_vec1::<u32>().unwrap(),
        vec![te.label(0) as u32, te.label(1) as u32, te.label(2) as u32]
    );
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let bg = -0.1307 / 0.3081;
    assert!(
        v.iter().any(|&p| (p - bg).abs() < 1e-5),
        "background pixels map to -mean/std"
    );
    let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
    let aug = Augment::cifar();
    let (xa, _) = te
        .batch(
            &[0, 1, 2],
            Some((&aug, &mut rng)),
            &candle_core::Device::Cpu,
        )
        .unwrap();
    assert_eq!(xa.into_images().unwrap().dims(), x.dims());
}

#[test]
fn cifar10_jpeg_test_split_decodes_with_expected_statistics() {
    let te = data::load("cifar10", Split::Test, None).unwrap();
    assert_eq!(te.len(), 10_000);
    assert_eq!(te.shape, [3, 32, 32]);
    assert_eq!(te.classes[0], "airplane");
    assert_eq!(te.classes[9], "truck");
    let counts = (0..te.len()).fold(vec![0; 10], |mut c, i| {
        c[te.label(i) as usize] += 1;
        c
    });
    assert!(counts.iter().all(|&c| c == 1000), "{counts:?}");
    let (mean, std) = te.channel_stats();
    // The shared/data README's train-set figures; the test split is close to them.
    for (m, want) in mean.iter().zip([0.4913, 0.4821, 0.4465]) {
        assert!((m - want).abs() < 0.01, "mean {mean:?}");
    }
    for (s, want) in std.iter().zip([0.2452, 0.2428, 0.2606]) {
        assert!((s - want).abs() < 0.01, "std {std:?}");
    }
}

/// A JPEG of `h × w` pixels, each `f(y, x)`.
fn jpeg(h: usize, w: usize, f: impl Fn(usize, usize) -> [u8; 3]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            rgb.extend(f(y, x));
        }
    }
    let mut out = Vec::new();
    let enc = jpeg_encoder::Encoder::new(&mut out, 95);
    enc.encode(&rgb, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    out
}

/// Photos come in many sizes: a folder of them loads at one square size (shorter side
/// resized to the smallest in the set, centre crop), colours and layout kept.
#[test]
fn image_folders_of_mixed_sizes_load_at_one_size() {
    let d = std::env::temp_dir().join(format!("lopper-mixed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let red = [200, 30, 30];
    let blue = [30, 30, 200];
    let imgs: Vec<(&str, Vec<u8>)> = vec![
        ("a", jpeg(40, 60, |_, _| red)),
        // Left half red, right half blue, wide.
        ("a", jpeg(30, 90, |_, x| if x < 45 { red } else { blue })),
        ("b", jpeg(80, 50, |_, _| blue)),
        ("b", jpeg(36, 36, |_, _| blue)),
    ];
    for split in ["train", "test"] {
        for (i, (c, b)) in imgs.iter().enumerate() {
            let dir = d.join(split).join(c);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{i}.jpg")), b).unwrap();
        }
    }
    let tr = data::load(d.to_str().unwrap(), Split::Train, None).unwrap();
    assert_eq!(tr.shape, [3, 30, 30], "the smallest shorter side is 30");
    assert_eq!(tr.len(), 4);
    let px = |i: usize, c: usize, y: usize, x: usize| tr.pixels(i)[(c * 30 + y) * 30 + x] as i32;
    let near = |v: i32, want: u8| (v - want as i32).abs() <= 6;
    // Images are sorted by class, then name: 0.jpg (red), 1.jpg (split), 2.jpg, 3.jpg (blue).
    assert!(near(px(0, 0, 15, 15), red[0]) && near(px(0, 2, 15, 15), red[2]));
    // The 30×90 image keeps its 30×30 centre: columns 30..60, red left of 45, blue right.
    assert!(near(px(1, 0, 15, 5), red[0]), "{}", px(1, 0, 15, 5));
    assert!(near(px(1, 2, 15, 25), blue[2]), "{}", px(1, 2, 15, 25));
    assert!(near(px(2, 2, 15, 15), blue[2]) && near(px(3, 2, 0, 0), blue[2]));
    let _ = std::fs::remove_dir_all(&d);
}
