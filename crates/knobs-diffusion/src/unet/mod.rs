//! diffusers `UNet2DConditionModel` (SD 1.x / 2.x, and SDXL's `text_time` conditioning), one file per block. Parameter paths equal
//! diffusers' `state_dict` keys, so checkpoints and adapter files map one to one.
pub mod attention;
pub mod config;
pub mod down;
pub mod embeddings;
pub mod mid;
pub mod model;
pub mod resnet;
pub mod transformer;
pub mod up;
pub mod weights;

pub use attention::Attention;
pub use config::{BlockPlan, PerBlock, UNetConfig};
pub use down::{DownBlock, Downsample2D};
pub use embeddings::{TimestepEmbedding, Timesteps};
pub use mid::UNetMidBlock2DCrossAttn;
pub use model::{AddedCond, UNet2DConditionModel, UNetIntermediates};
pub use resnet::ResnetBlock2D;
pub use transformer::{BasicTransformerBlock, FeedForward, Projection, Transformer2DModel};
pub use up::{UpBlock, Upsample2D};
pub use weights::{DeferredLoad, WeightsState};
