//! The rows of each entity of a stream source kept to a number (`retain = 20`, see
//! [`crate::topology::stream`]): the rest of a row's key after the entity's (its version)
//! orders an entity's rows, and the least ones go first.

use std::collections::{BTreeMap, HashMap};

use super::upsert::identity_key;
use crate::value::{Row, Value};

/// The keys of each entity's rows, for a stream source that keeps `limit` rows per entity.
#[derive(Debug)]
pub(crate) struct EntityRows {
    limit: usize,
    /// Per entity, the rest of each row's key, and the row's key in the upsert state.
    entities: HashMap<Value, BTreeMap<Vec<Value>, Value>>,
}

impl EntityRows {
    /// The rows `rows` (a partition's, under the source's key columns `identity`) kept to
    /// `limit` per entity.
    pub(crate) fn new<'a>(
        limit: usize,
        identity: &[usize],
        rows: impl Iterator<Item = &'a Row>,
    ) -> EntityRows {
        let mut kept = EntityRows {
            limit,
            entities: HashMap::new(),
        };
        for row in rows {
            kept.insert(row, identity);
        }
        kept
    }

    /// Adds `row` (with its key columns `identity`) to its entity; returns the upsert state's
    /// keys of the entity's rows past the limit, oldest first (`row`'s own, when it is older
    /// than all of them).
    pub(crate) fn add(&mut self, row: &Row, identity: &[usize]) -> Vec<Value> {
        let limit = self.limit;
        let rows = self.insert(row, identity);
        let mut gone = Vec::new();
        while rows.len() > limit {
            gone.extend(rows.pop_first().map(|(_, key)| key));
        }
        gone
    }

    fn insert(&mut self, row: &Row, identity: &[usize]) -> &mut BTreeMap<Vec<Value>, Value> {
        let rest = identity[1..].iter().map(|c| row[*c].clone()).collect();
        let key = identity_key(row, identity).into_owned();
        let rows = self.entities.entry(row[identity[0]].clone()).or_default();
        rows.insert(rest, key);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, version: i64) -> Row {
        vec![Value::Text(id.into()), Value::Int(version)]
    }

    fn key(id: &str, version: i64) -> Value {
        Value::Text(format!("{id}|{version}").into())
    }

    #[test]
    fn an_entity_keeps_its_newest_rows_by_key() {
        let restored = [row("a", 1), row("a", 2), row("b", 9)];
        let mut kept = EntityRows::new(2, &[0, 1], restored.iter());
        assert_eq!(kept.add(&row("a", 3), &[0, 1]), vec![key("a", 1)]);
        assert_eq!(
            kept.add(&row("a", 0), &[0, 1]),
            vec![key("a", 0)],
            "older than the kept ones: goes at once"
        );
        assert_eq!(kept.add(&row("a", 3), &[0, 1]), vec![], "a copy");
        assert_eq!(kept.add(&row("b", 10), &[0, 1]), vec![]);
        assert_eq!(kept.add(&row("b", 11), &[0, 1]), vec![key("b", 9)]);
    }
}
