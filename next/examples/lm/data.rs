//! The text, its split, and the byte-pair encodings (trained with the `tokenizers` crate).

use std::io::Read;

use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{TokenizerBuilder, TokenizerImpl};

/// The bundled King James Bible (gzip; `examples/data/kjv/README.md` of the repository). The
/// 0.2 crate in `next/` reads the 0.1 crate's copy; the path becomes `../data/kjv/kjv.txt.gz`
/// when the root switches to 0.2.
const KJV: &[u8] = include_bytes!("../../../examples/data/kjv/kjv.txt.gz");

/// Training, validation and test text.
pub struct Corpus {
    pub train: Vec<String>,
    pub valid: String,
    pub test: String,
}

/// Blocks separated by empty lines; block `i` is test when `i % 20 == 19`, validation when
/// `i % 20 == 9`, training otherwise (for the bundled text a block is a chapter).
pub fn corpus(path: Option<&std::path::Path>) -> std::io::Result<Corpus> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p)?,
        None => {
            let mut s = String::new();
            flate2::read::GzDecoder::new(KJV).read_to_string(&mut s)?;
            s
        }
    };
    let blocks: Vec<String> = text
        .replace("\r\n", "\n")
        .split("\n\n")
        .map(|b| b.trim_matches('\n').to_string())
        .filter(|b| !b.is_empty())
        .collect();
    let (mut train, mut valid, mut test) = (Vec::new(), Vec::new(), Vec::new());
    for (i, b) in blocks.into_iter().enumerate() {
        match i % 20 {
            19 => test.push(b),
            9 => valid.push(b),
            _ => train.push(b),
        }
    }
    assert!(
        !train.is_empty() && !valid.is_empty() && !test.is_empty(),
        "the text needs at least 20 blocks separated by empty lines"
    );
    Ok(Corpus {
        train,
        valid: valid.join("\n\n"),
        test: test.join("\n\n"),
    })
}

type Bpe = TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel>;

/// A byte-level BPE tokenizer: every token is a whole number of bytes of the text (each of its
/// characters stands for one byte), so token byte spans tile the text.
pub struct Tok {
    bpe: Bpe,
    byte_len: Vec<usize>,
    strings: Vec<String>,
}

impl Tok {
    /// Trains a `vocab`-entry encoding on the training blocks.
    pub fn train(blocks: &[String], vocab: usize) -> Tok {
        let mut bpe: Bpe = TokenizerBuilder::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::new(false, false, true)))
            .with_post_processor(None)
            .with_decoder(Some(ByteLevel::default()))
            .build()
            .expect("a BPE tokenizer");
        let mut trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        bpe.train(&mut trainer, blocks.iter())
            .expect("BPE training");
        let n = bpe.get_vocab_size(false);
        let strings: Vec<String> = (0..n as u32)
            .map(|id| bpe.id_to_token(id).expect("dense ids"))
            .collect();
        let byte_len = strings.iter().map(|s| s.chars().count()).collect();
        Tok {
            bpe,
            byte_len,
            strings,
        }
    }

    pub fn vocab(&self) -> usize {
        self.strings.len()
    }

    /// The token strings by id (byte-level: `Ġ` is a space).
    pub fn strings(&self) -> &[String] {
        &self.strings
    }

    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe
            .encode(text, false)
            .expect("encoding")
            .get_ids()
            .to_vec()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.bpe.decode(ids, false).unwrap_or_default()
    }

    /// Bytes of text that token `id` stands for.
    pub fn bytes(&self, id: u32) -> usize {
        self.byte_len[id as usize]
    }

    /// `[start, end)` byte spans of `ids`, from `0`.
    pub fn spans(&self, ids: &[u32]) -> Vec<(usize, usize)> {
        let mut at = 0;
        ids.iter()
            .map(|&id| {
                let span = (at, at + self.bytes(id));
                at = span.1;
                span
            })
            .collect()
    }
}
