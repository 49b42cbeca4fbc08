//! Distillation across tokenizers: a teacher and a student that cut the same text into
//! different tokens over different vocabularies (Llama → Qwen, a 70B → a 0.5B of another
//! family).
//!
//! The recipe (TRL's GOLD, after ULD):
//!
//! 1. Tokenize the same text with both tokenizers, keeping each token's byte span.
//! 2. [`SpanAlignment::new`] groups the tokens into spans that both tokenizations cut at the
//!    same bytes ([`align_spans`]), once per batch, on the host.
//! 3. Run both models; give each side's logits shifted so that row `r` predicts token `r`
//!    ([`TokenRows`]).
//! 4. [`CrossTokenizerLoss`] merges each span's rows into one distribution per side
//!    ([`MergeStrategy`]) and compares them: sorted L1 (ULD, `forward`), or, with a
//!    [`VocabMatch`] computed once from the two token lists, the matched vocabulary by a
//!    generalized JSD and the rest by sorted L1 (GOLD's hybrid, `forward_hybrid`).
//!
//! The library takes byte spans and token strings, never a tokenizer object.

mod align;
mod loss;
mod vocab;

pub(crate) use align::MergePlan;
pub use align::{
    AlignedSpan, MERGE_FLOOR, MergeStrategy, SequenceSpans, SpanAlignment, align_spans,
};
pub use loss::{CrossTokenizerLoss, CrossTokenizerLossConfig, CrossTokenizerOutput, TokenRows};
pub use vocab::VocabMatch;
