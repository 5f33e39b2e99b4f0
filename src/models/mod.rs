//! Neural network models: the U-Net++ student and SAM, the large model it mines.
pub mod batch_norm;
pub mod sam;
pub mod unetpp;

/// Plain (detached) copies of a `VarMap`'s variables, for a `VarBuilder::from_tensors` model.
/// A forward pass through `Var`s records its autograd graph and keeps every intermediate alive
/// until the output is dropped; inference and benchmarks use these instead.
pub fn plain_tensors(
    map: &candle_nn::VarMap,
) -> std::collections::HashMap<String, candle_core::Tensor> {
    map.data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect()
}
