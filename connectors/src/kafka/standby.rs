//! Standby replicas: warm copies of other instances' task states, fed from their changelogs.
//!
//! With `--standby-replicas N`, each source partition's task state is kept by up to N instances
//! besides its owner. Each instance works out for itself, from the instances' records (see
//! [`super::membership`]), which partitions it stands by for: those that range assignment, the
//! consumer group's, would give it if their owner left (and, for the second replica, if the
//! first standby left too). A standby is therefore the likely next owner. It tails the
//! partition's changelog into its state directory and records how far it got, as an owner's
//! commit does. When the partition is assigned to it, the restore (see [`super::changelog`])
//! starts from there: only what the standby had not read yet is read before the task opens.
//!
//! When the owner logs its rows (`--standby-replicas` on the owner: see
//! [`miroir_engine::runtime::RuntimeConfig::log_rows`]), a standby keeps the rows of the
//! partition's keys too, and answers queries for them while the partition has no owner that
//! can, marked stale with its lag.
//!
//! The owner's task and the standby never touch the same task state: the source [`claim`]s a
//! partition before it restores it, and [`release`]s it once revoked.
//!
//! [`claim`]: Standbys::claim
//! [`release`]: Standbys::release

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use miroir_engine::changelog::{Restore, RestoreError};
use miroir_engine::metrics::Metrics;
use miroir_engine::state::{StateStore, StoreError};
use miroir_engine::topology::Topology;
use parking_lot::Mutex;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{error, info, warn};

use super::admin::topics;
use super::changelog::{reader, skip_malformed, topic};
use super::membership::Member;
use super::tail::TailContext;
use super::{KafkaConfig, KafkaError};

/// How often the partitions stood by for are worked out again.
const PLAN_EVERY: Duration = Duration::from_secs(1);
/// How often a standby records how far it got (when it read anything).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Longest one read of the changelogs holds the standbys (a claim waits for it).
const POLL: Duration = Duration::from_millis(50);

/// A task (source index, partition).
type Task = (usize, u32);

/// The partitions `me` stands by for, as (source topic, partition): for each partition another
/// live instance owns, the instance range assignment would give it to if its owner left; with
/// more `replicas`, the next one if that one left too, and so on. `counts` holds the partition
/// count of each source topic. `live` is sorted by instance id, as the consumer group sorts
/// static members (and members whose ids start with their instance id).
pub fn standby_for(
    live: &[Member],
    me: &str,
    replicas: usize,
    counts: &HashMap<String, u32>,
) -> BTreeSet<(String, u32)> {
    let mut mine = BTreeSet::new();
    for owner in live.iter().filter(|m| m.instance != me) {
        for (topic, partitions) in &owner.partitions {
            let Some(&count) = counts.get(topic) else {
                continue;
            };
            for &p in partitions.iter().filter(|p| **p < count) {
                let mut others: Vec<&str> = live
                    .iter()
                    .map(|m| m.instance.as_str())
                    .filter(|i| *i != owner.instance)
                    .collect();
                for _ in 0..replicas {
                    if others.is_empty() {
                        break;
                    }
                    let next = others.remove(range_member(p, count, others.len()));
                    if next == me {
                        mine.insert((topic.clone(), p));
                        break;
                    }
                }
            }
        }
    }
    mine
}

/// Which of `members` members (sorted) range assignment gives partition `p` of `count`: each
/// gets `count / members` consecutive partitions, the first `count % members` one more.
fn range_member(p: u32, count: u32, members: usize) -> usize {
    let (k, p) = (members as u32, p);
    let (q, r) = (count / k, count % k);
    let idx = if p < r * (q + 1) {
        p / (q + 1)
    } else {
        r + (p - r * (q + 1)) / q.max(1)
    };
    (idx as usize).min(members - 1)
}

/// One partition being stood by for.
struct Tailing {
    restore: Restore,
    /// The next changelog offset to read.
    next: i64,
    checkpointed: Instant,
}

/// The standbys' mutable part: their consumer and tasks.
struct Tailer {
    consumer: BaseConsumer<TailContext>,
    tasks: HashMap<Task, Tailing>,
    /// Tasks the instance owns: never stood by for.
    owned: HashSet<Task>,
}

/// What the membership record says of the standbys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StandbySummary {
    /// The partitions stood by for, by source topic.
    pub partitions: BTreeMap<String, Vec<u32>>,
    /// Changelog records not applied yet across them, when known.
    pub lag: Option<i64>,
}

/// This instance's standby replicas (see the module's documentation).
pub struct Standbys {
    topology: Topology,
    store: StateStore,
    metrics: Arc<Metrics>,
    /// The changelog topic of each source, by the source's position.
    changelogs: Vec<String>,
    /// Partition count of each source topic.
    counts: HashMap<String, u32>,
    tailer: Mutex<Tailer>,
    summary: Mutex<StandbySummary>,
}

impl Standbys {
    /// Standbys of `topology`'s tasks in `store`, none yet: they start with [`Standbys::start`].
    pub fn new(
        config: &KafkaConfig,
        topology: &Topology,
        store: StateStore,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Standbys>, KafkaError> {
        let consumer = reader(config, "standby")?;
        let existing: HashMap<String, i32> = topics(consumer.client())?.into_iter().collect();
        let counts = topology
            .sources
            .iter()
            .filter_map(|s| Some((s.topic.clone(), *existing.get(&s.topic)? as u32)))
            .collect();
        Ok(Arc::new(Standbys {
            changelogs: (0..topology.sources.len())
                .map(|i| topic(topology, i))
                .collect(),
            topology: topology.clone(),
            store,
            metrics,
            counts,
            tailer: Mutex::new(Tailer {
                consumer,
                tasks: HashMap::new(),
                owned: HashSet::new(),
            }),
            summary: Mutex::new(StandbySummary::default()),
        }))
    }

    /// Starts standing by as instance `me` for up to `replicas` copies of each partition, among
    /// the instances `live` returns.
    pub fn start(
        self: &Arc<Self>,
        me: &str,
        replicas: usize,
        live: impl Fn() -> Vec<Member> + Send + 'static,
    ) -> Result<StandbyRunner, KafkaError> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("miroir-standby".into())
            .spawn({
                let (standbys, stop, me) = (self.clone(), stop.clone(), me.to_string());
                move || standbys.run(&stop, &me, replicas, live)
            })
            .map_err(|source| KafkaError::Thread {
                name: "standby",
                source,
            })?;
        Ok(StandbyRunner {
            stop,
            thread: Some(thread),
        })
    }

    /// The partitions stood by for, and their lag.
    pub fn summary(&self) -> StandbySummary {
        self.summary.lock().clone()
    }

    /// The changelog records the standby of `partition` of source topic `topic` has not read
    /// yet, if this instance stands by for it.
    pub fn lag(&self, topic: &str, partition: u32) -> Option<i64> {
        let summary = self.summary.lock();
        summary
            .partitions
            .get(topic)
            .is_some_and(|ps| ps.contains(&partition))
            .then(|| {
                self.metrics
                    .changelog
                    .standby_lag
                    .get_metric_with_label_values(&[topic, &partition.to_string()])
                    .map(|g| g.get())
                    .unwrap_or(0)
            })
    }

    /// The instance takes `tasks` (assigned to it): each one stood by for records how far its
    /// standby got and stops; none is stood by for until [`Standbys::release`]d.
    pub fn claim(&self, tasks: &[Task]) {
        let mut tailer = self.tailer.lock();
        let mut promoted = false;
        for task in tasks {
            tailer.owned.insert(*task);
            if let Some(tailing) = tailer.tasks.remove(task) {
                promoted = true;
                self.metrics.changelog.promotions.inc();
                info!(topic = %self.changelogs[task.0], partition = task.1, at = tailing.next, "standby promoted: the partition's restore starts from its copy");
                self.stop_tailing(*task, tailing);
            }
            // The owner's rows are its tables'; standby rows would only grow old.
            if let Err(e) = self.store.drop_standby_rows(task.0, task.1) {
                error!(topic = %self.changelogs[task.0], partition = task.1, error = %e, "cannot drop the standby rows of a partition assigned here");
            }
        }
        if promoted {
            self.reassign(&tailer);
        }
    }

    /// The instance no longer owns `tasks` (revoked): they may be stood by for again.
    pub fn release(&self, tasks: &[Task]) {
        let mut tailer = self.tailer.lock();
        for task in tasks {
            tailer.owned.remove(task);
        }
    }

    fn run(&self, stop: &AtomicBool, me: &str, replicas: usize, live: impl Fn() -> Vec<Member>) {
        info!(instance = %me, replicas, "standing by for other instances' partitions");
        let mut planned: Option<Instant> = None;
        while !stop.load(Ordering::Acquire) {
            if planned.is_none_or(|at| at.elapsed() >= PLAN_EVERY) {
                planned = Some(Instant::now());
                let live = live();
                let wanted = standby_for(&live, me, replicas, &self.counts);
                let claimed: HashSet<(String, u32)> = live
                    .iter()
                    .flat_map(|m| {
                        m.partitions
                            .iter()
                            .flat_map(|(t, ps)| ps.iter().map(|p| (t.clone(), *p)))
                    })
                    .collect();
                self.follow(&wanted, &claimed);
            }
            let busy = self.read();
            if !busy {
                std::thread::sleep(POLL);
            }
        }
        let mut tailer = self.tailer.lock();
        let tasks: Vec<(Task, Tailing)> = tailer.tasks.drain().collect();
        for (task, tailing) in tasks {
            self.stop_tailing(task, tailing);
        }
    }

    /// Starts standing by for the tasks of `wanted` not stood by for yet, and stops for those
    /// no longer in it that a live instance owns (`claimed`, by topic and partition). A task
    /// whose owner is gone is stood by for until it is assigned: it is likely to come here.
    fn follow(&self, wanted: &BTreeSet<(String, u32)>, claimed: &HashSet<(String, u32)>) {
        let task = |(t, p): &(String, u32)| {
            let source = self
                .topology
                .sources
                .iter()
                .position(|s| &s.topic == t && !s.global)?;
            Some((source, *p))
        };
        let wanted: HashSet<Task> = wanted.iter().filter_map(task).collect();
        let claimed: HashSet<Task> = claimed.iter().filter_map(task).collect();
        let mut tailer = self.tailer.lock();
        let stale: Vec<Task> = tailer
            .tasks
            .keys()
            .filter(|t| !wanted.contains(t) && claimed.contains(t))
            .copied()
            .collect();
        let new: Vec<Task> = wanted
            .iter()
            .filter(|t| !tailer.tasks.contains_key(t) && !tailer.owned.contains(t))
            .copied()
            .collect();
        if stale.is_empty() && new.is_empty() {
            self.summarize(&tailer);
            return;
        }
        for task in stale {
            if let Some(tailing) = tailer.tasks.remove(&task) {
                self.stop_tailing(task, tailing);
            }
        }
        for task in new {
            match self.begin(&tailer.consumer, task) {
                Ok(tailing) => {
                    tailer.tasks.insert(task, tailing);
                }
                Err(e) => {
                    warn!(topic = %self.changelogs[task.0], partition = task.1, error = %e, "cannot stand by for this partition now; trying again later")
                }
            }
        }
        self.reassign(&tailer);
        self.summarize(&tailer);
    }

    /// Starts standing by for `task`: from the state directory's position when the changelog
    /// still holds it, from the changelog's start (the local state dropped) otherwise.
    fn begin(
        &self,
        consumer: &BaseConsumer<TailContext>,
        task: Task,
    ) -> Result<Tailing, KafkaError> {
        let (source, partition) = task;
        let changelog = &self.changelogs[source];
        let src_topic = &self.topology.sources[source].topic;
        let (low, high) =
            consumer.fetch_watermarks(changelog, partition as i32, Duration::from_secs(10))?;
        // The rows kept must be complete up to the position: after this instance owned the
        // partition (its commits moved the position, not the rows), it reads everything again.
        let rows_at = self.store.standby_rows_at(source, partition)?;
        let (next, whole) = match self.store.changelog_position(source, partition)? {
            Some(p) if p >= low && p <= high && rows_at == Some(p) => (p, false),
            _ => (low, true),
        };
        let restore = Restore::standby(&self.store, task, src_topic, whole)?;
        self.metrics
            .changelog
            .standby_lag
            .with_label_values(&[src_topic.as_str(), &partition.to_string()])
            .set((high - next).max(0));
        info!(topic = %changelog, partition, from = next, to = high, whole, "standing by for a partition");
        Ok(Tailing {
            restore,
            next,
            checkpointed: Instant::now(),
        })
    }

    /// Records how far the standby of `task` got, and stops it.
    fn stop_tailing(&self, task: Task, tailing: Tailing) {
        let src_topic = &self.topology.sources[task.0].topic;
        let _ = self
            .metrics
            .changelog
            .standby_lag
            .remove_label_values(&[src_topic.as_str(), &task.1.to_string()]);
        if let Err(e) = tailing.restore.finish(tailing.next) {
            error!(topic = %self.changelogs[task.0], partition = task.1, error = %e, "cannot record the standby's position");
        }
    }

    /// Assigns the standbys' consumer every task stood by for, at its next offset.
    fn reassign(&self, tailer: &Tailer) {
        let mut tpl = TopicPartitionList::new();
        for ((source, partition), tailing) in &tailer.tasks {
            let _ = tpl.add_partition_offset(
                &self.changelogs[*source],
                *partition as i32,
                Offset::Offset(tailing.next),
            );
        }
        if let Err(e) = tailer.consumer.assign(&tpl) {
            warn!(error = %e, "cannot assign the standbys' changelog partitions");
        }
    }

    /// Reads what the changelogs have for the standbys, for up to [`POLL`]; whether it read
    /// anything.
    fn read(&self) -> bool {
        let mut guard = self.tailer.lock();
        let tailer = &mut *guard;
        if tailer.tasks.is_empty() {
            return false;
        }
        let polled = tailer.consumer.poll(POLL);
        let read = polled.is_some();
        let mut failed = None;
        match polled {
            Some(Ok(m)) => {
                let task = self
                    .changelogs
                    .iter()
                    .position(|t| t == m.topic())
                    .map(|s| (s, m.partition() as u32));
                if let Some((task, tailing)) =
                    task.and_then(|t| Some((t, tailer.tasks.get_mut(&t)?)))
                {
                    if let Err(e) = self.apply(task, tailing, &m) {
                        error!(topic = %m.topic(), partition = m.partition(), offset = m.offset(), error = %e, "cannot apply a changelog record to the standby; it stops");
                        failed = Some(task);
                    }
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => {}
            Some(Err(e)) => warn!(error = %e, "reading the standbys' changelogs"),
        }
        if let Some(task) = failed {
            tailer.tasks.remove(&task);
            self.reassign(tailer);
        }
        self.checkpoint(tailer);
        read
    }

    fn apply(
        &self,
        task: Task,
        tailing: &mut Tailing,
        m: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Result<(), StoreError> {
        let src_topic = self.topology.sources[task.0].topic.as_str();
        tailing.next = m.offset() + 1;
        match tailing.restore.apply(m.key(), m.payload()) {
            Ok(()) => {}
            Err(RestoreError::Malformed(e)) => skip_malformed(
                &self.metrics,
                (m.topic(), src_topic),
                task.1,
                m.offset(),
                &e,
            ),
            Err(RestoreError::Store(e)) => return Err(e),
        }
        self.metrics
            .changelog
            .standby_records
            .with_label_values(&[src_topic])
            .inc();
        Ok(())
    }

    /// Records how far each standby that read something got, at most every
    /// [`CHECKPOINT_EVERY`], and updates its lag.
    fn checkpoint(&self, tailer: &mut Tailer) {
        let Tailer {
            consumer, tasks, ..
        } = tailer;
        let mut failed = Vec::new();
        let positions = consumer.position().ok();
        for (task, tailing) in tasks.iter_mut() {
            if tailing.checkpointed.elapsed() < CHECKPOINT_EVERY {
                continue;
            }
            tailing.checkpointed = Instant::now();
            // Past the markers of the transactions read, which are never delivered.
            if let Some(Offset::Offset(p)) = positions
                .as_ref()
                .and_then(|ps| ps.find_partition(&self.changelogs[task.0], task.1 as i32))
                .map(|e| e.offset())
            {
                tailing.next = tailing.next.max(p);
            }
            let src_topic = &self.topology.sources[task.0].topic;
            if let Ok((_, high)) = consumer.fetch_watermarks(
                &self.changelogs[task.0],
                task.1 as i32,
                Duration::from_secs(1),
            ) {
                self.metrics
                    .changelog
                    .standby_lag
                    .with_label_values(&[src_topic.as_str(), &task.1.to_string()])
                    .set((high - tailing.next).max(0));
            }
            if tailing.restore.records() == 0 {
                continue;
            }
            let done = Restore::standby(&self.store, *task, src_topic, false)
                .map(|fresh| std::mem::replace(&mut tailing.restore, fresh))
                .and_then(|full| full.finish(tailing.next));
            if let Err(e) = done {
                error!(topic = %self.changelogs[task.0], partition = task.1, error = %e, "cannot record the standby's position; it stops");
                failed.push(*task);
            }
        }
        for task in &failed {
            tasks.remove(task);
        }
        if !failed.is_empty() {
            self.reassign(tailer);
        }
        self.summarize(tailer);
    }

    fn summarize(&self, tailer: &Tailer) {
        let mut summary = StandbySummary::default();
        for (source, partition) in tailer.tasks.keys() {
            let topic = &self.topology.sources[*source].topic;
            summary
                .partitions
                .entry(topic.clone())
                .or_default()
                .push(*partition);
            let lag = self
                .metrics
                .changelog
                .standby_lag
                .get_metric_with_label_values(&[topic.as_str(), &partition.to_string()])
                .map(|g| g.get())
                .unwrap_or(0);
            summary.lag = Some(summary.lag.unwrap_or(0) + lag);
        }
        for ps in summary.partitions.values_mut() {
            ps.sort_unstable();
        }
        *self.summary.lock() = summary;
    }
}

/// The running standby thread; dropping it stops it, each standby recording its position.
pub struct StandbyRunner {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for StandbyRunner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, partitions: &[u32]) -> Member {
        Member {
            instance: id.into(),
            advertise: None,
            partitions: BTreeMap::from([("user".to_string(), partitions.to_vec())]),
            restoring: BTreeMap::new(),
            lag: None,
            restore_remaining: None,
            standby: BTreeMap::new(),
            standby_lag: None,
            at_ms: 0,
        }
    }

    #[test]
    fn range_assignment_gives_the_first_members_one_more() {
        let owners: Vec<usize> = (0..4).map(|p| range_member(p, 4, 3)).collect();
        assert_eq!(owners, [0, 0, 1, 2]);
        let owners: Vec<usize> = (0..4).map(|p| range_member(p, 4, 2)).collect();
        assert_eq!(owners, [0, 0, 1, 1]);
        // More members than partitions: one each, the last members none.
        let owners: Vec<usize> = (0..2).map(|p| range_member(p, 2, 3)).collect();
        assert_eq!(owners, [0, 1]);
    }

    #[test]
    fn the_standby_is_who_would_own_the_partition_if_its_owner_left() {
        let counts = HashMap::from([("user".to_string(), 4)]);
        let live = [member("a", &[0, 1]), member("b", &[2]), member("c", &[3])];
        // Without a, b gets 0 and 1; without b, c gets 2 (a takes 0 and 1); without c, b
        // gets 3.
        let of = |me| standby_for(&live, me, 1, &counts);
        let user = |ps: &[u32]| ps.iter().map(|p| ("user".to_string(), *p)).collect();
        assert_eq!(of("a"), BTreeSet::new());
        assert_eq!(of("b"), user(&[0, 1, 3]));
        assert_eq!(of("c"), user(&[2]));
        // Two replicas: the next one after the first standby as well.
        assert_eq!(standby_for(&live, "c", 2, &counts), user(&[0, 1, 2]));
        // No replicas, or nobody else: nothing.
        assert!(standby_for(&live, "b", 0, &counts).is_empty());
        assert!(standby_for(&live[..1], "a", 1, &counts).is_empty());
    }
}
