//! The tensors of a synthetic Qwen3-Next / Qwen3.5 checkpoint, named as transformers saves them
//! (HF formats: Qwen3.5 under `model.language_model.` with fused experts, Qwen3-Next per expert,
//! norms as `w` of `1 + w`, convolutions `[C, 1, K]`, plus the `mtp.*` multi-token-prediction
//! head the released checkpoints ship, its experts per expert) or as mlx-lm does
//! (`language_model.model.` for Qwen3.5, stacked `switch_mlp` experts, norms as `1 + w`,
//! convolutions `[C, K, 1]`, no `mtp.*`: mlx-lm drops it).
use super::{usize_of, Fill, Plan, SynthFormat, TensorSpec};
use serde_json::Value;

/// How a layer's routed experts are stored.
#[derive(Clone, Copy, PartialEq)]
enum ExpertLayout {
    /// mlx-lm's `switch_mlp.{gate,up,down}_proj`, stacked over experts.
    Stacked,
    /// transformers 5's `experts.gate_up_proj` + `experts.down_proj` (no `.weight` suffix).
    Fused,
    /// `experts.{e}.{gate,up,down}_proj.weight`.
    PerExpert,
}

/// The geometry and formats a hybrid checkpoint is written with.
struct Hybrid<'a> {
    arch: &'a str,
    format: SynthFormat,
    /// Dtype of plain vectors (norms, convolutions).
    float: &'static str,
    /// What a zero-centred norm stores around: 0 (`w`) or 1 (`1 + w`).
    norm_center: f32,
    t: &'a Value,
}

/// `1/sqrt(fan_in)`: keeps activations of the random model at unit scale.
fn s(fan_in: usize) -> f32 {
    1.0 / (fan_in as f32).sqrt()
}

fn vector(p: &mut Plan, name: String, shape: Vec<usize>, a: f32, center: f32, dtype: &'static str) {
    p.tensors.push(TensorSpec {
        name,
        dtype,
        shape,
        fill: Fill::Uniform { a, center },
        sources: Vec::new(),
    });
}

impl Hybrid<'_> {
    fn u(&self, k: &str) -> usize {
        usize_of(self.t, k)
    }

    fn linear(&self, p: &mut Plan, name: &str, rows: usize, cols: usize) {
        p.linear(name, (None, rows, cols), s(cols), self.format, None);
    }

    fn norm(&self, p: &mut Plan, name: String, len: usize) {
        vector(p, name, vec![len], 0.2, self.norm_center, self.float);
    }

    /// Decoder layer `lp`: full or linear attention, then its MLP or MoE block.
    fn layer(&self, p: &mut Plan, lp: &str, full: bool, experts: ExpertLayout) {
        let h = self.u("hidden_size");
        self.norm(p, format!("{lp}.input_layernorm.weight"), h);
        self.norm(p, format!("{lp}.post_attention_layernorm.weight"), h);
        if full {
            self.full_attention(p, &format!("{lp}.self_attn"));
        } else {
            self.delta_net(p, &format!("{lp}.linear_attn"));
        }
        self.feed_forward(p, &format!("{lp}.mlp"), experts);
    }

    fn full_attention(&self, p: &mut Plan, at: &str) {
        let (h, nh, nkv, d) = (
            self.u("hidden_size"),
            self.u("num_attention_heads"),
            self.u("num_key_value_heads"),
            self.u("head_dim"),
        );
        // q_proj holds each head's query rows followed by its gate rows.
        self.linear(p, &format!("{at}.q_proj"), 2 * nh * d, h);
        self.linear(p, &format!("{at}.k_proj"), nkv * d, h);
        self.linear(p, &format!("{at}.v_proj"), nkv * d, h);
        self.linear(p, &format!("{at}.o_proj"), h, nh * d);
        for n in ["q_norm", "k_norm"] {
            self.norm(p, format!("{at}.{n}.weight"), d);
        }
    }

    fn delta_net(&self, p: &mut Plan, la: &str) {
        let h = self.u("hidden_size");
        let (nk, nv, dk, dv, kc) = (
            self.u("linear_num_key_heads"),
            self.u("linear_num_value_heads"),
            self.u("linear_key_head_dim"),
            self.u("linear_value_head_dim"),
            self.u("linear_conv_kernel_dim"),
        );
        let c = 2 * nk * dk + nv * dv;
        if self.arch == "qwen3_next" {
            self.linear(
                p,
                &format!("{la}.in_proj_qkvz"),
                2 * nk * dk + 2 * nv * dv,
                h,
            );
            self.linear(p, &format!("{la}.in_proj_ba"), 2 * nv, h);
        } else {
            self.linear(p, &format!("{la}.in_proj_qkv"), c, h);
            self.linear(p, &format!("{la}.in_proj_z"), nv * dv, h);
            self.linear(p, &format!("{la}.in_proj_b"), nv, h);
            self.linear(p, &format!("{la}.in_proj_a"), nv, h);
        }
        let mlx = matches!(self.format, SynthFormat::Mlx4 | SynthFormat::Mlx8);
        let conv_shape = if mlx { vec![c, kc, 1] } else { vec![c, 1, kc] };
        vector(
            p,
            format!("{la}.conv1d.weight"),
            conv_shape,
            0.5,
            0.0,
            self.float,
        );
        vector(p, format!("{la}.dt_bias"), vec![nv], 0.5, 0.0, self.float);
        // A = exp(A_log) in [1, 16], as the models are initialised.
        vector(p, format!("{la}.A_log"), vec![nv], 0.69, 2.08 - 0.69, "F32");
        // The gated norm inside the DeltaNet is a plain `w` norm in every format.
        vector(
            p,
            format!("{la}.norm.weight"),
            vec![dv],
            0.2,
            1.0,
            self.float,
        );
        self.linear(p, &format!("{la}.out_proj"), h, nv * dv);
    }

    fn feed_forward(&self, p: &mut Plan, mp: &str, layout: ExpertLayout) {
        let (h, e, i, is, f) = (
            self.u("hidden_size"),
            self.u("num_experts"),
            self.u("moe_intermediate_size"),
            self.u("shared_expert_intermediate_size"),
            self.u("intermediate_size"),
        );
        if e == 0 {
            for (n, r, c) in [("gate_proj", f, h), ("up_proj", f, h), ("down_proj", h, f)] {
                self.linear(p, &format!("{mp}.{n}"), r, c);
            }
            return;
        }
        // Routers and shared-expert gates stay at 8 bits in mlx-lm's quantized checkpoints.
        p.linear(
            &format!("{mp}.gate"),
            (None, e, h),
            4.0 * s(h),
            self.format,
            Some(8),
        );
        p.linear(
            &format!("{mp}.shared_expert_gate"),
            (None, 1, h),
            s(h),
            self.format,
            Some(8),
        );
        for (n, r, c) in [
            ("gate_proj", is, h),
            ("up_proj", is, h),
            ("down_proj", h, is),
        ] {
            self.linear(p, &format!("{mp}.shared_expert.{n}"), r, c);
        }
        let shapes = [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)];
        match layout {
            ExpertLayout::Stacked => {
                for (n, r, c) in shapes {
                    let name = format!("{mp}.switch_mlp.{n}");
                    p.linear(&name, (Some(e), r, c), s(c), self.format, None);
                }
            }
            ExpertLayout::PerExpert => {
                for x in 0..e {
                    for (n, r, c) in shapes {
                        self.linear(p, &format!("{mp}.experts.{x}.{n}"), r, c);
                    }
                }
            }
            ExpertLayout::Fused => {
                let (a_in, a_mid) = (s(h) * 3f32.sqrt(), s(i) * 3f32.sqrt());
                let gu = format!("{mp}.experts.gate_up_proj");
                vector(p, gu, vec![e, 2 * i, h], a_in, 0.0, self.float);
                let down = format!("{mp}.experts.down_proj");
                vector(p, down, vec![e, h, i], a_mid, 0.0, self.float);
            }
        }
    }

    /// The `mtp.*` head of the released checkpoints (MODELS.md §5.5): norms, `fc [H, 2H]`, one
    /// full-attention layer with per-expert experts, final norm.
    fn mtp(&self, p: &mut Plan) {
        let h = self.u("hidden_size");
        self.norm(p, "mtp.pre_fc_norm_embedding.weight".into(), h);
        self.norm(p, "mtp.pre_fc_norm_hidden.weight".into(), h);
        self.linear(p, "mtp.fc", h, 2 * h);
        self.layer(p, "mtp.layers.0", true, ExpertLayout::PerExpert);
        self.norm(p, "mtp.norm.weight".into(), h);
    }
}

/// The tensors of a hybrid checkpoint with text config `t` (see the module docs).
pub(super) fn plan(arch: &str, t: &Value, format: SynthFormat) -> Plan {
    let mlx = matches!(format, SynthFormat::Mlx4 | SynthFormat::Mlx8);
    let g = Hybrid {
        arch,
        format,
        float: if format == SynthFormat::HfF32 {
            "F32"
        } else {
            "BF16"
        },
        norm_center: if mlx { 1.0 } else { 0.0 },
        t,
    };
    let (h, v) = (g.u("hidden_size"), g.u("vocab_size"));
    let (pre, head) = match (arch, mlx) {
        ("qwen3_next", _) => ("model.", "lm_head"),
        (_, false) => ("model.language_model.", "lm_head"),
        (_, true) => ("language_model.model.", "language_model.lm_head"),
    };
    let experts = match (arch, mlx) {
        (_, true) => ExpertLayout::Stacked,
        ("qwen3_next", false) => ExpertLayout::PerExpert,
        (_, false) => ExpertLayout::Fused,
    };
    let mut p = Plan { tensors: vec![] };
    p.linear(
        &format!("{pre}embed_tokens"),
        (None, v, h),
        1.0,
        format,
        None,
    );
    for l in 0..g.u("num_hidden_layers") {
        let full = t["layer_types"][l].as_str() == Some("full_attention");
        g.layer(&mut p, &format!("{pre}layers.{l}"), full, experts);
    }
    g.norm(&mut p, format!("{pre}norm.weight"), h);
    p.linear(head, (None, v, h), s(h), format, None);
    if !mlx && g.u("mtp_num_hidden_layers") > 0 {
        g.mtp(&mut p);
    }
    p
}
