//! The late-event policy: which entity events are too old to apply.
//!
//! An entity event is *late* when an event of the same business operation (the `per` column,
//! or the whole key when there is none) with a greater `order_by` value was already applied for
//! the same key. A late event is dropped (logged and counted), or applied anyway with
//! `action = "keep"`. An event whose order value *equals* the applied one is a *duplicate*: a
//! re-delivery or a replay after a crash, which must have no second effect, so it is always
//! skipped. Without a policy, events are ordered by their source offset. The policy itself is
//! [`crate::topology::late::LatePolicy`].

use crate::value::Value;

/// The verdict on one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Newer than anything applied for its operation: apply it.
    Apply,
    /// Same order value as the applied one: a duplicate, skip it.
    Duplicate,
    /// Older than the applied one: late.
    Late,
}

/// Compares an event's order value with the last applied one for its key and operation.
/// A NULL order value is older than any other (it can never overtake a versioned event).
pub fn verdict(applied: Option<&Value>, incoming: &Value) -> Verdict {
    match applied {
        None => Verdict::Apply,
        Some(a) => match incoming.cmp(a) {
            std::cmp::Ordering::Greater => Verdict::Apply,
            std::cmp::Ordering::Equal => Verdict::Duplicate,
            std::cmp::Ordering::Less => Verdict::Late,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(verdict(None, &Value::Int(1)), Verdict::Apply);
        assert_eq!(
            verdict(Some(&Value::Int(1)), &Value::Int(2)),
            Verdict::Apply
        );
        assert_eq!(
            verdict(Some(&Value::Int(2)), &Value::Int(2)),
            Verdict::Duplicate
        );
        assert_eq!(verdict(Some(&Value::Int(3)), &Value::Int(2)), Verdict::Late);
        assert_eq!(verdict(Some(&Value::Int(3)), &Value::Null), Verdict::Late);
    }
}
