//! Neural network models: the U-Net++ student and SAM, the large model it mines.
pub mod batch_norm;
pub mod sam;
pub mod unetpp;
