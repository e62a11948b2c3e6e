//! Training-time augmentation on normalised images: random crop with zero padding (zero
//! = the mean colour after normalisation) and horizontal flip.

use rand::Rng;
use rand_pcg::Pcg64;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Augment {
    /// Pad by this many pixels, then crop back at a random offset (0 = off).
    pub crop_pad: usize,
    /// Flip left-right with probability 1/2.
    pub hflip: bool,
}

impl Augment {
    /// The standard CIFAR recipe: pad 4 + random crop, horizontal flip.
    pub fn cifar() -> Self {
        Augment {
            crop_pad: 4,
            hflip: true,
        }
    }

    /// The argument [`crate::data::Dataset::batch`] takes: `None` when this augmentation is
    /// a no-op (so no random numbers are drawn), else `self` with the generator.
    pub fn with_rng<'a>(&'a self, rng: &'a mut Pcg64) -> Option<(&'a Augment, &'a mut Pcg64)> {
        (*self != Augment::default()).then_some((self, rng))
    }

    /// Augments one `[C, H, W]` image in place.
    pub fn apply(&self, img: &mut [f32], shape: [usize; 3], rng: &mut Pcg64) {
        let [c, h, w] = shape;
        if self.crop_pad > 0 {
            let p = self.crop_pad as isize;
            let dy = rng.gen_range(-p..=p);
            let dx = rng.gen_range(-p..=p);
            if dy != 0 || dx != 0 {
                let src = img.to_vec();
                for ch in 0..c {
                    for y in 0..h {
                        for x in 0..w {
                            let sy = y as isize + dy;
                            let sx = x as isize + dx;
                            img[(ch * h + y) * w + x] =
                                if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                                    src[(ch * h + sy as usize) * w + sx as usize]
                                } else {
                                    0.0
                                };
                        }
                    }
                }
            }
        }
        if self.hflip && rng.gen::<bool>() {
            for row in img.chunks_mut(w) {
                row.reverse();
            }
        }
    }
}
