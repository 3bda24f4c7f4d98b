//! Which source partitions are behind (catching up): epochs grow while any is.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

/// The partitions whose last applied batch said more records were waiting at the source (as
/// of applying, not of reading: the inboxes may hold the rest of the backlog). Epochs are
/// global, so every worker grows its epoch while any partition is behind: a worker whose own
/// partitions have not delivered yet would otherwise end its epoch early and then wait, unable
/// to read its inbox, for the others.
#[derive(Default)]
pub(super) struct Backlog {
    partitions: Mutex<HashSet<(usize, u32)>>,
    /// Whether `partitions` is not empty (read on every message by the workers).
    any: AtomicBool,
}

impl Backlog {
    pub(super) fn update(&self, change: impl FnOnce(&mut HashSet<(usize, u32)>)) {
        let mut partitions = self.partitions.lock();
        change(&mut partitions);
        self.any.store(!partitions.is_empty(), Ordering::Release);
    }

    pub(super) fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }
}
