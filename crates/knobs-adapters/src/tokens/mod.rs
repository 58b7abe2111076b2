//! Textual inversion as an adapter: the rows of new tokens live apart from the token table, so
//! training them leaves every other row (and every weight of the model) bit-identical and
//! gives the optimizer nothing else to touch. The table still has rows for the new ids
//! (resized beforehand, as `resize_token_embeddings` does); the adapter overrides what
//! those rows produce.
use knobs_nn::adapter::{Adapter, EmbeddingAdapter};
use knobs_nn::burn::tensor::module::embedding;
use knobs_nn::burn::tensor::{Int, Tensor};
use knobs_nn::{Embedding, ParamMut, ParamRef, Visitor, VisitorMut, join};

use crate::{AdapterError, Result};

pub const METHOD: &str = crate::PeftType::Tokens.as_str();

#[derive(Debug, Clone)]
pub struct TokenRows {
    /// Id of the first new token; the rows cover `first_id..first_id + rows`.
    pub first_id: usize,
    /// `[new tokens, dim]`: the trained vectors.
    pub rows: Tensor<2>,
    /// The table's rows before training, restored by `unmerge`.
    original: Tensor<2>,
}

impl TokenRows {
    pub fn num_tokens(&self) -> usize {
        self.rows.dims()[0]
    }
}

/// Attaches trainable rows for ids `first_id..` of `table`, initialised from the table's
/// current rows there (e.g. copies of an initializer token). The rows are trainable; the
/// table is left as it is.
pub fn attach(table: &mut Embedding, name: &str, first_id: usize, count: usize) -> Result<()> {
    let [n, dim] = table.weight.dims();
    if count == 0 || first_id + count > n {
        return Err(AdapterError::Config(format!(
            "token rows {first_id}..{} do not fit a table of {n} rows; resize the token embeddings first",
            first_id + count
        )));
    }
    let original = knobs_nn::param::f32_value(&table.weight).inner().slice([first_id..first_id + count, 0..dim]);
    let rows = original.clone().autodiff().require_grad();
    table.adapters.insert(name, Box::new(TokenRows { first_id, rows, original }));
    Ok(())
}

impl Adapter for TokenRows {
    fn method(&self) -> &'static str {
        METHOD
    }
    fn visit(&self, layer: &str, adapter: &str, v: &mut dyn Visitor) {
        v.param(&join(layer, &format!("token_rows.{adapter}")), ParamRef::D2(&self.rows));
    }
    fn visit_mut(&mut self, layer: &str, adapter: &str, v: &mut dyn VisitorMut) {
        v.param(&join(layer, &format!("token_rows.{adapter}")), ParamMut::D2(&mut self.rows));
    }
}

impl EmbeddingAdapter for TokenRows {
    fn output(&self, ids: &Tensor<2, Int>, y: Tensor<3>, weight: f32) -> Tensor<3> {
        let [b, l, dim] = y.dims();
        let (first, k) = (self.first_id as i64, self.num_tokens() as i64);
        let mine = ids.clone().greater_equal_elem(first).bool_and(ids.clone().lower_elem(first + k));
        let local = ids.clone().sub_scalar(first).clamp(0, k - 1);
        let mut rows = self.rows.clone();
        if weight != 1.0 {
            rows = rows * weight;
        }
        let new = embedding(rows, local);
        y.mask_where(mine.unsqueeze_dim::<3>(2).expand([b, l, dim]), new)
    }
    fn merge(&self, table: Tensor<2>, weight: f32) -> knobs_nn::Result<Tensor<2>> {
        let dim = table.dims()[1];
        let rows = self.rows.clone().inner() * weight;
        Ok(table.slice_assign([self.first_id..self.first_id + self.num_tokens(), 0..dim], rows))
    }
    fn unmerge(&self, table: Tensor<2>, _weight: f32) -> Tensor<2> {
        let dim = table.dims()[1];
        table.slice_assign([self.first_id..self.first_id + self.num_tokens(), 0..dim], self.original.clone())
    }
}

#[cfg(test)]
mod tests {
    use knobs_nn::burn::tensor::TensorData;
    use knobs_nn::{Init, ModuleExt, cpu_autodiff};

    use super::*;

    #[test]
    fn only_the_new_rows_train_and_merge_matches_forward() {
        let dev = cpu_autodiff();
        let mut table = Embedding::new(6, 3, &mut Init::new(0), &dev);
        attach(&mut table, "ti", 4, 2).unwrap();
        table.train_only(|p| p.contains("token_rows"));
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 4, 5, 2], [2, 2]), &dev);
        let y = table.forward(ids.clone());
        let g = (y.clone() * y.clone()).sum().backward();
        let mut grads = Vec::new();
        table.for_each_param(|path, p| grads.push((path.to_string(), p.grad(&g).is_some())));
        assert_eq!(grads, vec![("weight".to_string(), false), ("token_rows.ti".to_string(), true)]);
        // Give the rows new values, then merged lookups must equal the adapter's output.
        table.for_each_param_mut(|path, mut p| {
            if path.contains("token_rows") {
                p.replace_flat(Tensor::from_floats([1.0f32, 2., 3., 4., 5., 6.].as_slice(), &dev));
            }
        });
        let live: Vec<f32> = table.forward(ids.clone()).into_data().convert::<f32>().try_into_vec().unwrap();
        assert_eq!(&live[3..9], &[1., 2., 3., 4., 5., 6.]);
        let before: Vec<f32> = table.weight.to_data().convert::<f32>().try_into_vec().unwrap();
        assert!(table.merge_adapter("ti").unwrap());
        let merged: Vec<f32> = table.forward(ids.clone()).into_data().convert::<f32>().try_into_vec().unwrap();
        assert_eq!(live, merged);
        assert!(table.unmerge_adapter("ti"));
        let after: Vec<f32> = table.weight.to_data().convert::<f32>().try_into_vec().unwrap();
        assert_eq!(before, after, "unmerge restores the table exactly");
    }
}
