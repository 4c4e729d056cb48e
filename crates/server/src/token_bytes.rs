//! The raw bytes of one token, for `logprobs` (`bytes`): a token of a byte-level BPE can be part
//! of a UTF-8 character, which no string shows; its bytes are what a client reassembles.
//!
//! Byte-level BPE vocabularies (Qwen, GPT-2) spell each byte as one printable character (GPT-2's
//! table: printable Latin-1 stands for itself, the rest is shifted past U+0100; a space is `Ġ`).
//! SentencePiece vocabularies (Mixtral) spell a space `▁` and unknown bytes `<0xNN>`. Added tokens
//! (`<think>`, `<|im_end|>`) are printable ASCII, which both spell as itself.
use std::collections::HashMap;
use std::sync::OnceLock;

use moestream_engine::text::Tokenizer;

/// GPT-2's character for each byte, inverted.
fn byte_level_table() -> &'static HashMap<char, u8> {
    static TABLE: OnceLock<HashMap<char, u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (u32::from(b'!')..=u32::from(b'~')).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b)
        };
        let mut shifted = 0;
        (0..=255u8)
            .map(|b| {
                let c = if printable(u32::from(b)) {
                    u32::from(b)
                } else {
                    shifted += 1;
                    255 + shifted
                };
                (char::from_u32(c).unwrap_or('?'), b)
            })
            .collect()
    })
}

/// The bytes token `id` stands for (its decoded text's bytes when its spelling is unknown).
pub fn token_bytes(tokenizer: &Tokenizer, id: u32) -> Vec<u8> {
    let Some(spelling) = tokenizer.id_to_token(id) else {
        return Vec::new();
    };
    // `Ġ` is the byte-level spelling of a space: present in every byte-level vocabulary.
    if tokenizer.token_to_id("\u{120}").is_some() {
        let table = byte_level_table();
        if let Some(bytes) = spelling.chars().map(|c| table.get(&c).copied()).collect() {
            return bytes;
        }
    }
    if let Some(hex) = spelling
        .strip_prefix("<0x")
        .and_then(|s| s.strip_suffix('>'))
    {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    spelling.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::byte_level_table;

    #[test]
    fn byte_level_table_is_gpt2s() {
        let t = byte_level_table();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'a'], b'a');
        assert_eq!(t[&'\u{120}'], b' ');
        assert_eq!(t[&'\u{10A}'], b'\n');
        assert_eq!(t[&'\u{100}'], 0);
    }
}
