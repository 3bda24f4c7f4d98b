//! A command processor's view of its entities: the current row of each key, as committed on
//! the entity topic; a deleted entity's row is [`CommandSpec::deleted`], which keeps its last
//! version for a re-creation.
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
    /// Rows newer than the stored ones; every row without a store.
    recent: HashMap<String, Row>,
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
            return Ok(Some(row.clone()));
        }
        match &self.stored {
            Some((store, view)) => store.command_row(view, key).map_err(KafkaError::Store),
            None => Ok(None),
        }
    }

    /// Takes an event read from the entity topic: a row unless the view holds a newer
    /// version; a delete (`None`) of an entity it holds, kept as [`CommandSpec::deleted`] with
    /// the delete's `version` (a command's delete says it) or else the entity's last one, so
    /// that a re-creation continues from it. Returns the row the view took, which the stored
    /// view must take too (a row of the same version as the one held is taken: it is this
    /// processor's write, read back).
    pub(super) fn read(
        &mut self,
        spec: &CommandSpec,
        key: &str,
        row: Option<Row>,
        version: Option<i64>,
    ) -> Result<Option<Row>, KafkaError> {
        let held = self.get(key)?;
        let row = match (row, held) {
            (Some(new), Some(old)) if spec.version_of(&new) < spec.version_of(&old) => {
                return Ok(None)
            }
            (Some(new), _) => new,
            (None, Some(old)) => {
                let deleted = spec.deleted(old.len(), version.max(spec.version_of(&old)));
                if deleted == old {
                    return Ok(None);
                }
                deleted
            }
            (None, None) => return Ok(None),
        };
        self.recent.insert(key.to_string(), row.clone());
        self.count();
        Ok(Some(row))
    }

    /// Takes the rows a committed transaction wrote.
    pub(super) fn written<'a>(&mut self, rows: impl IntoIterator<Item = (&'a String, &'a Row)>) {
        self.recent
            .extend(rows.into_iter().map(|(k, r)| (k.clone(), r.clone())));
        self.count();
    }

    /// Forgets from memory the rows now stored as they are held (a row written again since
    /// stays).
    pub(super) fn saved(&mut self, rows: &HashMap<String, Row>) {
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

    fn store(view: &EntityView, changed: &HashMap<String, Row>) {
        let (store, name) = view.stored.as_ref().unwrap();
        let mut commit: Commit = store.commit();
        for (key, row) in changed {
            commit.put_command_row(name, key, row);
        }
        store.write_unsynced(commit).unwrap();
    }

    fn took(view: &mut EntityView, row: Option<Row>) -> Option<Row> {
        view.read(&spec(), "u-1", row, None).unwrap()
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
        assert_eq!(took(&mut view, Some(row(2))), Some(row(2)));
        let changed = HashMap::from([("u-1".to_string(), row(2))]);
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
        assert_eq!(
            took(&mut view, Some(row(1))),
            None,
            "an older version does not replace the stored one"
        );
        assert_eq!(view.get("u-1").unwrap(), Some(row(2)));

        view.written([(&"u-1".to_string(), &row(3))]);
        assert_eq!(
            view.get("u-1").unwrap(),
            Some(row(3)),
            "a write is seen at once"
        );
        assert_eq!(
            took(&mut view, Some(row(3))),
            Some(row(3)),
            "the write read back is stored"
        );
        let changed = HashMap::from([("u-1".to_string(), row(3))]);
        view.written([(&"u-1".to_string(), &row(4))]);
        store_and_forget(&mut view, &changed);
        assert_eq!(
            view.get("u-1").unwrap(),
            Some(row(4)),
            "a row written again before the save stays in memory"
        );

        let deleted = spec.deleted(3, Some(4));
        assert_eq!(
            took(&mut view, None),
            Some(deleted.clone()),
            "a delete keeps the entity's last version"
        );
        assert!(spec.is_deleted(&deleted));
        assert_eq!(took(&mut view, None), None, "deleted already");
        let later = spec.deleted(3, Some(5));
        assert_eq!(
            view.read(&spec, "u-1", None, Some(5)).unwrap(),
            Some(later.clone()),
            "a delete that says its version is taken at it"
        );
        assert_eq!(view.read(&spec, "u-1", None, Some(5)).unwrap(), None);
        let changed = HashMap::from([("u-1".to_string(), deleted.clone())]);
        store_and_forget(&mut view, &changed);
        let changed = HashMap::from([("u-1".to_string(), later.clone())]);
        store_and_forget(&mut view, &changed);
        assert_eq!(view.get("u-1").unwrap(), Some(later), "from the store");
        assert_eq!(took(&mut view, Some(row(4))), None, "older than the delete");
        assert_eq!(took(&mut view, Some(row(6))), Some(row(6)), "re-created");
    }

    fn store_and_forget(view: &mut EntityView, changed: &HashMap<String, Row>) {
        store(view, changed);
        view.saved(changed);
    }

    #[test]
    fn without_a_store_every_row_stays_in_memory() {
        let mut view = EntityView::new(None, IntGauge::new("rows", "rows").unwrap());
        assert_eq!(took(&mut view, Some(row(1))), Some(row(1)));
        view.saved(&HashMap::from([("u-1".to_string(), row(1))]));
        assert_eq!(view.get("u-1").unwrap(), Some(row(1)));
        assert_eq!(view.in_memory.get(), 1);
        assert_eq!(took(&mut view, None), Some(spec().deleted(3, Some(1))));
    }

    #[test]
    fn a_delete_of_an_entity_never_seen_changes_nothing() {
        let mut view = EntityView::new(None, IntGauge::new("rows", "rows").unwrap());
        assert_eq!(took(&mut view, None), None);
        assert_eq!(view.get("u-1").unwrap(), None);
    }
}
