//! Neural network models: the U-Net++ student (and, later, SAM).
pub mod batch_norm;
pub mod unetpp;
