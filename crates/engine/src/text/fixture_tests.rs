//! Byte-for-byte comparisons with Hugging Face transformers, from `tests/fixtures/text/expected.json`
//! (written by `scripts/text/make_expected.py`), and llama.cpp's Qwen2 vocabulary test.
//!
//! Each test gathers every mismatch before failing, so one run shows all of them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::strftime::strftime_utc;
use super::test_support::{fixtures_dir, mixtral, qwen3};
use super::{ChatTemplate, IncrementalDecoder, TextError, Tokenizer, TokenizerConfig};

fn expected() -> &'static Value {
    static EXPECTED: OnceLock<Value> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let text = std::fs::read_to_string(fixtures_dir().join("expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    })
}

fn tokenizer_named(name: &str) -> &'static Tokenizer {
    match name {
        "qwen3" => qwen3(),
        "mixtral" => mixtral(),
        other => panic!("no fixture tokenizer {other}"),
    }
}

fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn assert_no_failures(what: &str, checked: usize, failures: &[String]) {
    assert!(checked > 0, "{what}: nothing checked");
    assert!(
        failures.is_empty(),
        "{what}: {} of {checked} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn text_fixture_versions_recorded() {
    let versions = &expected()["versions"];
    assert!(versions["transformers"].is_string(), "{versions}");
}

#[test]
fn text_fixture_encode_matches_hf() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in ["qwen3", "mixtral"] {
        let tokenizer = tokenizer_named(name);
        let reference = &expected()["tokenizers"][name];
        assert_eq!(
            tokenizer.vocab_size() as u64,
            reference["vocab_size"].as_u64().unwrap()
        );
        for case in reference["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let add_special = case["add_special_tokens"].as_bool().unwrap();
            let got = tokenizer.encode(text, add_special).unwrap();
            checked += 1;
            if got != ids_of(&case["ids"]) {
                failures.push(format!(
                    "{name} {text:?} add_special={add_special}: {got:?} != {}",
                    case["ids"]
                ));
            }
        }
    }
    assert_no_failures("encode", checked, &failures);
}

#[test]
fn text_fixture_decode_matches_hf() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in ["qwen3", "mixtral"] {
        let tokenizer = tokenizer_named(name);
        for case in expected()["tokenizers"][name]["decode"].as_array().unwrap() {
            let ids = ids_of(&case["ids"]);
            let skip = case["skip_special_tokens"].as_bool().unwrap();
            let want = case["text"].as_str().unwrap();
            let got = tokenizer.decode(&ids, skip).unwrap();
            checked += 1;
            if got != want {
                failures.push(format!("{name} {ids:?} skip={skip}: {got:?} != {want:?}"));
            }
        }
    }
    assert_no_failures("decode", checked, &failures);
}

/// Streams every reference id sequence through [`IncrementalDecoder`]: pieces concatenate to HF's decode and
/// never carry U+FFFD unless HF's decode does.
#[test]
fn text_fixture_incremental_decode_matches_hf() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in ["qwen3", "mixtral"] {
        let tokenizer = tokenizer_named(name);
        for case in expected()["tokenizers"][name]["decode"].as_array().unwrap() {
            let ids = ids_of(&case["ids"]);
            let skip = case["skip_special_tokens"].as_bool().unwrap();
            let want = case["text"].as_str().unwrap();
            let mut decoder = IncrementalDecoder::new(skip);
            let mut pieces = Vec::new();
            for &id in &ids {
                pieces.push(decoder.push(tokenizer, id).unwrap());
            }
            pieces.push(decoder.flush(tokenizer).unwrap());
            checked += 1;
            if pieces.concat() != want {
                failures.push(format!(
                    "{name} {ids:?} skip={skip}: {pieces:?} != {want:?}"
                ));
            }
            let broken = pieces
                .iter()
                .any(|p| p.contains(char::REPLACEMENT_CHARACTER));
            if broken && !want.contains(char::REPLACEMENT_CHARACTER) {
                failures.push(format!("{name} {ids:?}: a piece has U+FFFD: {pieces:?}"));
            }
        }
    }
    assert_no_failures("incremental decode", checked, &failures);
}

/// llama.cpp's `models/ggml-vocab-qwen2.gguf.{inp,out}`: strings separated by `\n__ggml_vocab_test__\n` (with a
/// trailing separator), one line of ids per string, as llama.cpp's tokenizer gives them.
fn check_llama_cpp_qwen2_cases(tokenizer: &Tokenizer, what: &str) {
    check_llama_cpp_cases(tokenizer, "qwen3", "ggml-vocab-qwen2.gguf", 46, what);
}

/// llama.cpp's vocabulary test `{dir}/{name}.{inp,out}` (`count` strings) through `tokenizer`,
/// without special tokens, and each back to its text.
fn check_llama_cpp_cases(tokenizer: &Tokenizer, dir: &str, name: &str, count: usize, what: &str) {
    let dir = fixtures_dir().join(dir);
    let inp = std::fs::read_to_string(dir.join(format!("{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    assert_eq!(texts.pop(), Some(""), "the .inp file ends with a separator");
    let lines: Vec<&str> = out.split('\n').collect();
    assert!(lines.len() >= texts.len());
    assert_eq!(texts.len(), count);
    let mut failures = Vec::new();
    for (text, line) in texts.iter().zip(&lines) {
        let want: Vec<u32> = line
            .split_whitespace()
            .map(|id| id.parse().unwrap())
            .collect();
        let got = tokenizer.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}: {got:?} != {want:?}"));
        }
        let decoded = tokenizer.decode(&got, false).unwrap();
        if decoded != *text {
            failures.push(format!("{text:?} decodes back to {decoded:?}"));
        }
    }
    assert_no_failures(what, texts.len(), &failures);
}

#[test]
fn text_fixture_llama_cpp_qwen2_vocab() {
    check_llama_cpp_qwen2_cases(qwen3(), "ggml-vocab-qwen2");
}

/// The same cases through a GGUF file's `tokenizer.ggml.*` metadata, built from Qwen3's
/// `tokenizer.json` as llama.cpp's converter builds it (`convert_hf_to_gguf.py --vocab-only`
/// of llama-cpp-python 0.3.36's llama.cpp writes exactly these tokens, types and merges:
/// checked once against its output): every id's token up to the model's vocab_size, `[PADn]`
/// (type 5) in the holes, added tokens that are special or look it (`<|…|>`) as control (3)
/// and the other added tokens as user-defined (4), the merges as `"a b"` strings,
/// pre-tokenizer `qwen2`. The tokenizer moestream rebuilds from them gives llama.cpp's ids.
#[test]
fn text_fixture_llama_cpp_qwen2_vocab_from_gguf_metadata() {
    use crate::gguf::GgufSource;
    use moestream_formats::gguf::{write_gguf, MetadataArray, MetadataValue as V};
    let dir = fixtures_dir().join("qwen3");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let added = json["added_tokens"].as_array().unwrap();
    let n = 151_936; // Qwen3's config.json vocab_size
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = Some(t.clone());
    }
    for a in added {
        let id = a["id"].as_u64().unwrap() as usize;
        tokens[id] = Some(a["content"].as_str().unwrap().to_string());
        types[id] = if a["special"].as_bool().unwrap() {
            3
        } else {
            4
        };
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            other => panic!("merge {other}"),
        })
        .collect();
    let metadata = vec![
        (
            "general.architecture".to_string(),
            V::String("qwen3".into()),
        ),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("qwen2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(MetadataArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(MetadataArray::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(MetadataArray::String(merges)),
        ),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(151645)),
        ("tokenizer.ggml.padding_token_id".into(), V::U32(151643)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("vocab.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    write_gguf(&mut file, &metadata, &[], |_| unreachable!("no tensors")).unwrap();
    drop(file);
    let source = GgufSource::open(&path, false).unwrap();
    check_llama_cpp_qwen2_cases(
        &source.tokenizer().unwrap(),
        "ggml-vocab-qwen2 via GGUF metadata",
    );
}

/// llama.cpp's SentencePiece test vocabulary (`ggml-vocab-llama-spm.gguf`, as its converter
/// writes Llama and Mixtral files: `tokenizer.ggml.model` `llama`, tokens, scores, types): the
/// tokenizer moestream builds from the metadata gives llama.cpp's ids for its test strings.
#[test]
fn text_fixture_llama_cpp_sentencepiece_vocab_from_gguf_metadata() {
    use crate::gguf::GgufSource;
    let path = fixtures_dir()
        .join("llama-spm")
        .join("ggml-vocab-llama-spm.gguf");
    let source = GgufSource::open(&path, false).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let n = std::fs::read_to_string(path.with_extension("gguf.inp"))
        .unwrap()
        .matches("\n__ggml_vocab_test__\n")
        .count();
    check_llama_cpp_cases(
        &tokenizer,
        "llama-spm",
        "ggml-vocab-llama-spm.gguf",
        n,
        "ggml-vocab-llama-spm via GGUF metadata",
    );
    // With the file's add_bos_token, a BOS first.
    assert_eq!(tokenizer.encode("Hello", true).unwrap()[0], 1);
}

/// Every template case of expected.json: same output byte for byte, or an error where Python raised; for
/// `raise_exception` (Jinja's TemplateError) the same message.
#[test]
fn text_fixture_templates_match_hf() {
    let mut templates: HashMap<(String, String), ChatTemplate> = HashMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for case in expected()["templates"].as_array().unwrap() {
        let file = case["template"].as_str().unwrap();
        let tokenizer = case["tokenizer"].as_str().unwrap();
        let template = templates
            .entry((file.into(), tokenizer.into()))
            .or_insert_with(|| {
                let path = fixtures_dir().join("templates").join(file);
                let source = std::fs::read_to_string(&path).unwrap();
                let config = TokenizerConfig::from_dir(&fixtures_dir().join(tokenizer)).unwrap();
                ChatTemplate::new(file, source, config.special_tokens).unwrap()
            });
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();
        let kwargs: Map<String, Value> = case["kwargs"].as_object().unwrap().clone();
        let label = format!(
            "{file} [{tokenizer}] {} agp={add_generation_prompt}",
            case["case"].as_str().unwrap()
        );
        let got = template.render(&case["messages"], add_generation_prompt, &kwargs);
        checked += 1;
        match (
            got,
            case.get("output"),
            case.get("error_type").and_then(Value::as_str),
        ) {
            (Ok(got), Some(Value::String(want)), _) => {
                if got != *want {
                    failures.push(format!("{label}:\n--- got\n{got}\n--- want\n{want}\n---"));
                }
            }
            (Err(TextError::TemplateRaised { message, .. }), None, Some("TemplateError")) => {
                if Some(message.as_str()) != case["error"].as_str() {
                    failures.push(format!(
                        "{label}: raised {message:?}, Python {}",
                        case["error"]
                    ));
                }
            }
            (Err(err), None, Some(kind)) if kind != "TemplateError" => {
                if matches!(err, TextError::TemplateRaised { .. }) {
                    failures.push(format!(
                        "{label}: raise_exception, Python {kind}: {}",
                        case["error"]
                    ));
                }
            }
            (got, _, _) => failures.push(format!(
                "{label}: got {got:?}, Python {}",
                case.get("output")
                    .or(case.get("error"))
                    .unwrap_or(&Value::Null)
            )),
        }
    }
    assert!(checked >= 200, "only {checked} template cases");
    assert_no_failures("templates", checked, &failures);
}

#[test]
fn text_fixture_strftime_matches_python() {
    let mut failures = Vec::new();
    let cases = expected()["strftime"].as_array().unwrap();
    for case in cases {
        let format = case["format"].as_str().unwrap();
        let unix_seconds = case["unix_seconds"].as_i64().unwrap();
        let got = strftime_utc(format, unix_seconds);
        if got != case["text"].as_str().unwrap() {
            failures.push(format!(
                "{format:?} @ {unix_seconds}: {got:?} != {}",
                case["text"]
            ));
        }
    }
    assert_no_failures("strftime", cases.len(), &failures);
}

/// The Qwen3 folder's `tokenizer_config.json` carries the current HF template: loading it from the folder
/// renders as the same template read from its .jinja copy.
#[test]
fn text_fixture_template_from_model_dir() {
    let dir = fixtures_dir().join("qwen3");
    let from_dir = ChatTemplate::from_dir(&dir).unwrap().unwrap();
    let file = fixtures_dir().join("templates/Qwen3-0.6B.current.jinja");
    assert_eq!(from_dir.source(), std::fs::read_to_string(&file).unwrap());
    assert!(from_dir.name().contains("tokenizer_config.json"));
    let case = expected()["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["template"] == "Qwen3-0.6B.current.jinja" && c["case"] == "tools")
        .unwrap();
    let extra = case["kwargs"].as_object().unwrap();
    let agp = case["add_generation_prompt"].as_bool().unwrap();
    let got = from_dir.render(&case["messages"], agp, extra).unwrap();
    assert_eq!(got, case["output"].as_str().unwrap());
    // Mixtral's base-model config has no template.
    assert!(
        ChatTemplate::from_dir(Path::new(&fixtures_dir().join("mixtral")))
            .unwrap()
            .is_none()
    );
}
