//! The Set Transformer blocks (Lee et al. 2019; official `modules.py`, spec §2.1): MAB,
//! SAB, ISAB, PMA, on candle tensors `[B, n, d]`, and the set encoder STAMP reads a target
//! sample set with: `PMA_1(SAB(SAB(X)))` → one dataset embedding per set. Permutation
//! invariant by construction (attention pools over the set; no positional input).
//! As in the official code: attention scaled by `√dim_V` (not per head), residual on the
//! projected query, no layer norm by default.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear, Linear, Module, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// Multihead attention block `MAB(Q, K)`.
pub struct Mab {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    dim_v: usize,
    heads: usize,
}

impl Mab {
    pub fn new(
        dim_q: usize,
        dim_k: usize,
        dim_v: usize,
        heads: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if heads == 0 || !dim_v.is_multiple_of(heads) {
            bail!("MAB: width {dim_v} is not divisible by {heads} heads");
        }
        Ok(Mab {
            q: linear(dim_q, dim_v, vb.pp("q"))?,
            k: linear(dim_k, dim_v, vb.pp("k"))?,
            v: linear(dim_k, dim_v, vb.pp("v"))?,
            o: linear(dim_v, dim_v, vb.pp("o"))?,
            dim_v,
            heads,
        })
    }

    pub fn forward(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let qp = self.q.forward(q)?;
        let kp = self.k.forward(k)?;
        let vp = self.v.forward(k)?;
        let hw = self.dim_v / self.heads;
        let scale = 1.0 / (self.dim_v as f64).sqrt();
        let mut outs = Vec::with_capacity(self.heads);
        for h in 0..self.heads {
            let (qh, kh, vh) = (
                qp.narrow(D::Minus1, h * hw, hw)?.contiguous()?,
                kp.narrow(D::Minus1, h * hw, hw)?.contiguous()?,
                vp.narrow(D::Minus1, h * hw, hw)?.contiguous()?,
            );
            let att = (qh.matmul(&kh.transpose(1, 2)?.contiguous()?)? * scale)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?;
            outs.push((&qh + att.matmul(&vh)?)?);
        }
        let o = Tensor::cat(&outs, D::Minus1)?;
        Ok((&o + self.o.forward(&o)?.relu()?)?)
    }
}

/// `SAB(X) = MAB(X, X)`: permutation-equivariant.
pub struct Sab(pub Mab);

impl Sab {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x, x)
    }
}

/// `ISAB_m(X) = MAB(X, MAB(I, X))` with `m` learnable inducing points: O(n·m).
pub struct Isab {
    inducing: Tensor,
    m0: Mab,
    m1: Mab,
}

impl Isab {
    pub fn new(dim_in: usize, dim: usize, heads: usize, m: usize, vb: VarBuilder) -> Result<Self> {
        let b = (6.0 / (m + dim) as f64).sqrt();
        let inducing = vb.get_with_hints(
            (1, m, dim),
            "inducing",
            candle_nn::Init::Uniform { lo: -b, up: b },
        )?;
        Ok(Isab {
            inducing,
            m0: Mab::new(dim, dim_in, dim, heads, vb.pp("mab0"))?,
            m1: Mab::new(dim_in, dim, dim, heads, vb.pp("mab1"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let i = self.inducing.broadcast_as((
            x.dim(0)?,
            self.inducing.dim(1)?,
            self.inducing.dim(2)?,
        ))?;
        let h = self.m0.forward(&i.contiguous()?, x)?;
        self.m1.forward(x, &h)
    }
}

/// `PMA_k(Z) = MAB(S, Z)` with `k` learnable seeds: permutation-invariant pooling.
pub struct Pma {
    seeds: Tensor,
    mab: Mab,
}

impl Pma {
    pub fn new(dim: usize, heads: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        let b = (6.0 / (k + dim) as f64).sqrt();
        let seeds = vb.get_with_hints(
            (1, k, dim),
            "seeds",
            candle_nn::Init::Uniform { lo: -b, up: b },
        )?;
        Ok(Pma {
            seeds,
            mab: Mab::new(dim, dim, dim, heads, vb.pp("mab"))?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let s = self
            .seeds
            .broadcast_as((z.dim(0)?, self.seeds.dim(1)?, self.seeds.dim(2)?))?;
        self.mab.forward(&s.contiguous()?, z)
    }
}

/// The dataset encoder: `[B, n, d_in]` sample features → `[B, dim]` embeddings.
pub struct SetEncoder {
    pub sab1: Sab,
    pub sab2: Sab,
    pub pma: Pma,
    pub dim_in: usize,
    pub dim: usize,
}

impl SetEncoder {
    pub fn new(dim_in: usize, dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(SetEncoder {
            sab1: Sab(Mab::new(dim_in, dim_in, dim, heads, vb.pp("sab1"))?),
            sab2: Sab(Mab::new(dim, dim, dim, heads, vb.pp("sab2"))?),
            pma: Pma::new(dim, heads, 1, vb.pp("pma"))?,
            dim_in,
            dim,
        })
    }

    /// A fresh encoder with its own parameters (returned in the map).
    pub fn init(dim_in: usize, dim: usize, heads: usize, seed: u64) -> Result<(Self, VarMap)> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let enc = SetEncoder::new(dim_in, dim, heads, vb)?;
        // candle's CPU generator cannot be seeded: re-draw every parameter from a seeded
        // generator, U(±1/√fan_in) (PyTorch's Linear default; fan_in = the last axis).
        let data = vm
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("parameter map poisoned"))?;
        let mut keys: Vec<&String> = data.keys().collect();
        keys.sort();
        let mut rng = Pcg64::seed_from_u64(seed);
        for k in keys {
            let v = &data[k];
            let fan = *v.dims().last().unwrap_or(&1) as f64;
            let b = 1.0 / fan.max(1.0).sqrt();
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.gen_range(-b..b) as f32)
                .collect();
            v.set(&Tensor::from_vec(vals, v.dims(), &dev)?)?;
        }
        drop(data);
        Ok((enc, vm))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 3 || x.dim(2)? != self.dim_in {
            bail!(
                "set encoder expects [sets, samples, {}] features, got {:?}",
                self.dim_in,
                x.dims()
            );
        }
        if x.dim(1)? == 0 {
            bail!("set encoder got an empty sample set");
        }
        let h = self.sab2.forward(&self.sab1.forward(x)?)?;
        Ok(self.pma.forward(&h)?.squeeze(1)?)
    }
}
