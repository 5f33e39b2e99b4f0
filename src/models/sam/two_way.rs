//! SAM's two-way transformer (official keys `mask_decoder.transformer.*`), the decoder's
//! attention between the prompt tokens (T, about 7) and the image tokens (N = 64 x 64).
//!
//! The official code projects all N image tokens to keys, values or queries in every
//! cross-attention (four `[N, C] x [C, C/2]` products per layer). With few prompt tokens the
//! products are reassociated so that the image side is multiplied by token-sized matrices
//! instead (exact algebra, different rounding):
//! - tokens -> image: `softmax(q Wk (x + pe)^T) (x Wv^T)` = `softmax((q_h Wk_h)(x + pe)^T) x Wv_h^T`
//!   per head h: scores are `[N, C] x [C, H T]`, and the softmax weights average the raw rows
//!   of `x` before `Wv` (`[H T, N] x [N, C]`);
//! - image -> tokens: `softmax(((x + pe) Wq^T) k_h^T) v_h Wo_h^T` = `softmax((x + pe)(Wq_h^T k_h))
//!   (v_h Wo_h^T)`: `[N, C] x [C, H T]` scores and `[N, H T] x [H T, C]` output, instead of the
//!   query and output projections of all N rows.
//!
//! Heads are the batch dimension of the small products (`[H, B T, d]`). On the CPU the image side
//! of both runs as one fused pass per band of image rows: [`super::tokens_to_image`] (an online
//! softmax over the bands) and [`super::image_to_tokens`] (with the residual, `norm4` and the
//! next `+ pe`); other devices compose candle ops, and a test compares the two.
//! `tests/it/sam_parity.rs` checks the decoder against the official PyTorch outputs.
use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::image_to_tokens::ImageToTokens;
use super::linear::TokenLinear as Linear;
use super::tokens_to_image::TokensToImage;

/// The official `Attention` (`q_proj`, `k_proj`, `v_proj`, `out_proj`; the internal width is
/// `C / downsample_rate`), with per-head views of its weights derived at load.
#[derive(Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    /// `q_proj.weight` per head: `[H, d, C]`.
    wq_heads: Tensor,
    /// `k_proj.weight` per head: `[H, d, C]`.
    wk_heads: Tensor,
    /// `v_proj.weight` per head, transposed: `[H, C, d]`.
    wv_heads_t: Tensor,
    /// `out_proj.weight` per head, transposed: `[H, d, C]`.
    wo_heads_t: Tensor,
    /// `q_proj.bias` per head: `[H, d, 1]` (`k_proj.bias` cancels in the softmax over the
    /// image rows).
    bq_heads: Tensor,
}

impl Attention {
    fn new(dim: usize, num_heads: usize, downsample_rate: usize, vb: VarBuilder) -> Result<Self> {
        let internal = dim / downsample_rate;
        let d = internal / num_heads;
        let lin = |name: &str, i: usize, o: usize| Linear::new(i, o, vb.pp(name));
        let q_proj = lin("q_proj", dim, internal)?;
        let k_proj = lin("k_proj", dim, internal)?;
        let v_proj = lin("v_proj", dim, internal)?;
        let out_proj = lin("out_proj", internal, dim)?;
        let heads = |w: &Tensor| w.reshape((num_heads, d, dim))?.contiguous(); // [D, C] -> [H, d, C]
        let bias = |l: &Linear| l.bias().reshape((num_heads, d, 1));
        Ok(Self {
            wq_heads: heads(q_proj.weight())?,
            wk_heads: heads(k_proj.weight())?,
            wv_heads_t: heads(v_proj.weight())?.transpose(1, 2)?.contiguous()?,
            // out_proj.weight [C, D] -> [D, C] -> [H, d, C]
            wo_heads_t: heads(&out_proj.weight().t()?.contiguous()?)?,
            bq_heads: bias(&q_proj)?,
            q_proj,
            k_proj,
            v_proj,
            out_proj,
            num_heads,
        })
    }

    fn head_dim(&self) -> usize {
        self.wq_heads.dims()[1]
    }

    /// `[B, T, D]` -> `[H, B T, d]`
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        x.reshape((b * t, self.num_heads, c / self.num_heads))?
            .transpose(0, 1)?
            .contiguous()
    }

    /// `[H, B T, X]` -> `[B, H T, X]`
    fn heads_to_batch(&self, x: &Tensor, b: usize) -> Result<Tensor> {
        let (h, bt, c) = x.dims3()?;
        let t = bt / b;
        x.reshape((h, b, t, c))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((b, h * t, c))
    }

    /// The official attention among a few tokens: q, k, v `[B, T, C]` -> `[B, T, C]`.
    fn forward_tokens(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let scale = 1.0 / (self.head_dim() as f64).sqrt();
        let q = self.split_heads(&self.q_proj.forward(q)?)?; // [H, BT, d]
        let k = self.split_heads(&self.k_proj.forward(k)?)?;
        let v = self.split_heads(&self.v_proj.forward(v)?)?;
        let (h, _, d) = q.dims3()?;
        let q = q.reshape((h * b, t, d))?;
        let k = k.reshape((h * b, t, d))?;
        let v = v.reshape((h * b, t, d))?;
        let attn = (q.matmul(&k.t()?)? * scale)?; // [HB, T, T]
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let out = attn.matmul(&v)?.reshape((h, b * t, d))?; // [H, BT, d]
        let out = out.transpose(0, 1)?.contiguous()?.reshape((b, t, h * d))?;
        self.out_proj.forward(&out)
    }

    /// Tokens attend to the image: queries `[B, T, C]` (with their PE), image keys with PE
    /// `x_pe` and values `x`, both `[B, N, C]` -> `[B, T, C]`.
    fn tokens_to_image(&self, q: &Tensor, x_pe: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let scale = 1.0 / (self.head_dim() as f64).sqrt();
        let qh = self.split_heads(&self.q_proj.forward(q)?)?; // [H, BT, d]

        // q_h . (Wk_h x + bk_h) = (Wk_h^T q_h) . x + q_h . bk_h; the second term is the same for
        // every image row, so the softmax over the rows cancels it
        let g = (qh.matmul(&self.wk_heads)? * scale)?; // [H, BT, C]
        let g = self.heads_to_batch(&g, b)?; // [B, HT, C]
        let avg = if crate::ops::fast(x) && x.dtype() == candle_core::DType::F32 {
            let op = TokensToImage {
                g_t: g.transpose(1, 2)?.flatten_all()?.to_vec1()?,
                ht: g.dim(1)?,
            };
            x_pe.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &op)?
        } else {
            let scores = x_pe.matmul(&g.t()?)?; // [B, N, HT]
            let p = crate::ops::softmax_columns_t(&scores)?; // [B, HT, N]
            p.matmul(x)? // [B, HT, C]: attention-weighted image rows per head and token
        };
        let (_, _, cdim) = avg.dims3()?;
        let h = self.num_heads;
        let avg = avg
            .reshape((b, h, t, cdim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((h, b * t, cdim))?;
        let out = avg.matmul(&self.wv_heads_t)?; // [H, BT, d]
        let d = out.dim(2)?;
        let out = out.transpose(0, 1)?.contiguous()?.reshape((b, t, h * d))?; // [B, T, D]
        let out = out.broadcast_add(self.v_proj.bias())?; // the weights sum to one
        self.out_proj.forward(&out)
    }

    /// The token side of "the image attends to the tokens": token keys `k` (with their PE) and
    /// values `v` `[B, T, C]` -> (`m` `[B, HT, C]`, `c` `[B, HT]`, `u` `[B, HT, C]`) such that
    /// the attention of image queries with PE `x_pe` is `softmax_t(x_pe m^T + c) u` (softmax
    /// over each head's T tokens), without `out_proj.bias`.
    fn token_side(&self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = k.dims3()?;
        let h = self.num_heads;
        let scale = 1.0 / (self.head_dim() as f64).sqrt();
        let kh = self.split_heads(&self.k_proj.forward(k)?)?; // [H, BT, d]
        let vh = self.split_heads(&self.v_proj.forward(v)?)?; // [H, BT, d]

        // (Wq_h x + bq_h) . k_h = x . (Wq_h^T k_h) + bq_h . k_h
        let m = (kh.matmul(&self.wq_heads)? * scale)?; // [H, BT, C]
        let c = (kh.matmul(&self.bq_heads)? * scale)?; // [H, BT, 1]
        let m = self.heads_to_batch(&m, b)?; // [B, HT, C]
        let c = self.heads_to_batch(&c, b)?.reshape((b, h * t))?; // [B, HT]
                                                                  // the output projection of each head's values: v_h Wo_h^T
        let u = self.heads_to_batch(&vh.matmul(&self.wo_heads_t)?, b)?; // [B, HT, C]
        Ok((m, c, u))
    }

    /// The image attends to the tokens: image queries with PE `x_pe` `[B, N, C]`, token keys
    /// `k` (with their PE) and values `v` `[B, T, C]` -> `[B, N, C]`, without `out_proj.bias`
    /// (the caller adds it with the residual).
    fn image_to_tokens(&self, x_pe: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let t = k.dim(1)?;
        let (m, c, u) = self.token_side(k, v)?;
        let scores = x_pe.matmul(&m.t()?)?; // [B, N, HT]
        let p = crate::ops::softmax_groups(&scores, &c, t)?; // softmax per head over the tokens
        p.matmul(&u) // [B, N, C]
    }
}

/// The official `MLPBlock` (`lin1`, ReLU, `lin2`).
#[derive(Debug)]
struct MlpBlock {
    lin1: Linear,
    lin2: Linear,
}

impl MlpBlock {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: Linear::new(dim, hidden, vb.pp("lin1"))?,
            lin2: Linear::new(hidden, dim, vb.pp("lin2"))?,
        })
    }
}

impl Module for MlpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.lin2.forward(&self.lin1.forward(xs)?.relu()?)
    }
}

/// The official `TwoWayAttentionBlock`.
#[derive(Debug)]
struct TwoWayAttentionBlock {
    self_attn: Attention,
    norm1: LayerNorm,
    cross_attn_token_to_image: Attention,
    norm2: LayerNorm,
    mlp: MlpBlock,
    norm3: LayerNorm,
    /// `norm4.{weight, bias}`: applied with the residual by [`crate::ops::add_layer_norm`].
    norm4: (Tensor, Tensor),
    /// Host copies of `norm4.{weight, bias}` and `cross_attn_image_to_token.out_proj.bias` for
    /// the fused CPU pass ([`super::image_to_tokens`]).
    norm4_host: (Vec<f32>, Vec<f32>),
    out_bias_host: Vec<f32>,
    cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    fn new(
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        skip_first_layer_pe: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm = |name: &str| candle_nn::layer_norm(dim, 1e-5, vb.pp(name));
        let norm4 = (
            vb.pp("norm4").get(dim, "weight")?,
            vb.pp("norm4").get(dim, "bias")?,
        );
        let cross_attn_image_to_token =
            Attention::new(dim, num_heads, 2, vb.pp("cross_attn_image_to_token"))?;
        Ok(Self {
            norm4_host: (norm4.0.to_vec1()?, norm4.1.to_vec1()?),
            out_bias_host: cross_attn_image_to_token.out_proj.bias().to_vec1()?,
            self_attn: Attention::new(dim, num_heads, 1, vb.pp("self_attn"))?,
            norm1: norm("norm1")?,
            cross_attn_token_to_image: Attention::new(
                dim,
                num_heads,
                2,
                vb.pp("cross_attn_token_to_image"),
            )?,
            norm2: norm("norm2")?,
            mlp: MlpBlock::new(dim, mlp_dim, vb.pp("mlp"))?,
            norm3: norm("norm3")?,
            norm4,
            cross_attn_image_to_token,
            skip_first_layer_pe,
        })
    }

    /// queries `[B, T, C]`, keys `[B, N, C]` and `keys + key_pe`, query_pe `[B, T, C]`,
    /// key_pe `[1, N, C]` -> (queries, keys, keys + key_pe).
    fn forward(
        &self,
        queries: &Tensor,
        (keys, keys_pe): (&Tensor, &Tensor),
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward_tokens(queries, queries, queries)?
        } else {
            let q = (queries + query_pe)?;
            (queries + self.self_attn.forward_tokens(&q, &q, queries)?)?
        };
        let queries = self.norm1.forward(&queries)?;

        let q = (&queries + query_pe)?;
        let attn = self
            .cross_attn_token_to_image
            .tokens_to_image(&q, keys_pe, keys)?;
        let queries = self.norm2.forward(&(queries + attn)?)?;

        let queries = self
            .norm3
            .forward(&(&queries + self.mlp.forward(&queries)?)?)?;

        let q = (&queries + query_pe)?;
        let att = &self.cross_attn_image_to_token;
        if crate::ops::fast(keys) && keys.dtype() == candle_core::DType::F32 {
            let t = q.dim(1)?;
            let (m, c, u) = att.token_side(&q, &queries)?;
            let op = ImageToTokens {
                m_t: m.transpose(1, 2)?.flatten_all()?.to_vec1()?,
                c: c.flatten_all()?.to_vec1()?,
                u: u.flatten_all()?.to_vec1()?,
                t,
                out_bias: &self.out_bias_host,
                ln_w: &self.norm4_host.0,
                ln_b: &self.norm4_host.1,
                eps: 1e-5,
            };
            let both = keys_pe.contiguous()?.apply_op3_no_bwd(
                &keys.contiguous()?,
                &key_pe.contiguous()?,
                &op,
            )?; // [2, B, N, C]
            return Ok((queries, both.get(0)?, both.get(1)?));
        }
        let attn = att.image_to_tokens(keys_pe, &q, &queries)?;
        let keys = crate::ops::add_layer_norm(
            keys,
            &attn,
            att.out_proj.bias(),
            &self.norm4.0,
            &self.norm4.1,
            1e-5,
        )?;
        let keys_pe = add_pe(&keys, key_pe)?;
        Ok((queries, keys, keys_pe))
    }
}

/// `keys + key_pe`: `[B, N, C]` + `[1, N, C]` (a plain add for one prompt).
fn add_pe(keys: &Tensor, key_pe: &Tensor) -> Result<Tensor> {
    if keys.dim(0)? == 1 {
        keys + key_pe
    } else {
        keys.broadcast_add(key_pe)
    }
}

/// The official `TwoWayTransformer`.
#[derive(Debug)]
pub struct TwoWayTransformer {
    layers: Vec<TwoWayAttentionBlock>,
    final_attn_token_to_image: Attention,
    norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    pub fn new(
        depth: usize,
        dim: usize,
        num_heads: usize,
        mlp_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layers = (0..depth)
            .map(|i| {
                TwoWayAttentionBlock::new(dim, num_heads, mlp_dim, i == 0, vb.pp("layers").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            final_attn_token_to_image: Attention::new(
                dim,
                num_heads,
                2,
                vb.pp("final_attn_token_to_image"),
            )?,
            norm_final_attn: candle_nn::layer_norm(dim, 1e-5, vb.pp("norm_final_attn"))?,
        })
    }

    /// Image tokens `[B, N, C]`, their PE `[1, N, C]` (channels last) and, where the caller
    /// has it, their sum; prompt tokens `[B, T, C]` -> (tokens `[B, T, C]`, image tokens
    /// `[B, N, C]`).
    pub fn forward(
        &self,
        image: &Tensor,
        image_pe: &Tensor,
        image_with_pe: Option<&Tensor>,
        tokens: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let mut queries = tokens.clone();
        let mut keys = image.clone();
        let mut keys_pe = match image_with_pe {
            Some(x) => x.clone(),
            None => add_pe(image, image_pe)?,
        };
        for layer in &self.layers {
            (queries, keys, keys_pe) =
                layer.forward(&queries, (&keys, &keys_pe), tokens, image_pe)?;
        }
        let q = (&queries + tokens)?;
        let attn = self
            .final_attn_token_to_image
            .tokens_to_image(&q, &keys_pe, &keys)?;
        let queries = self.norm_final_attn.forward(&(queries + attn)?)?;
        Ok((queries, keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::max_abs_diff;
    use candle_core::{DType, Device};

    /// The official attention, written as the PyTorch code does it (projections of every row).
    fn reference(att: &Attention, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let sep = |x: &Tensor| -> Result<Tensor> {
            let (b, n, c) = x.dims3()?;
            x.reshape((b, n, att.num_heads, c / att.num_heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = sep(&att.q_proj.forward(q)?)?;
        let k = sep(&att.k_proj.forward(k)?)?;
        let v = sep(&att.v_proj.forward(v)?)?;
        let d = q.dim(3)?;
        let a = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let a = candle_nn::ops::softmax_last_dim(&a)?;
        let out = a.matmul(&v)?; // [B, H, n, d]
        let (b, h, n, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, n, h * d))?;
        att.out_proj.forward(&out)
    }

    /// Every variable random, std 1/sqrt(fan in), biases and norms included (the builder leaves
    /// what it reads with `get` at zero; the reassociated forms carry the biases differently).
    fn randomize(varmap: &candle_nn::VarMap) {
        for var in varmap.data().lock().unwrap().values() {
            let fan_in = var.dims().iter().skip(1).product::<usize>().max(1);
            let std = (1.0 / fan_in as f32).sqrt();
            var.set(&Tensor::randn(0f32, std, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    fn random_attention(dim: usize, heads: usize, rate: usize) -> Attention {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        Attention::new(dim, heads, rate, vb).unwrap();
        randomize(&varmap);
        let tensors = crate::models::plain_tensors(&varmap);
        Attention::new(
            dim,
            heads,
            rate,
            VarBuilder::from_tensors(tensors, DType::F32, &dev),
        )
        .unwrap()
    }

    #[test]
    fn reassociated_cross_attention_equals_the_official_form() {
        let dev = Device::Cpu;
        let att = random_attention(32, 4, 2);
        let (b, t, n) = (2, 5, 48);
        let tok = Tensor::randn(0f32, 1f32, (b, t, 32), &dev).unwrap();
        let tok_pe = Tensor::randn(0f32, 1f32, (b, t, 32), &dev).unwrap();
        let x = Tensor::randn(0f32, 1f32, (b, n, 32), &dev).unwrap();
        let x_pe = Tensor::randn(0f32, 1f32, (b, n, 32), &dev).unwrap();

        let got = att.tokens_to_image(&tok_pe, &x_pe, &x).unwrap();
        let want = reference(&att, &tok_pe, &x_pe, &x).unwrap();
        assert_eq!(got.dims(), &[b, t, 32]);
        assert!(
            max_abs_diff(&got, &want) < 1e-5,
            "{}",
            max_abs_diff(&got, &want)
        );

        let got = att
            .image_to_tokens(&x_pe, &tok_pe, &tok)
            .unwrap()
            .broadcast_add(att.out_proj.bias())
            .unwrap();
        let want = reference(&att, &x_pe, &tok_pe, &tok).unwrap();
        assert_eq!(got.dims(), &[b, n, 32]);
        assert!(
            max_abs_diff(&got, &want) < 1e-5,
            "{}",
            max_abs_diff(&got, &want)
        );

        let got = att.forward_tokens(&tok_pe, &tok_pe, &tok).unwrap();
        let want = reference(&att, &tok_pe, &tok_pe, &tok).unwrap();
        assert!(
            max_abs_diff(&got, &want) < 1e-5,
            "{}",
            max_abs_diff(&got, &want)
        );
    }

    #[test]
    fn fused_cpu_passes_equal_the_composed_transformer() {
        let dev = Device::Cpu;
        let (dim, heads, mlp) = (32, 4, 64);
        let varmap = candle_nn::VarMap::new();
        TwoWayTransformer::new(
            2,
            dim,
            heads,
            mlp,
            VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        )
        .unwrap();
        randomize(&varmap);
        let tensors = crate::models::plain_tensors(&varmap);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let tr = TwoWayTransformer::new(2, dim, heads, mlp, vb).unwrap();
        // 300 image rows: a full band of 256 and a short one; two prompts of 6 tokens
        let (b, t, n) = (2, 6, 300);
        let image = Tensor::randn(0f32, 1f32, (b, n, dim), &dev).unwrap();
        let pe = Tensor::randn(0f32, 1f32, (1, n, dim), &dev).unwrap();
        let tokens = Tensor::randn(0f32, 1f32, (b, t, dim), &dev).unwrap();
        let (q_fused, k_fused) = tr.forward(&image, &pe, None, &tokens).unwrap();
        let (q_composed, k_composed) = {
            let _g = crate::ops::force_generic();
            tr.forward(&image, &pe, None, &tokens).unwrap()
        };
        assert_eq!(q_fused.dims(), &[b, t, dim]);
        assert_eq!(k_fused.dims(), &[b, n, dim]);
        let dq = max_abs_diff(&q_fused, &q_composed);
        let dk = max_abs_diff(&k_fused, &k_composed);
        assert!(dq < 1e-4 && dk < 1e-4, "queries {dq}, keys {dk}");
        // the image with its PE given by the caller (the decoder's cache) gives the same
        let with_pe = image.broadcast_add(&pe).unwrap();
        let (q, k) = tr.forward(&image, &pe, Some(&with_pe), &tokens).unwrap();
        assert_eq!(max_abs_diff(&q, &q_fused), 0.0);
        assert_eq!(max_abs_diff(&k, &k_fused), 0.0);
    }
}
