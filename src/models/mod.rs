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

/// The first tensor (by name) holding NaN or infinite values, with how many it holds. Loaders
/// call this once on every checkpoint: non-finite weights would predict all-0 or all-1 masks
/// without a word. The scan runs where the tensors are (a sum of `t - t`, which is NaN exactly
/// when `t` holds a non-finite value); only a bad tensor is counted on the CPU.
pub fn first_non_finite(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> candle_core::Result<Option<(String, usize)>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = &tensors[name];
        if !t.dtype().is_float() || t.elem_count() == 0 {
            continue;
        }
        let t = t.to_dtype(candle_core::DType::F32)?;
        let probe: f32 = t.sub(&t)?.sum_all()?.to_scalar()?;
        if probe.is_finite() {
            continue;
        }
        let values: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let count = values.iter().filter(|v| !v.is_finite()).count();
        return Ok(Some((name.clone(), count)));
    }
    Ok(None)
}
