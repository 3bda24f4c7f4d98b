//! The answers of the commands processed, by command id, and how long each is kept: a
//! re-delivered command gets its first answer again instead of a second effect.
//!
//! A command id the client generated for one send (it equals the correlation id) can only come
//! back as a re-delivery of that send, which carries the same deadline: once the deadline has
//! passed, a re-delivery is answered `expired` and not applied, so the id needs to be kept only
//! until then (plus [`AFTER_DEADLINE`]). An id the caller chose (an idempotency key it may send
//! again with a new deadline), a replay's, or one without a deadline is kept for
//! [`ANSWER_RETENTION`]. At 1,000 commands/s with 5 s timeouts, that bounds the answers kept to
//! about 600,000 instead of a week's 600 million.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use miroir_engine::command::Reply;

/// How long a command id is remembered at most: the retention of `<topic>.miroir-done`, and
/// of the answers kept in the state directory.
pub(super) const ANSWER_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a single-use command id is remembered after its deadline: a margin for the wall
/// clock being set back.
pub(super) const AFTER_DEADLINE: Duration = Duration::from_secs(600);

/// Until when (ms since the epoch) the answer of a command answered at `answered_at_ms` is
/// kept; `single_use` is true when the client generated the command id for this one send.
pub(super) fn keep_until(answered_at_ms: i64, deadline_ms: Option<i64>, single_use: bool) -> i64 {
    let longest = answered_at_ms.saturating_add(ANSWER_RETENTION.as_millis() as i64);
    match deadline_ms {
        Some(deadline) if single_use => deadline
            .saturating_add(AFTER_DEADLINE.as_millis() as i64)
            .min(longest),
        _ => longest,
    }
}

/// The answers kept, by command id, each with when it is forgotten (ms since the epoch).
#[derive(Default)]
pub(super) struct AnsweredIds {
    by_id: HashMap<Arc<str>, (i64, Reply)>,
    /// The same ids, by when they are forgotten: forgetting takes the first ones only.
    by_expiry: BTreeSet<(i64, Arc<str>)>,
}

impl AnsweredIds {
    /// Records `reply` as command `id`'s answer, kept until `until_ms`. A parked command's
    /// `Deferred` never replaces the answer of its replay (the two may be read in either
    /// order), which is final.
    pub(super) fn remember(&mut self, id: String, until_ms: i64, reply: Reply) {
        if matches!(reply, Reply::Deferred { .. })
            && self
                .by_id
                .get(id.as_str())
                .is_some_and(|(_, r)| !matches!(r, Reply::Deferred { .. }))
        {
            return;
        }
        let id: Arc<str> = id.into();
        if let Some((previous, _)) = self.by_id.insert(id.clone(), (until_ms, reply)) {
            self.by_expiry.remove(&(previous, id.clone()));
        }
        self.by_expiry.insert((until_ms, id));
    }

    /// Command `id`'s answer, if it was answered.
    pub(super) fn get(&self, id: &str) -> Option<&Reply> {
        self.by_id.get(id).map(|(_, reply)| reply)
    }

    /// Forgets command `id` (its done record was deleted).
    pub(super) fn forget(&mut self, id: &str) {
        if let Some((id, (until, _))) = self.by_id.remove_entry(id) {
            self.by_expiry.remove(&(until, id));
        }
    }

    /// Forgets the answers kept until before `now_ms`; returns their ids. Costs the answers
    /// forgotten, not the answers kept.
    pub(super) fn forget_expired(&mut self, now_ms: i64) -> Vec<String> {
        let mut expired = Vec::new();
        while let Some(first) = self.by_expiry.first() {
            if first.0 >= now_ms {
                break;
            }
            let (_, id) = self.by_expiry.pop_first().expect("a first entry");
            self.by_id.remove(&id);
            expired.push(id.to_string());
        }
        expired
    }

    /// How many answers are kept.
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted() -> Reply {
        Reply::Accepted {
            version: 3,
            partition: 1,
            offset: 9,
        }
    }

    #[test]
    fn a_replayed_commands_answer_outlives_its_deferral_in_either_order() {
        let deferred = Reply::Deferred {
            topic: "t.dlq".into(),
            partition: 0,
            offset: 7,
            message: "down".into(),
        };
        let accepted = accepted();
        let mut answered = AnsweredIds::default();
        answered.remember("a".into(), 1, deferred.clone());
        answered.remember("a".into(), 2, accepted.clone());
        answered.remember("b".into(), 1, accepted.clone());
        answered.remember("b".into(), 2, deferred.clone());
        assert_eq!(answered.get("a"), Some(&accepted));
        assert_eq!(
            answered.get("b"),
            Some(&accepted),
            "read after its replay's answer"
        );
        answered.remember("c".into(), 1, deferred.clone());
        answered.remember("c".into(), 2, deferred.clone());
        assert_eq!(answered.get("c"), Some(&deferred), "parked twice");
        assert_eq!(answered.len(), 3);
    }

    #[test]
    fn answers_are_forgotten_once_their_time_has_passed_and_not_before() {
        let accepted = accepted();
        let mut answered = AnsweredIds::default();
        answered.remember("old".into(), 100, accepted.clone());
        answered.remember("edge".into(), 200, accepted.clone());
        answered.remember("new".into(), 300, accepted.clone());
        answered.remember("gone".into(), 250, accepted.clone());
        answered.forget("gone");
        assert_eq!(answered.forget_expired(200), vec!["old".to_string()]);
        assert_eq!(answered.get("old"), None);
        assert_eq!(answered.get("edge"), Some(&accepted));
        assert_eq!(answered.get("new"), Some(&accepted));
        // An answer remembered again is kept until its new time only.
        answered.remember("edge".into(), 400, accepted.clone());
        assert_eq!(answered.forget_expired(350), vec!["new".to_string()]);
        assert_eq!(answered.get("edge"), Some(&accepted));
        assert_eq!(answered.len(), 1);
        assert_eq!(answered.forget_expired(401), vec!["edge".to_string()]);
        assert_eq!(answered.len(), 0);
        assert!(answered.by_expiry.is_empty(), "no id left behind");
    }

    #[test]
    fn single_use_ids_are_kept_until_after_their_deadline_others_for_the_retention() {
        let at = 1_000_000;
        let week = ANSWER_RETENTION.as_millis() as i64;
        let margin = AFTER_DEADLINE.as_millis() as i64;
        assert_eq!(keep_until(at, Some(at + 5_000), true), at + 5_000 + margin);
        assert_eq!(
            keep_until(at, Some(at + 5_000), false),
            at + week,
            "an id the caller chose may be sent again with a new deadline"
        );
        assert_eq!(keep_until(at, None, true), at + week, "no deadline");
        assert_eq!(
            keep_until(at, Some(at + 2 * week), true),
            at + week,
            "never longer than the retention"
        );
    }
}
