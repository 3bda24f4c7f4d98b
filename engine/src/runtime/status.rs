//! What an instance's runtime has done so far: the last committed epoch and offsets, the
//! source partitions' high watermarks and counts as the connector last saw them, the tasks
//! on this instance, and the failure that stopped it. The runtime and the connector write it
//! through [`crate::runtime::Runtime`]'s methods; embedders read a [`StatusSnapshot`].

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::sink::SinkHealth;

/// A (topic, partition).
pub type TopicPartition = (String, u32);

/// Progress shared by the workers, the connector and the readers.
#[derive(Default)]
pub(crate) struct Status {
    /// Last committed epoch.
    epoch: AtomicU64,
    /// Unix milliseconds of the last commit (0 before the first).
    last_commit_ms: AtomicU64,
    /// Last committed offset per (topic, partition).
    committed: Mutex<HashMap<TopicPartition, i64>>,
    /// Set when the runtime stopped on an error.
    failed: Mutex<Option<String>>,
    /// High watermark of each assigned (topic, partition), as the connector last saw it
    /// (negative while unknown).
    watermarks: Mutex<HashMap<TopicPartition, i64>>,
    /// Partition count of each source topic, as the connector last saw it.
    partitions: Mutex<HashMap<String, u32>>,
    /// The (topic, partition) of every task on this instance.
    tasks: Mutex<HashSet<TopicPartition>>,
    /// The tasks not yet caught up with their partition since they opened, with the offset
    /// they must reach (the partition's end when the first watermark after their opening
    /// came; `None` until then) and the last epoch committed before they opened (their rows
    /// are in the tables once a later epoch commits).
    restoring: Mutex<HashMap<TopicPartition, (Option<i64>, u64)>>,
    /// The partitions whose state is being read from their changelog before their task opens,
    /// with the changelog records still to read.
    changelog: Mutex<std::collections::BTreeMap<TopicPartition, i64>>,
    /// Per stage partition this instance wrote to, the offset after its last record there.
    stage_written: Mutex<HashMap<TopicPartition, i64>>,
    /// Whether the external database accepts batches.
    pub(crate) sink: Arc<SinkHealth>,
}

/// A copy of an instance's progress at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusSnapshot {
    /// Last committed epoch.
    pub epoch: u64,
    /// Unix milliseconds of the last commit, if any epoch was committed.
    pub last_commit_ms: Option<u64>,
    /// Last committed offset per (topic, partition).
    pub committed: HashMap<TopicPartition, i64>,
    /// Records not yet applied across the assigned partitions; `None` before any assignment
    /// or while a partition's high watermark is not known yet.
    pub lag: Option<i64>,
    /// The failure that stopped the runtime, if any.
    pub failure: Option<String>,
    /// Why the external database is not up to date, while it is not.
    pub sink_failure: Option<String>,
    /// Changelog records still to read before the partitions being restored from their
    /// changelogs open; `None` while none is.
    pub restore_remaining: Option<i64>,
}

impl Status {
    /// A copy of the progress now. Takes one lock at a time (the lag reads the committed
    /// offsets too).
    pub(crate) fn snapshot(&self) -> StatusSnapshot {
        let ms = self.last_commit_ms.load(Ordering::SeqCst);
        let committed = self.committed();
        let failure = self.failure();
        StatusSnapshot {
            epoch: self.epoch.load(Ordering::SeqCst),
            last_commit_ms: (ms > 0).then_some(ms),
            committed,
            lag: self.lag(),
            failure,
            sink_failure: self.sink.failure(),
            restore_remaining: self.restore_remaining(),
        }
    }

    /// Records that `partition` of `topic` has `remaining` changelog records to read before
    /// its task opens; `None`: its restore ended.
    pub(crate) fn changelog_restore(&self, topic: &str, partition: u32, remaining: Option<i64>) {
        let tp = (topic.to_string(), partition);
        let mut changelog = self.changelog.lock();
        match remaining {
            Some(r) => changelog.insert(tp, r),
            None => changelog.remove(&tp),
        };
    }

    /// Changelog records still to read across the partitions being restored.
    fn restore_remaining(&self) -> Option<i64> {
        let changelog = self.changelog.lock();
        (!changelog.is_empty()).then(|| changelog.values().sum())
    }

    /// Records not yet applied across the assigned partitions (see [`StatusSnapshot::lag`]).
    pub(crate) fn lag(&self) -> Option<i64> {
        let watermarks = self.watermarks.lock();
        if watermarks.is_empty() || watermarks.values().any(|high| *high < 0) {
            return None;
        }
        let committed = self.committed.lock();
        Some(
            watermarks
                .iter()
                .map(|(tp, high)| (high - committed.get(tp).map(|o| o + 1).unwrap_or(0)).max(0))
                .sum(),
        )
    }

    pub(crate) fn committed(&self) -> HashMap<TopicPartition, i64> {
        self.committed.lock().clone()
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }

    pub(crate) fn partition_count(&self, topic: &str) -> Option<u32> {
        self.partitions.lock().get(topic).copied()
    }

    /// Records an epoch's commit.
    pub(crate) fn epoch_committed(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_commit_ms
            .store(now.as_millis() as u64, Ordering::SeqCst);
    }

    /// Records the committed offsets of some partitions.
    pub(crate) fn offsets_committed(
        &self,
        offsets: impl IntoIterator<Item = (TopicPartition, i64)>,
    ) {
        self.committed.lock().extend(offsets);
    }

    pub(crate) fn set_failed(&self, failure: String) {
        *self.failed.lock() = Some(failure);
    }

    pub(crate) fn set_watermarks(&self, topics: &[&str], watermarks: HashMap<TopicPartition, i64>) {
        for (tp, (target, _)) in self.restoring.lock().iter_mut() {
            if target.is_none() {
                *target = watermarks.get(tp).copied().filter(|high| *high >= 0);
            }
        }
        let mut known = self.watermarks.lock();
        known.retain(|(topic, _), _| !topics.contains(&topic.as_str()));
        known.extend(watermarks);
    }

    pub(crate) fn add_partition_counts(&self, counts: impl IntoIterator<Item = (String, u32)>) {
        self.partitions.lock().extend(counts);
    }

    pub(crate) fn task_opened(&self, topic: &str, partition: u32) {
        let tp = (topic.to_string(), partition);
        let before = self.epoch.load(Ordering::SeqCst);
        self.restoring.lock().insert(tp.clone(), (None, before));
        self.tasks.lock().insert(tp);
    }

    pub(crate) fn task_dropped(&self, topic: &str, partition: u32) {
        let tp = (topic.to_string(), partition);
        self.tasks.lock().remove(&tp);
        self.restoring.lock().remove(&tp);
    }

    /// The partitions whose task has not caught up yet (see [`Status::restored`]), by topic,
    /// in order.
    pub(crate) fn restoring(&self) -> std::collections::BTreeMap<String, Vec<u32>> {
        let mut restoring = std::collections::BTreeMap::<String, Vec<u32>>::new();
        for (topic, partition) in self.changelog.lock().keys() {
            restoring.entry(topic.clone()).or_default().push(*partition);
        }
        for (topic, partitions) in self.owned() {
            let waiting: Vec<u32> = partitions
                .into_iter()
                .filter(|p| !self.restored(&topic, *p))
                .collect();
            if !waiting.is_empty() {
                restoring.entry(topic).or_default().extend(waiting);
            }
        }
        for partitions in restoring.values_mut() {
            partitions.sort_unstable();
            partitions.dedup();
        }
        restoring
    }

    /// Whether the task of `partition` of `topic` has caught up with the partition's end as
    /// it was when the task opened (its rows are then all in the tables); false while it
    /// restores, and for a partition without a task here.
    pub(crate) fn restored(&self, topic: &str, partition: u32) -> bool {
        let tp = (topic.to_string(), partition);
        if !self.tasks.lock().contains(&tp) {
            return false;
        }
        let mut restoring = self.restoring.lock();
        let Some(&(target, opened_after)) = restoring.get(&tp) else {
            return true;
        };
        // The task puts its rows back into the tables in the epoch it opened in.
        if self.epoch.load(Ordering::SeqCst) <= opened_after {
            return false;
        }
        let committed = self.committed.lock().get(&tp).map_or(0, |o| o + 1);
        // The end as known now may be below the target: the target can count a transaction
        // marker after the last record, which the connector's later reports leave out.
        let now = self.watermarks.lock().get(&tp).copied().filter(|n| *n >= 0);
        let end = match (target, now) {
            (Some(first), Some(now)) => Some(first.min(now)),
            (first, now) => first.or(now),
        };
        let done = end.is_some_and(|end| committed >= end);
        if done {
            restoring.remove(&tp);
        }
        done
    }

    /// The last offset of `partition` of `topic` committed here, if any.
    pub(crate) fn committed_offset(&self, topic: &str, partition: u32) -> Option<i64> {
        self.committed
            .lock()
            .get(&(topic.to_string(), partition))
            .copied()
    }

    /// Whether `partition` of `topic` has a task on this instance.
    pub(crate) fn owns(&self, topic: &str, partition: u32) -> bool {
        self.tasks.lock().contains(&(topic.to_string(), partition))
    }

    /// The partitions with a task on this instance, by topic, in order.
    pub(crate) fn owned(&self) -> std::collections::BTreeMap<String, Vec<u32>> {
        let mut owned = std::collections::BTreeMap::<String, Vec<u32>>::new();
        for (topic, partition) in self.tasks.lock().iter() {
            owned.entry(topic.clone()).or_default().push(*partition);
        }
        owned.values_mut().for_each(|ps| ps.sort_unstable());
        owned
    }

    /// Whether every partition of every topic in `topics` has its task on this instance.
    pub(crate) fn all_restored(&self, topics: &[&str]) -> bool {
        let restored = self.tasks.lock();
        let partitions = self.partitions.lock();
        topics.iter().all(|topic| {
            partitions
                .get(*topic)
                .is_some_and(|n| (0..*n).all(|p| restored.contains(&(topic.to_string(), p))))
        })
    }

    /// Whether every partition of `topic` has its task here, caught up with the partition's
    /// end as it was when the task opened (see [`Status::restored`]).
    pub(crate) fn restored_whole(&self, topic: &str) -> bool {
        let count = self.partition_count(topic);
        count.is_some_and(|n| (0..n).all(|p| self.restored(topic, p)))
    }

    /// Records that this instance wrote a stage's records to `partition` of `topic` up to
    /// `next` (the offset after the last one).
    pub(crate) fn stage_written(&self, topic: &str, partition: u32, next: i64) {
        let mut written = self.stage_written.lock();
        let end = written
            .entry((topic.to_string(), partition))
            .or_insert(next);
        *end = (*end).max(next);
    }

    /// The end (offset after the last record) of the stage records this instance wrote to
    /// each partition, in order.
    pub(crate) fn stage_writes(&self) -> Vec<crate::sink::Offset> {
        let mut written: Vec<crate::sink::Offset> = self
            .stage_written
            .lock()
            .iter()
            .map(|((topic, partition), next)| crate::sink::Offset {
                topic: topic.clone(),
                partition: *partition,
                offset: *next,
            })
            .collect();
        written.sort_unstable_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        written
    }

    /// Whether every task on this instance is read up to its high watermark (as of the last
    /// commit; a task whose watermark is not known yet is not), every partition of every
    /// topic in `everywhere` has its task here, and every stage record this instance wrote
    /// to a partition it reads was read back (the high watermarks, reported every second,
    /// may not count them yet).
    pub(crate) fn caught_up_here(&self, everywhere: &[&str]) -> bool {
        let tasks = self.tasks.lock().clone();
        let known = {
            let watermarks = self.watermarks.lock();
            tasks
                .iter()
                .all(|tp| watermarks.get(tp).is_some_and(|h| *h >= 0))
        };
        if !known {
            return false;
        }
        let written = self.stage_written.lock().clone();
        let read_back = written.iter().all(|((topic, partition), next)| {
            !self.owns(topic, *partition)
                || self
                    .committed_offset(topic, *partition)
                    .is_some_and(|c| c + 1 >= *next)
        });
        read_back && self.lag() == Some(0) && self.all_restored(everywhere)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: u32) -> TopicPartition {
        ("t".to_string(), p)
    }

    #[test]
    fn stage_records_written_here_are_caught_up_once_read_back() {
        let s = Status::default();
        s.task_opened("t", 0);
        s.task_opened("u", 0);
        s.set_watermarks(&["t"], HashMap::from([(tp(0), 5)]));
        s.offsets_committed([(tp(0), 4)]);
        assert!(!s.caught_up_here(&[]), "the end of `u` is not known yet");
        s.task_dropped("u", 0);
        assert!(s.caught_up_here(&[]));
        // Written up to offset 7 (the watermarks do not say so yet).
        s.stage_written("t", 0, 8);
        assert!(!s.caught_up_here(&[]), "its own records are not read yet");
        s.offsets_committed([(tp(0), 7)]);
        assert!(s.caught_up_here(&[]));
        // A partition read by another instance does not hold this one back.
        s.stage_written("t", 1, 3);
        assert!(s.caught_up_here(&[]));
    }

    #[test]
    fn a_partition_is_restored_once_committed_up_to_its_end_at_its_coming() {
        let s = Status::default();
        assert!(!s.restored("t", 0), "not owned");
        s.task_opened("t", 0);
        assert!(!s.restored("t", 0), "no end known yet");
        s.set_watermarks(&["t"], HashMap::from([(tp(0), 10)]));
        s.offsets_committed([(tp(0), 5)]);
        assert!(!s.restored("t", 0));
        assert_eq!(
            s.restoring(),
            std::collections::BTreeMap::from([("t".to_string(), vec![0])])
        );
        s.set_watermarks(&["t"], HashMap::from([(tp(0), 20)]));
        s.offsets_committed([(tp(0), 9)]);
        assert!(
            !s.restored("t", 0),
            "the end is reached, but its rows are not committed yet"
        );
        s.epoch_committed(1);
        assert!(s.restored("t", 0), "the end when it came is reached");
        s.set_watermarks(&["t"], HashMap::from([(tp(0), 30)]));
        assert!(
            s.restored("t", 0),
            "and stays restored as the partition grows"
        );
        s.task_dropped("t", 0);
        assert!(!s.restored("t", 0), "gone");
    }

    #[test]
    fn an_end_counting_a_transaction_marker_does_not_hold_a_restore_back() {
        let s = Status::default();
        s.task_opened("t", 1);
        // The first end counts the marker after the last record (offset 8).
        s.set_watermarks(&["t"], HashMap::from([(tp(1), 10)]));
        s.offsets_committed([(tp(1), 8)]);
        s.epoch_committed(1);
        assert!(!s.restored("t", 1));
        // Later reports know the last record handed over.
        s.set_watermarks(&["t"], HashMap::from([(tp(1), 9)]));
        assert!(s.restored("t", 1));
    }
}
