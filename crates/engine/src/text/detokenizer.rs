//! [`IncrementalDecoder`]: streaming text out of generated token ids, one token at a time.
//!
//! Decoding each token on its own is wrong in two ways:
//!
//! - **Split characters.** Byte-level BPE (Qwen) and SentencePiece byte fallback (Mixtral's `<0xF0>`-style tokens)
//!   spread a multi-byte UTF-8 character over several tokens; decoding a prefix of them gives U+FFFD.
//! - **Context-dependent spaces.** SentencePiece decoders strip the leading space of the *first* token
//!   (`▁world` alone decodes to `world`, but to ` world` after `▁Hello`), so pieces decoded in isolation lose the
//!   spaces between words.
//!
//! So, as Hugging Face text-generation-inference and vLLM do, every step decodes a short window that starts with
//! the tokens of the previous emitted piece (`prefix`) and emits only what the new tokens add to the prefix's text.
//! A window whose text ends in U+FFFD is a character still incomplete: nothing is emitted and the offsets stay, so
//! the next token extends the same window. Invariants: `ids[..prefix_offset]` are no longer needed and are dropped;
//! `ids[prefix_offset..read_offset]` is the context already emitted; `ids[read_offset..]` is pending. The
//! concatenation of all pieces, [`IncrementalDecoder::flush`] included, equals `decode(all_ids)` for byte-level BPE
//! and for SentencePiece text; the exception is an invalid byte sequence in SentencePiece byte-fallback tokens,
//! which the `tokenizers` crate replaces run by run and so can differ from a decode of the whole.

use super::tokenizer::Tokenizer;
use super::Result;

/// Tokens of prompt context [`IncrementalDecoder::with_context`] keeps: enough to settle spaces and any
/// character the prompt left incomplete (text-generation-inference and vLLM use 5 too).
const CONTEXT_TOKENS: usize = 5;

/// Turns a stream of token ids into a stream of complete UTF-8 text pieces. Holds no reference to the tokenizer:
/// pass the same one to every call.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    /// A decoder for a fresh sequence: the pieces concatenate to `decode(ids, skip_special_tokens)`.
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            skip_special_tokens,
        }
    }

    /// A decoder that continues after `context` (e.g. the prompt), whose text is not emitted: the first
    /// generated word keeps its leading space, as in `decode(context + generated)`.
    pub fn with_context(context: &[u32], skip_special_tokens: bool) -> Self {
        let tail = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            ids: tail.to_vec(),
            prefix_offset: 0,
            read_offset: tail.len(),
            skip_special_tokens,
        }
    }

    /// Adds one token; returns the text it completes, often empty (a partial character, a skipped special token).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let (prefix_text, new_text) = self.decode_window(tokenizer)?;
        let complete = new_text.len() > prefix_text.len()
            && !new_text.ends_with(char::REPLACEMENT_CHARACTER)
            && new_text.is_char_boundary(prefix_text.len());
        if !complete {
            return Ok(String::new());
        }
        let piece = new_text[prefix_text.len()..].to_owned();
        self.advance();
        Ok(piece)
    }

    /// Emits whatever is still pending at the end of the sequence, an incomplete character as U+FFFD (as
    /// `decode` would). The decoder can be pushed to again afterwards.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let (prefix_text, new_text) = self.decode_window(tokenizer)?;
        let mut start = prefix_text.len().min(new_text.len());
        while !new_text.is_char_boundary(start) {
            start -= 1;
        }
        let piece = new_text[start..].to_owned();
        self.advance();
        Ok(piece)
    }

    /// Whether tokens are held back waiting for the rest of a character.
    pub fn has_pending(&self) -> bool {
        self.read_offset < self.ids.len()
    }

    fn decode_window(&self, tokenizer: &Tokenizer) -> Result<(String, String)> {
        let window = &self.ids[self.prefix_offset..];
        let prefix = &self.ids[self.prefix_offset..self.read_offset];
        Ok((
            tokenizer.decode(prefix, self.skip_special_tokens)?,
            tokenizer.decode(window, self.skip_special_tokens)?,
        ))
    }

    /// The pending tokens were emitted: they become the next window's prefix, and older ids are dropped.
    fn advance(&mut self) {
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::test_support::{mixtral, qwen3};

    /// Streams `ids` and returns the pieces, flush last.
    fn stream(tokenizer: &Tokenizer, ids: &[u32], skip: bool) -> Vec<String> {
        let mut decoder = IncrementalDecoder::new(skip);
        let mut pieces: Vec<String> = ids
            .iter()
            .map(|&id| decoder.push(tokenizer, id).unwrap())
            .collect();
        pieces.push(decoder.flush(tokenizer).unwrap());
        assert!(!decoder.has_pending());
        pieces
    }

    const TEXTS: [&str; 12] = [
        "Hello world, this is a test.",
        " leading space, double  spaces and trailing ",
        "line one\nline two\n\n\tindented\r\n",
        "café naïve résumé e\u{301} Ångström",
        "中文测试：你好，世界！日本語のテキスト。한국어 문장",
        "Emoji 🤗 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🙂🙂🙂",
        "math ∑∫√∞ ≠ ≤ π and Ελληνικά, русский, العربية, हिन्दी, ภาษาไทย",
        "def f(x):\n    return x ** 2  # square\n",
        "<think>\nreasoning\n</think>\n\nanswer<|im_end|>",
        "<s>[INST] hi [/INST] hello</s>",
        "\u{a0}nbsp and zero\u{200b}width 1234567890",
        "🤗",
    ];

    #[test]
    fn text_incremental_matches_full_decode() {
        for tokenizer in [qwen3(), mixtral()] {
            for text in TEXTS {
                for (add_special, skip) in [(false, false), (true, true), (true, false)] {
                    let ids = tokenizer.encode(text, add_special).unwrap();
                    let pieces = stream(tokenizer, &ids, skip);
                    let whole = tokenizer.decode(&ids, skip).unwrap();
                    assert_eq!(
                        pieces.concat(),
                        whole,
                        "{text:?} via {}",
                        tokenizer.path().display()
                    );
                    for piece in &pieces {
                        assert!(
                            !piece.contains(char::REPLACEMENT_CHARACTER),
                            "{text:?}: piece {piece:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn text_incremental_holds_back_split_characters() {
        let tokenizer = qwen3();
        // " 🤗" is three byte-level tokens: nothing may come out before the third.
        let ids = tokenizer.encode(" 🤗", false).unwrap();
        assert_eq!(ids.len(), 3);
        let mut decoder = IncrementalDecoder::new(false);
        assert_eq!(decoder.push(tokenizer, ids[0]).unwrap(), "");
        assert_eq!(decoder.push(tokenizer, ids[1]).unwrap(), "");
        assert!(decoder.has_pending());
        assert_eq!(decoder.push(tokenizer, ids[2]).unwrap(), " 🤗");

        // Cut short, flush gives what decode gives: U+FFFD.
        let mut decoder = IncrementalDecoder::new(false);
        decoder.push(tokenizer, ids[0]).unwrap();
        assert_eq!(
            decoder.flush(tokenizer).unwrap(),
            tokenizer.decode(&ids[..1], false).unwrap()
        );

        // Mixtral: byte-fallback tokens <0xF0><0x9F><0xA4><0x97>
        let tokenizer = mixtral();
        let ids = tokenizer.encode("a🤗", false).unwrap();
        let pieces = stream(tokenizer, &ids, false);
        assert_eq!(
            pieces.iter().filter(|p| !p.is_empty()).count(),
            2,
            "{pieces:?}"
        );
        assert_eq!(pieces.concat(), "a🤗");
    }

    #[test]
    fn text_incremental_keeps_sentencepiece_spaces() {
        let tokenizer = mixtral();
        let ids = tokenizer.encode("Hello big world", false).unwrap();
        let pieces = stream(tokenizer, &ids, false);
        assert_eq!(pieces[..3], ["Hello", " big", " world"]);
        // After a prompt, the first generated word keeps its space.
        let prompt = tokenizer.encode("[INST] hi [/INST]", true).unwrap();
        let mut decoder = IncrementalDecoder::with_context(&prompt, true);
        let first = decoder.push(tokenizer, ids[0]).unwrap();
        assert_eq!(first, " Hello");
    }

    /// xorshift64*: deterministic ids without a random-number dependency.
    fn pseudo_random_ids(seed: u64, count: usize, below: u32) -> Vec<u32> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as u32 % below
            })
            .collect()
    }

    #[test]
    fn text_incremental_random_ids() {
        // Byte-level BPE: any id sequence, invalid UTF-8 included, streams to exactly decode(all).
        let tokenizer = qwen3();
        for seed in 1..=20 {
            let ids = pseudo_random_ids(seed, 200, tokenizer.vocab_size() as u32);
            for skip in [false, true] {
                let pieces = stream(tokenizer, &ids, skip);
                assert_eq!(
                    pieces.concat(),
                    tokenizer.decode(&ids, skip).unwrap(),
                    "seed {seed}"
                );
            }
        }
        // SentencePiece: ids above the 256 byte tokens (3..=258), so no invalid byte runs.
        let tokenizer = mixtral();
        for seed in 1..=20 {
            let ids: Vec<u32> = pseudo_random_ids(seed, 200, 32000 - 259)
                .into_iter()
                .map(|id| id + 259)
                .collect();
            let pieces = stream(tokenizer, &ids, false);
            assert_eq!(
                pieces.concat(),
                tokenizer.decode(&ids, false).unwrap(),
                "seed {seed}"
            );
        }
    }
}
