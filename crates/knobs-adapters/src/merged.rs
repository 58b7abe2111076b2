//! What a merge folded into the base weights beyond the adapter's own parameters (DoRA's
//! norm, OFT's change), kept so that the unmerge subtracts exactly that.
use std::sync::Mutex;

/// Set by `merge` (which takes `&self`), read by the `unmerge` that follows it. A copy of the
/// adapter copies it.
#[derive(Debug)]
pub struct Merged<T>(Mutex<Option<T>>);

impl<T> Default for Merged<T> {
    fn default() -> Self {
        Merged(Mutex::new(None))
    }
}

impl<T: Clone> Merged<T> {
    pub fn set(&self, value: T) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    }
    /// What the last merge kept; the slot calls `unmerge` only after a merge.
    pub fn get(&self) -> T {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone().expect("unmerge follows a merge")
    }
}

impl<T: Clone> Clone for Merged<T> {
    fn clone(&self) -> Self {
        Merged(Mutex::new(self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()))
    }
}
