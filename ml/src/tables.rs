//! The embedding tables of a model and where their rows live: this process's [`Tables`], or any other
//! [`RowStore`] (parameter-server shards).

use crate::embedding::EmbeddingTable;

/// First-order weights (width 1) and factor rows (width `embeddingDim`) of every categorical field. A row is
/// keyed by `field << 48 | index`, so fields never share rows.
#[derive(Clone)]
pub struct Tables {
    pub first_order: EmbeddingTable,
    pub factors: Option<EmbeddingTable>,
}

/// The two embedding tables of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    /// One weight per row: the linear (wide) term.
    FirstOrder,
    /// `embeddingDim` weights per row: the factors of FM and the deep part.
    Factors,
}

/// Where embedding rows live: this process's [`Tables`], or parameter-server shards.
pub trait RowStore {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Appends the rows of `keys` (creating missing ones) to `out`. Training passes each row once per step.
    fn gather(
        &mut self,
        table: TableKind,
        keys: &[u64],
        out: &mut Vec<f32>,
    ) -> Result<(), Self::Error>;
    /// Applies one optimizer step to the rows of `keys` given their gradients.
    fn apply(&mut self, table: TableKind, keys: &[u64], grads: &[f32]) -> Result<(), Self::Error>;
}

impl Tables {
    pub fn table_mut(&mut self, kind: TableKind) -> Option<&mut EmbeddingTable> {
        match kind {
            TableKind::FirstOrder => Some(&mut self.first_order),
            TableKind::Factors => self.factors.as_mut(),
        }
    }
}

impl RowStore for Tables {
    type Error = std::convert::Infallible;

    fn gather(
        &mut self,
        table: TableKind,
        keys: &[u64],
        out: &mut Vec<f32>,
    ) -> Result<(), Self::Error> {
        if let Some(table) = self.table_mut(table) {
            table.gather_into(keys, out);
        }
        Ok(())
    }

    fn apply(&mut self, table: TableKind, keys: &[u64], grads: &[f32]) -> Result<(), Self::Error> {
        if let Some(table) = self.table_mut(table) {
            table.apply_gradients(keys, grads);
        }
        Ok(())
    }
}

/// Row key of `index` in categorical field `field`.
pub fn row_key(field: usize, index: u64) -> u64 {
    ((field as u64) << 48) | (index & ((1 << 48) - 1))
}
