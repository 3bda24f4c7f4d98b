//! A command processor's view of its entities: the current row of each key, as committed on
//! the entity topic.
//!
//! With a state directory the rows live there, and memory holds only the rows newer than
//! what is stored: read from the entity topic and not saved yet, or written by this
//! processor's committed transactions and not read back yet. A processor's memory then does
//! not grow with the number of entities. Without a state directory every row stays in memory.

use std::collections::HashMap;

use miroir_engine::state::StateStore;
use miroir_engine::topology::command::CommandSpec;
use miroir_engine::value::Row;
use prometheus::IntGauge;

use crate::kafka::KafkaError;

/// The entity rows by key (see the module's documentation).
pub(super) struct EntityView {
    /// Where rows are kept, and the view's name there.
    stored: Option<(StateStore, String)>,
    /// Rows newer than the stored ones (`None`: deleted); every row without a store.
    recent: HashMap<String, Option<Row>>,
    /// Set to the number of rows in `recent` as it changes.
    in_memory: IntGauge,
}

impl EntityView {
    /// A view kept in `stored` (a store and the view's name in it), or in memory; `in_memory`
    /// follows how many rows memory holds.
    pub(super) fn new(stored: Option<(StateStore, String)>, in_memory: IntGauge) -> EntityView {
        in_memory.set(0);
        EntityView {
            stored,
            recent: HashMap::new(),
            in_memory,
        }
    }

    /// The current row of `key`, if it has one.
    pub(super) fn get(&self, key: &str) -> Result<Option<Row>, KafkaError> {
        if let Some(row) = self.recent.get(key) {
            return Ok(row.clone());
        }
        match &self.stored {
            Some((store, view)) => store.command_row(view, key).map_err(KafkaError::Store),
            None => Ok(None),
        }
    }

    /// Takes an event read from the entity topic: a delete always, a row unless the view
    /// holds a newer version. Returns whether the stored view must take it (a row of the same
    /// version as the one held is taken too: it is this processor's write, read back).
    pub(super) fn read(
        &mut self,
        spec: &CommandSpec,
        key: &str,
        row: Option<Row>,
    ) -> Result<bool, KafkaError> {
        if let Some(new) = &row {
            let held = self.get(key)?;
            if held.is_some_and(|old| spec.version_of(new) < spec.version_of(&old)) {
                return Ok(false);
            }
        }
        self.recent.insert(key.to_string(), row);
        self.count();
        Ok(true)
    }

    /// Takes the rows a committed transaction wrote.
    pub(super) fn written<'a>(&mut self, rows: impl IntoIterator<Item = (&'a String, &'a Row)>) {
        self.recent
            .extend(rows.into_iter().map(|(k, r)| (k.clone(), Some(r.clone()))));
        self.count();
    }

    /// Forgets from memory the rows now stored as they are held (a row written again since
    /// stays).
    pub(super) fn saved(&mut self, rows: &HashMap<String, Option<Row>>) {
        if self.stored.is_none() {
            return;
        }
        for (key, row) in rows {
            if self.recent.get(key) == Some(row) {
                self.recent.remove(key);
            }
        }
        self.count();
    }

    fn count(&self) {
        self.in_memory.set(self.recent.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use miroir_engine::state::Commit;
    use miroir_engine::topology::Topology;
    use miroir_engine::value::Value;

    fn spec() -> CommandSpec {
        let topology = Topology::parse(
            "master.toml",
            r#"
name = "master"
[sources.users]
topic = "user"
key = "id"
columns = { id = "text", email = "text", version = "bigint" }
late = { order_by = "version" }

[tables.users_by_id]
query = "SELECT id, email FROM users"

[commands.update_email]
topic = "user.cmd.update-email"
operation = "UpdateUserEmail"
entity = "users"
key = "id"
columns = { id = "text", email = "text" }
set = { email = "command.email" }
"#,
        )
        .unwrap();
        topology.commands[0].clone()
    }

    fn row(version: i64) -> Row {
        vec![
            Value::Text("u-1".into()),
            Value::Text(format!("v{version}@x").into()),
            Value::Int(version),
        ]
    }

    fn store(view: &EntityView, changed: &HashMap<String, Option<Row>>) {
        let (store, name) = view.stored.as_ref().unwrap();
        let mut commit: Commit = store.commit();
        for (key, row) in changed {
            match row {
                Some(r) => commit.put_command_row(name, key, r),
                None => commit.delete_command_row(name, key),
            }
        }
        store.write_unsynced(commit).unwrap();
    }

    #[test]
    fn rows_leave_memory_once_stored_and_newest_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), &[]).unwrap();
        let spec = spec();
        let mut view = EntityView::new(
            Some((store, "update_email@users".into())),
            IntGauge::new("rows", "rows").unwrap(),
        );
        assert!(view.read(&spec, "u-1", Some(row(2))).unwrap());
        let changed = HashMap::from([("u-1".to_string(), Some(row(2)))]);
        store_and_forget(&mut view, &changed);
        assert_eq!(
            view.in_memory.get(),
            0,
            "a stored row is not kept in memory"
        );
        assert_eq!(
            view.get("u-1").unwrap(),
            Some(row(2)),
            "read from the store"
        );
        assert!(
            !view.read(&spec, "u-1", Some(row(1))).unwrap(),
            "an older version does not replace the stored one"
        );
        assert_eq!(view.get("u-1").unwrap(), Some(row(2)));

        view.written([(&"u-1".to_string(), &row(3))]);
        assert_eq!(
            view.get("u-1").unwrap(),
            Some(row(3)),
            "a write is seen at once"
        );
        assert!(
            view.read(&spec, "u-1", Some(row(3))).unwrap(),
            "the write read back is stored"
        );
        let changed = HashMap::from([("u-1".to_string(), Some(row(3)))]);
        view.written([(&"u-1".to_string(), &row(4))]);
        store_and_forget(&mut view, &changed);
        assert_eq!(
            view.get("u-1").unwrap(),
            Some(row(4)),
            "a row written again before the save stays in memory"
        );

        assert!(
            view.read(&spec, "u-1", None).unwrap(),
            "a delete always applies"
        );
        let changed = HashMap::from([("u-1".to_string(), None)]);
        store_and_forget(&mut view, &changed);
        assert_eq!((view.get("u-1").unwrap(), view.in_memory.get()), (None, 0));
    }

    fn store_and_forget(view: &mut EntityView, changed: &HashMap<String, Option<Row>>) {
        store(view, changed);
        view.saved(changed);
    }

    #[test]
    fn without_a_store_every_row_stays_in_memory() {
        let spec = spec();
        let mut view = EntityView::new(None, IntGauge::new("rows", "rows").unwrap());
        assert!(view.read(&spec, "u-1", Some(row(1))).unwrap());
        view.saved(&HashMap::from([("u-1".to_string(), Some(row(1)))]));
        assert_eq!(view.get("u-1").unwrap(), Some(row(1)));
        assert_eq!(view.in_memory.get(), 1);
    }
}
