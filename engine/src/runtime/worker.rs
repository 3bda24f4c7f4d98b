//! One timely worker: its copy of the dataflow, its tasks, and its part of every epoch.

use std::cell::RefCell;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::time::{Duration, Instant};

use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::operators::{Exchange, Inspect, Probe};
use timely::dataflow::ProbeHandle;
use tracing::{debug, info};

use super::changes::{owned_changes, repartition_records, table_changes, write_rows, RowPlacement};
use super::inbox::InboxReceiver;
use super::placements::Placements;
use super::shared::Shared;
use super::tasks::Tasks;
use super::{commit, epoch};
use crate::dataflow::{Epoch, Renderer};
use crate::plan::Plan;
use crate::state::Commit;
use crate::topology::Topology;
use crate::value::{Row, Value};

/// Longest a worker parks, waiting for its peers, before it checks its epoch again.
const PARK: Duration = Duration::from_millis(10);

/// The deltas of one table that reached this worker in the epoch.
type Capture = Rc<RefCell<Vec<(Row, isize)>>>;

/// The worker's dataflow: one input per source, the probe of every table, and what each
/// table's and each repartition's deltas are captured into.
struct Dataflow {
    inputs: Vec<InputSession<Epoch, Row, isize>>,
    probe: ProbeHandle<Epoch>,
    captures: Vec<Capture>,
    repartitions: Vec<Capture>,
    /// Where the stages reading a global source placed the keys routed here.
    placements: Placements,
}

/// Runs the worker until the runtime stops.
pub(super) fn run(worker: &mut timely::worker::Worker, shared: &Shared, inbox: InboxReceiver) {
    let index = worker.index();
    let mut dataflow = build(worker, &shared.topology);
    let mut tasks = Tasks::new(index);
    let mut epoch: Epoch = 0;
    loop {
        let started = Instant::now();
        let applied = epoch::gather(epoch + 1, shared, &inbox, &mut tasks, &mut dataflow.inputs);
        let t_apply = started.elapsed();
        let mut commit = shared.store.commit();
        tasks.flush(shared, &mut dataflow.inputs, &mut commit);
        let t_feed = started.elapsed();
        epoch += 1;
        for input in dataflow.inputs.iter_mut() {
            input.advance_to(epoch);
            input.flush();
        }
        // Parks instead of spinning while other workers finish their epoch: on a machine with
        // few cores the spin takes CPU from them (and from Kafka and PostgreSQL). Data or
        // progress from a peer wakes a parked worker.
        let probe = &dataflow.probe;
        worker.step_or_park_while(Some(PARK), || probe.less_than(&epoch));
        let t_dataflow = started.elapsed();
        write_tables(shared, &dataflow.captures, &mut commit);
        let worker_of = (index, worker.peers());
        write_repartitions(shared, &mut dataflow, worker_of, &mut commit);
        commit::contribute(shared, commit);
        let t_tables = started.elapsed();
        let stopping = commit::finish(shared, epoch);
        tasks.committed(shared);
        debug!(
            worker = index,
            epoch,
            records = applied,
            apply_ms = t_apply.as_millis() as u64,
            feed_ms = (t_feed - t_apply).as_millis() as u64,
            dataflow_ms = (t_dataflow - t_feed).as_millis() as u64,
            tables_ms = (t_tables - t_dataflow).as_millis() as u64,
            commit_ms = (started.elapsed() - t_tables).as_millis() as u64,
            "epoch phases"
        );
        // Every worker read the leader's decision, so all leave after the same epoch.
        if stopping {
            info!(
                worker = index,
                epoch, "worker stopped after its last commit"
            );
            return;
        }
    }
}

/// Builds the topology's dataflow on this worker. Each table's deltas are routed to the
/// worker its key hashes to, so a key's changes all reach one worker.
fn build(worker: &mut timely::worker::Worker, topology: &Topology) -> Dataflow {
    worker.dataflow::<Epoch, _, _>(|scope| {
        let mut inputs = Vec::new();
        let mut collections = Vec::new();
        for _ in &topology.sources {
            let (input, collection) = scope.new_collection::<Row, isize>();
            inputs.push(input);
            collections.push(collection);
        }
        let probe = ProbeHandle::new();
        let mut renderer = Renderer::new(collections);
        let mut capture = |plan: &Plan, name: &str, key: Vec<usize>| -> Capture {
            let capture: Capture = Rc::new(RefCell::new(Vec::new()));
            let sink = capture.clone();
            renderer
                .render(plan, name)
                .inner
                .exchange(move |(row, _, _): &(Row, Epoch, isize)| key_hash(row, &key))
                .probe_with(&probe)
                .inspect_core(move |event| {
                    if let Ok((_, data)) = event {
                        sink.borrow_mut()
                            .extend(data.iter().map(|(r, _, d)| (r.clone(), *d)));
                    }
                });
            capture
        };
        let captures = topology
            .tables
            .iter()
            .map(|t| capture(t.computed(), &t.name, t.key.clone()))
            .collect();
        let repartitions = topology
            .repartitions
            .iter()
            .map(|r| capture(&r.input, &r.name, r.key.clone()))
            .collect();
        Dataflow {
            inputs,
            probe,
            captures,
            repartitions,
            placements: Placements::default(),
        }
    })
}

/// Hash of a row's key columns, to route rows by table key. `DefaultHasher::new()` has fixed
/// keys, so every worker of the process computes the same route.
fn key_hash(row: &[Value], key: &[usize]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    for i in key {
        row[*i].hash(&mut h);
    }
    h.finish()
}

/// The worker (of `workers`) a row whose key is `key` (its values, in order) is routed to,
/// as timely's exchange routes it.
pub(super) fn routed_to(key: &[Value], workers: usize) -> usize {
    let all: Vec<usize> = (0..key.len()).collect();
    (key_hash(key, &all) % workers.max(1) as u64) as usize
}

/// Where the rows of internal table `table` are logged, when rows are: its key's source and
/// that source's partition count (see [`RowPlacement`]).
fn row_placement(shared: &Shared, table: &crate::plan::TablePlan) -> Option<RowPlacement> {
    shared
        .config
        .log_rows
        .then(|| RowPlacement::of(shared, table))
        .flatten()
}

/// Adds the epoch's repartition records (see [`repartition_records`]) to `commit`; those of
/// the stages reading a global source with where they put each key (see [`Placements`]).
/// `worker` is this worker's index and the number of workers.
fn write_repartitions(
    shared: &Shared,
    dataflow: &mut Dataflow,
    worker: (usize, usize),
    commit: &mut Commit,
) {
    let repartitions = shared.topology.repartitions.iter();
    for (index, (repartition, capture)) in repartitions.zip(&dataflow.repartitions).enumerate() {
        let deltas = std::mem::take(&mut *capture.borrow_mut());
        if repartition.reads_global {
            let placements = &mut dataflow.placements;
            placements.write(shared, (index, worker), deltas, commit);
        } else if !deltas.is_empty() {
            for record in repartition_records(shared, repartition, deltas) {
                commit.produce(record);
            }
        }
    }
}

/// Turns the epoch's captured deltas into table changes: internal tables' rows go into
/// `commit`, external tables' changes into the epoch's batch for the database.
fn write_tables(shared: &Shared, captures: &[Capture], commit: &mut Commit) {
    for (table, capture) in shared.topology.tables.iter().zip(captures) {
        let deltas = std::mem::take(&mut *capture.borrow_mut());
        if deltas.is_empty() {
            continue;
        }
        let changes = table_changes(table, deltas);
        if table.postgres().is_none() {
            write_rows(table, &changes, commit, row_placement(shared, table));
            continue;
        }
        let changes = owned_changes(shared, table, changes);
        if !changes.upserts.is_empty() || !changes.deletes.is_empty() {
            commit::add_sink_changes(shared, changes);
        }
    }
}
