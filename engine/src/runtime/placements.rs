//! Where each stage reading a global source placed its keys (see [`crate::plan::repartition`]).
//!
//! Such a stage's rows can be derived differently by the next owner of an upstream partition:
//! the global source moved on meanwhile, so a key may go to another partition of the stage's
//! topic, or not be derived at all. The retractions that would delete its former record were
//! the former owner's to make. So the owner of each upstream partition keeps, with the
//! partition's state and in its changelog (the next owner restores it from there), the
//! partition of the stage's topic each key's record is in:
//! - a key's change deletes its record from the partition kept for it when it moved or went;
//! - when a partition opens here, the keys kept for it that its rows do not derive again are
//!   deleted (*swept*), once the global sources are restored and the partition's task of
//!   every source the stage reads is open: its rows are then all derived.
//!
//! Each worker keeps and sweeps the keys the dataflow routes to it.

use std::collections::{HashMap, HashSet};

use tracing::{error, info, warn};

use super::changes::{placed, stage_changes, stage_records, StageChanges};
use super::shared::Shared;
use super::worker::routed_to;
use crate::changelog::ChangelogRecord;
use crate::plan::repartition::Repartition;
use crate::state::key::{encode_key, key_hex};
use crate::state::{decode, encode, Commit};
use crate::value::{Row, Value};

/// A worker's placements of the stages reading a global source.
#[derive(Default)]
pub(super) struct Placements {
    /// Per stage, by its position in the topology's repartitions.
    stages: HashMap<usize, Sweeps>,
}

/// One stage's upstream partitions owned here, and those not swept yet.
#[derive(Debug, Default)]
struct Sweeps {
    /// The upstream partitions owned here as of the last epoch.
    owned: HashSet<u32>,
    /// The partitions opened here and not swept yet, with the keys (their values in bincode)
    /// derived from their rows since.
    opened: HashMap<u32, HashSet<Vec<u8>>>,
}

impl Sweeps {
    /// Notes the upstream partitions (of `count`) that opened or went since the last epoch.
    fn follow(&mut self, count: u32, owns: impl Fn(u32) -> bool) {
        for p in 0..count {
            match (owns(p), self.owned.contains(&p)) {
                (true, false) => {
                    self.owned.insert(p);
                    self.opened.insert(p, HashSet::new());
                }
                (false, true) => {
                    self.owned.remove(&p);
                    self.opened.remove(&p);
                }
                _ => {}
            }
        }
    }
}

/// The kept placements (`(key, its values, partition)`) a sweep deletes: those of keys
/// neither derived since the partition opened nor changed in this epoch, that are this
/// worker's (`mine`).
fn swept<T>(
    kept: Vec<(Vec<u8>, T, u32)>,
    derived: &HashSet<Vec<u8>>,
    changed: &HashSet<Vec<u8>>,
    mine: impl Fn(&T) -> bool,
) -> Vec<(Vec<u8>, T, u32)> {
    kept.into_iter()
        .filter(|(key, values, _)| !derived.contains(key) && !changed.contains(key) && mine(values))
        .collect()
}

impl Placements {
    /// Adds the epoch's records of stage `index` (one reading a global source) to `commit`,
    /// with where they put each key, then sweeps the partitions ready for it. `worker` is
    /// this worker's index and the number of workers.
    pub(super) fn write(
        &mut self,
        shared: &Shared,
        (index, worker): (usize, (usize, usize)),
        deltas: Vec<(Row, isize)>,
        commit: &mut Commit,
    ) {
        let repartition = &shared.topology.repartitions[index];
        let (from, _) = repartition.from;
        let from_topic = &shared.topology.sources[from].topic;
        let Some(count) = shared.status.partition_count(from_topic) else {
            return;
        };
        let sweeps = self.stages.entry(index).or_default();
        sweeps.follow(count, |p| shared.status.owns(from_topic, p));
        let mut records = Vec::new();
        let changes = match deltas.is_empty() {
            true => None,
            false => stage_changes(shared, repartition, deltas),
        };
        let changed = changes.map_or_else(HashSet::new, |changes| {
            let out = (&mut *commit, &mut records);
            write_changes(shared, (repartition, changes), sweeps, out)
        });
        let ready: Vec<u32> = sweeps
            .opened
            .keys()
            .copied()
            .filter(|p| ready_to_sweep(shared, repartition, *p))
            .collect();
        for p in ready {
            let derived = sweeps.opened.remove(&p).unwrap_or_default();
            sweep(
                shared,
                (repartition, p),
                (&derived, &changed),
                worker,
                commit,
                &mut records,
            );
        }
        for record in records {
            commit.produce(record);
        }
    }
}

/// Adds the records of an epoch's `changes` of `repartition` to `records`, each key deleted
/// from the partition kept for it when it moved or went, and keeps where each key is now in
/// `commit`; notes the keys derived from partitions not swept yet. Returns the keys changed
/// (their values in bincode).
fn write_changes(
    shared: &Shared,
    (repartition, changes): (&Repartition, StageChanges),
    sweeps: &mut Sweeps,
    (commit, records): (&mut Commit, &mut Vec<ChangelogRecord>),
) -> HashSet<Vec<u8>> {
    let stage = &shared.topology.sources[repartition.source].topic;
    let partitions = changes.partitions;
    let place = |row: &Row| placed(repartition, partitions, row);
    let mut changed = HashSet::with_capacity(changes.keys.len());
    for change in changes.keys {
        let key = encode(&change.key);
        let task = (repartition.from.0, change.upstream);
        let kept = shared.store.placement(task, stage, &key).unwrap_or_else(|e| {
            error!(%stage, partition = change.upstream, error = %e, "cannot read where a stage record is: the record derived before stays");
            None
        });
        let before = kept.or_else(|| change.old.as_ref().map(place));
        let now = change.new.as_ref().map(place);
        if now != kept {
            commit.put_placement(task, stage, &key, now);
        }
        if let (Some(derived), Some(_)) = (sweeps.opened.get_mut(&change.upstream), &change.new) {
            derived.insert(key.clone());
        }
        let key_values = (partitions, change.key.as_slice());
        stage_records(repartition, key_values, before, change.new, records);
        changed.insert(key);
    }
    changed
}

/// Deletes the records of upstream partition `p`'s keys kept as placed but neither derived
/// since it opened nor changed in this epoch (see [`swept`]).
fn sweep(
    shared: &Shared,
    (repartition, p): (&Repartition, u32),
    (derived, changed): (&HashSet<Vec<u8>>, &HashSet<Vec<u8>>),
    (index, workers): (usize, usize),
    commit: &mut Commit,
    records: &mut Vec<ChangelogRecord>,
) {
    let stage = &shared.topology.sources[repartition.source].topic;
    let task = (repartition.from.0, p);
    let kept = match shared.store.placements(task, stage) {
        Ok(kept) => kept,
        Err(e) => {
            error!(%stage, partition = p, error = %e, "cannot read where the stage records of a partition are: those its rows no longer derive stay");
            return;
        }
    };
    let kept = kept
        .into_iter()
        .filter_map(|(key, at)| match decode::<Vec<Value>>(&key) {
            Ok(values) => Some((key, values, at)),
            Err(e) => {
                warn!(%stage, partition = p, error = %e, "a kept placement's key cannot be read: skipped");
                None
            }
        })
        .collect();
    let mine = |values: &Vec<Value>| routed_to(values, workers) == index;
    let gone = swept(kept, derived, changed, mine);
    for (key, values, at) in &gone {
        let hex = key_hex(&encode_key(values));
        records.push(ChangelogRecord::repartitioned(
            repartition.source,
            *at,
            &hex,
            None,
        ));
        commit.put_placement(task, stage, key, None);
    }
    info!(stage = %repartition.name, %stage, partition = p, deleted = gone.len(),
          "partition opened: the stage records its rows no longer derive are deleted");
}

/// Whether upstream partition `p` of `repartition` can be swept: every global source it reads
/// is restored, and the task of `p` of every other source it reads is open here.
fn ready_to_sweep(shared: &Shared, repartition: &Repartition, p: u32) -> bool {
    let mut read = Vec::new();
    repartition.input.sources(&mut read);
    read.iter().all(|s| {
        let source = &shared.topology.sources[*s];
        match source.global {
            true => shared.status.restored_whole(&source.topic),
            false => shared.status.owns(&source.topic, p),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opened_partitions_are_followed_and_forgotten_when_they_go() {
        let mut sweeps = Sweeps::default();
        sweeps.follow(4, |p| p == 1 || p == 2);
        assert_eq!(sweeps.opened.len(), 2);
        sweeps.opened.get_mut(&1).unwrap().insert(b"k".to_vec());
        sweeps.opened.remove(&2);
        // Still owned: neither opened again nor forgotten.
        sweeps.follow(4, |p| p == 1 || p == 2);
        assert_eq!(sweeps.opened.keys().collect::<Vec<_>>(), [&1]);
        assert!(sweeps.opened[&1].contains(b"k".as_slice()));
        // 1 goes, 3 comes, 2 stays swept.
        sweeps.follow(4, |p| p == 2 || p == 3);
        assert_eq!(sweeps.opened.keys().collect::<Vec<_>>(), [&3]);
        assert!(sweeps.opened[&3].is_empty());
        // 1 comes back: opened again, with nothing derived yet.
        sweeps.follow(4, |p| p != 0);
        assert!(sweeps.opened[&1].is_empty());
    }

    #[test]
    fn a_sweep_deletes_the_keys_no_longer_derived_of_this_worker_only() {
        let kept = |keys: &[&'static str]| -> Vec<(Vec<u8>, &'static str, u32)> {
            keys.iter()
                .enumerate()
                .map(|(i, k)| (k.as_bytes().to_vec(), *k, i as u32))
                .collect()
        };
        let set = |keys: &[&str]| -> HashSet<Vec<u8>> {
            keys.iter().map(|k| k.as_bytes().to_vec()).collect()
        };
        let gone = swept(
            kept(&["derived", "changed", "gone", "other worker's"]),
            &set(&["derived"]),
            &set(&["changed"]),
            |k| *k != "other worker's",
        );
        assert_eq!(gone, [(b"gone".to_vec(), "gone", 2)]);
    }
}
