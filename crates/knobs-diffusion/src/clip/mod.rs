//! The CLIP text side of Stable Diffusion: transformers' `CLIPTokenizer` and `CLIPTextModel`,
//! loaded from a diffusers pipeline's `tokenizer/` and `text_encoder/` folders. Parameter
//! paths are the `text_model.*` keys of SD checkpoints; files saved by transformers >= 5.6
//! (without that level) load too, see [`model::normalize_keys`].
pub mod attention;
pub mod config;
pub mod embeddings;
pub mod encoder;
pub mod model;
pub mod tokenizer;

pub use attention::ClipAttention;
pub use config::{Activation, ClipTextConfig};
pub use encoder::{ClipEncoder, ClipEncoderLayer, ClipMlp};
pub use model::{ClipOutput, ClipTextEmbeddings, ClipTextModel, ClipTextTransformer, normalize_keys};
pub use tokenizer::ClipTokenizer;
