//! A source's late-event policy, as the topology file declares it (`late = { ... }`): which
//! column orders a key's events, per which business operation, and what to do with a late
//! one. What the policy decides for one event is [`crate::ingest::late`]'s.

use serde::{Deserialize, Serialize};

use crate::value::{Column, Value};

/// What to do with a late event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LateAction {
    /// Drop it (logged and counted): the default.
    Drop,
    /// Apply it anyway (logged and counted).
    Keep,
}

/// A source's late-event policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatePolicy {
    /// Column whose value orders events (a version or a timestamp).
    pub order_by: usize,
    /// Column naming the business operation; `None` orders all events of a key together.
    pub per: Option<usize>,
    /// What to do with late events.
    pub action: LateAction,
    /// How many business operations a key keeps an order value for (`late.max_operations`);
    /// past it, the one applied longest ago is forgotten.
    pub max_operations: usize,
}

impl LatePolicy {
    /// 64: business operations are a short list (`EmailUpdated`, `NameChanged`, ...); more
    /// distinct values of `per` for one key means the column is not one.
    pub const DEFAULT_MAX_OPERATIONS: usize = 64;

    /// Describes the policy with column names, for `explain`.
    pub fn describe(&self, columns: &[Column]) -> String {
        format!(
            "order by {} per {}, {}",
            columns[self.order_by].name,
            self.per.map(|p| columns[p].name.as_str()).unwrap_or("key"),
            match self.action {
                LateAction::Drop => "drop late events",
                LateAction::Keep => "keep late events",
            }
        )
    }

    /// The business operation of `row` (NULL when ordering per key).
    pub fn operation<'a>(&self, row: &'a [Value]) -> &'a Value {
        const PER_KEY: &Value = &Value::Null;
        self.per.map_or(PER_KEY, |p| &row[p])
    }

    /// The order value of `row`.
    pub fn order<'a>(&self, row: &'a [Value]) -> &'a Value {
        &row[self.order_by]
    }
}
