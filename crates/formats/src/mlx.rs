//! The `quantization` entry mlx-lm writes into `config.json`.
//!
//! ```json
//! "quantization": {"group_size": 64, "bits": 4, "mode": "affine",
//!                  "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}}
//! ```
//! Top-level `group_size`/`bits` are the defaults; any other key whose value is an object is a
//! per-module override (a module whose value is `false` was left unquantized). Whether a tensor is
//! quantized at all is decided per tensor by the presence of `<module>.scales`, not from this
//! config, because mlx-lm silently leaves layers whose input size is not a multiple of the group
//! size in float.
use crate::FormatError;
use std::collections::HashMap;
use std::path::Path;

/// Bits and group size of one quantized module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantParams {
    /// Bits per code.
    pub bits: u32,
    /// Elements per group.
    pub group_size: usize,
}

/// Parsed `quantization` config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantizationConfig {
    /// Defaults for modules without an override.
    pub default: QuantParams,
    /// Per-module overrides, keyed by module path (e.g. `model.layers.0.mlp.gate`).
    pub overrides: HashMap<String, QuantParams>,
}

impl QuantizationConfig {
    /// Parses `config["quantization"]` (or `quantization_config` with the same shape); `None` when
    /// the model is not MLX-quantized. Only `mode: "affine"` (or no mode) is supported.
    pub fn from_config(
        config: &serde_json::Value,
        path: &Path,
    ) -> Result<Option<Self>, FormatError> {
        let q = match config.get("quantization") {
            Some(q) => q,
            None => match config.get("quantization_config") {
                Some(q) if q.get("bits").is_some() && q.get("group_size").is_some() => q,
                _ => return Ok(None),
            },
        };
        let err = |reason: String| FormatError::Json {
            path: path.to_path_buf(),
            reason,
        };
        let obj = q
            .as_object()
            .ok_or_else(|| err("`quantization` is not an object".into()))?;
        if let Some(mode) = obj.get("mode") {
            if mode.as_str() != Some("affine") {
                return Err(err(format!(
                    "`quantization.mode` is {mode}; only \"affine\" MLX quantization is supported"
                )));
            }
        }
        let parse = |v: &serde_json::Value, at: &str| -> Result<QuantParams, FormatError> {
            let bits = v
                .get("bits")
                .and_then(|b| b.as_u64())
                .ok_or_else(|| err(format!("`{at}.bits` missing or not an integer")))?;
            let gs = v
                .get("group_size")
                .and_then(|b| b.as_u64())
                .ok_or_else(|| err(format!("`{at}.group_size` missing or not an integer")))?;
            if !matches!(bits, 2 | 3 | 4 | 5 | 6 | 8) {
                return Err(err(format!(
                    "`{at}.bits` is {bits}; supported: 2, 3, 4, 5, 6, 8"
                )));
            }
            if !matches!(gs, 32 | 64 | 128) {
                return Err(err(format!(
                    "`{at}.group_size` is {gs}; supported: 32, 64, 128"
                )));
            }
            Ok(QuantParams {
                bits: bits as u32,
                group_size: gs as usize,
            })
        };
        let default = parse(q, "quantization")?;
        let mut overrides = HashMap::new();
        for (k, v) in obj {
            if v.is_object() {
                overrides.insert(k.clone(), parse(v, &format!("quantization.{k}"))?);
            }
        }
        Ok(Some(QuantizationConfig { default, overrides }))
    }

    /// Parameters for a module path.
    pub fn params_for(&self, module: &str) -> QuantParams {
        self.overrides.get(module).copied().unwrap_or(self.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<Option<QuantizationConfig>, FormatError> {
        QuantizationConfig::from_config(&v, Path::new("config.json"))
    }

    #[test]
    fn defaults_and_per_module_overrides() {
        let q = parse(json!({"quantization": {"group_size": 32, "bits": 4, "mode": "affine",
            "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}, "model.layers.1.mlp.gate": false}}))
        .unwrap()
        .unwrap();
        assert_eq!(
            q.default,
            QuantParams {
                bits: 4,
                group_size: 32
            }
        );
        assert_eq!(
            q.params_for("model.layers.0.mlp.gate"),
            QuantParams {
                bits: 8,
                group_size: 64
            }
        );
        assert_eq!(q.params_for("model.layers.1.mlp.gate"), q.default);
        assert_eq!(q.overrides.len(), 1);
    }

    #[test]
    fn absent_means_float_and_old_files_without_mode_are_affine() {
        assert!(parse(json!({"model_type": "qwen3"})).unwrap().is_none());
        assert!(
            parse(json!({"quantization_config": {"quant_method": "fp8"}}))
                .unwrap()
                .is_none()
        );
        assert!(
            parse(json!({"quantization": {"group_size": 64, "bits": 3}}))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn unsupported_values_are_named() {
        let e = parse(json!({"quantization": {"group_size": 64, "bits": 7}}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.json") && e.contains("quantization.bits") && e.contains('7'),
            "{e}"
        );
        let e = parse(json!({"quantization": {"group_size": 48, "bits": 4}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("group_size") && e.contains("48"), "{e}");
        let e = parse(json!({"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mxfp4"), "{e}");
        let e =
            parse(json!({"quantization": {"group_size": 32, "bits": 4, "x.gate": {"bits": 8}}}))
                .unwrap_err()
                .to_string();
        assert!(e.contains("quantization.x.gate.group_size"), "{e}");
    }
}
