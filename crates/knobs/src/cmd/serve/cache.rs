//! Which adapters stay attached to the served pipeline: least recently used first out, within
//! a byte budget. Pure bookkeeping; the worker attaches and deletes what it says.

/// Loaded adapters by recency (the last is the most recently used) with their sizes.
#[derive(Debug, Default)]
pub struct Lru {
    budget: u64,
    entries: Vec<(String, u64)>,
}

impl Lru {
    pub fn new(budget_bytes: u64) -> Self {
        Lru { budget: budget_bytes, entries: Vec::new() }
    }

    /// Marks `name` used now; false when it is not loaded.
    pub fn touch(&mut self, name: &str) -> bool {
        match self.entries.iter().position(|(n, _)| n == name) {
            Some(i) => {
                let e = self.entries.remove(i);
                self.entries.push(e);
                true
            }
            None => false,
        }
    }

    /// Records `name` as loaded and returns what must be unloaded to stay within the budget,
    /// least recently used first, never one of `keep` (the request's own adapters: a request
    /// larger than the budget still runs, and its adapters go first next time).
    pub fn insert(&mut self, name: &str, bytes: u64, keep: &[&str]) -> Vec<String> {
        self.remove(name);
        self.entries.push((name.to_string(), bytes));
        let mut evicted = Vec::new();
        while self.bytes() > self.budget {
            let Some(i) = self.entries.iter().position(|(n, _)| !keep.contains(&n.as_str())) else { break };
            evicted.push(self.entries.remove(i).0);
        }
        evicted
    }

    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(n, _)| n != name);
        self.entries.len() != before
    }

    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|(_, b)| b).sum()
    }

    /// Loaded names, least recently used first.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|(n, _)| n.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_within_the_budget() {
        let mut lru = Lru::new(250);
        assert!(lru.insert("a", 100, &["a"]).is_empty());
        assert!(lru.insert("b", 100, &["b"]).is_empty());
        assert!(lru.touch("a"));
        assert_eq!(lru.insert("c", 100, &["c"]), vec!["b"], "b is the least recently used");
        assert_eq!(lru.names(), vec!["a", "c"]);
        assert!(!lru.touch("b"));
        // A request's own adapters stay, even over the budget.
        assert_eq!(lru.insert("d", 300, &["d", "c"]), vec!["a"]);
        assert_eq!(lru.names(), vec!["c", "d"]);
        assert_eq!(lru.bytes(), 400);
        assert_eq!(lru.insert("e", 10, &["e"]), vec!["c", "d"]);
        assert!(lru.remove("e") && lru.names().is_empty() && lru.bytes() == 0);
    }
}
