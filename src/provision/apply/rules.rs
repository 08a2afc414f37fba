//! The convergence rules: which snapshot stands, which end stands, and which ends
//! are only inferred (docs/schema.md, "Versions and tombstones").
//!
//! Guarantee: each rule is a fixed function of the sources it compares, never of
//! the order they arrive in: [`Source::beats`] is a strict total order on known
//! sources and [`earliest`] picks the same end from any permutation, so applying
//! events in any order with any duplicates converges.

use chrono::{DateTime, Utc};

/// Converts a Clerk ms timestamp (range checked when decoding) to a timestamp.
pub(super) fn ts(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Where a group of stored fields came from: the snapshot's version and the svix id
/// that carried it (`None` for rows written before svix ids were kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Source<'a> {
    pub(super) version: i64,
    pub(super) event: Option<&'a str>,
}

impl<'a> Source<'a> {
    pub(super) fn new(version: i64, event: &'a str) -> Self {
        Self {
            version,
            event: Some(event),
        }
    }

    /// The stored source of a group (`None`: nothing applied yet).
    pub(super) fn stored(version: Option<i64>, event: &'a Option<String>) -> Option<Self> {
        version.map(|version| Self {
            version,
            event: event.as_deref(),
        })
    }

    /// Whether this snapshot replaces `other`: a newer version wins; on equal
    /// versions the smaller svix id does (a fixed rule, so the outcome does not
    /// depend on which arrived first), and a known svix id beats an unknown one.
    pub(super) fn beats(self, other: Source<'_>) -> bool {
        match self.version.cmp(&other.version) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => match (self.event, other.event) {
                (Some(a), Some(b)) => a < b,
                (Some(_), None) => true,
                (None, _) => false,
            },
        }
    }

    /// [`Source::beats`] the stored source, if any.
    pub(super) fn beats_stored(self, stored: Option<Source<'_>>) -> bool {
        stored.is_none_or(|s| self.beats(s))
    }
}

/// Why and since when a membership ended.
pub(super) type End<'a> = (DateTime<Utc>, &'a str);

/// The end that stands among several causes: the earliest time, and on equal
/// times the reason first in byte order (`membership_deleted`, `user_deleted`,
/// `workspace_deleted`), the same order as `collate "C"` in [`super::membership::end_memberships`].
pub(super) fn earliest<'a>(ends: impl IntoIterator<Item = Option<End<'a>>>) -> Option<End<'a>> {
    ends.into_iter().flatten().min()
}

/// `removal_reason` of a membership reconcile did not find in Clerk's listing.
pub(super) const NOT_IN_CLERK: &str = "not_in_clerk";
/// `removal_reason` of a membership ended with its workspace's inferred deletion.
pub(super) const WORKSPACE_NOT_IN_CLERK: &str = "workspace_not_in_clerk";

/// Whether an end is only inferred by reconcile: any real end replaces it, and a
/// later snapshot lifts it.
pub(super) fn inferred(reason: &str) -> bool {
    reason == NOT_IN_CLERK || reason == WORKSPACE_NOT_IN_CLERK
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A newer version wins; on equal versions the smaller svix id does, and a
    /// known svix id beats an unknown one.
    #[test]
    fn a_newer_version_wins_and_a_tie_goes_to_the_smaller_svix_id() {
        let s = |version, event| Source { version, event };
        assert!(s(2, Some("msg_b")).beats(s(1, Some("msg_a"))));
        assert!(!s(1, Some("msg_a")).beats(s(2, Some("msg_b"))));
        assert!(s(1, Some("msg_a")).beats(s(1, Some("msg_b"))));
        assert!(!s(1, Some("msg_b")).beats(s(1, Some("msg_a"))));
        // The same snapshot again does not replace itself.
        assert!(!s(1, Some("msg_a")).beats(s(1, Some("msg_a"))));
        // A stored source without a svix id (written before they were kept) loses a tie.
        assert!(s(1, Some("msg_z")).beats(s(1, None)));
        assert!(!s(1, None).beats(s(1, Some("msg_a"))));
        assert!(s(0, Some("msg_a")).beats_stored(None));
    }

    /// The earliest end stands, and on equal times the reason first in byte order.
    #[test]
    fn the_earliest_end_stands_and_equal_times_go_by_reason() {
        let (t1, t2) = (ts(1_000), ts(2_000));
        assert_eq!(
            earliest([
                Some((t2, "membership_deleted")),
                Some((t1, "workspace_deleted"))
            ]),
            Some((t1, "workspace_deleted"))
        );
        assert_eq!(
            earliest([
                Some((t1, "workspace_deleted")),
                None,
                Some((t1, "user_deleted")),
                Some((t1, "membership_deleted")),
            ]),
            Some((t1, "membership_deleted"))
        );
        assert_eq!(earliest([None, None]), None);
    }

    /// Among known sources `beats` is a strict total order (irreflexive,
    /// asymmetric, total on distinct sources, transitive), so the snapshot that
    /// stands does not depend on the order the candidates are compared in.
    #[test]
    fn beats_is_a_strict_total_order() {
        let events = [None, Some("msg_a"), Some("msg_b"), Some("msg_c")];
        let sources: Vec<Source<'_>> = (0..3)
            .flat_map(|version| events.iter().map(move |&event| Source { version, event }))
            .collect();
        for &a in &sources {
            assert!(!a.beats(a), "{a:?} beats itself");
            for &b in &sources {
                assert!(
                    !(a.beats(b) && b.beats(a)),
                    "{a:?} and {b:?} beat each other"
                );
                if a != b {
                    assert!(a.beats(b) || b.beats(a), "neither {a:?} nor {b:?} stands");
                }
                for &c in &sources {
                    if a.beats(b) && b.beats(c) {
                        assert!(a.beats(c), "{a:?} > {b:?} > {c:?} but not {a:?} > {c:?}");
                    }
                }
            }
        }
    }

    /// A snapshot replaces a stored source only when it beats it; nothing stored
    /// yet is replaced by anything.
    #[test]
    fn beats_stored_follows_beats() {
        let stored_event = Some("msg_b".to_owned());
        let stored = Source::stored(Some(2), &stored_event);
        assert_eq!(stored, Some(Source::new(2, "msg_b")));
        assert!(Source::new(3, "msg_z").beats_stored(stored));
        assert!(Source::new(2, "msg_a").beats_stored(stored));
        assert!(!Source::new(2, "msg_b").beats_stored(stored));
        assert!(!Source::new(1, "msg_a").beats_stored(stored));
        assert_eq!(Source::stored(None, &stored_event), None);
        assert!(Source::new(0, "msg_z").beats_stored(Source::stored(None, &stored_event)));
    }

    /// The end that stands is the same whatever order the causes are listed in.
    #[test]
    fn the_earliest_end_does_not_depend_on_the_order_of_its_causes() {
        let (t1, t2) = (ts(1_000), ts(2_000));
        let causes = [
            Some((t2, "membership_deleted")),
            Some((t1, "workspace_deleted")),
            Some((t1, "user_deleted")),
            None,
        ];
        let expected = Some((t1, "user_deleted"));
        let n = causes.len();
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                for k in (0..n).filter(|&k| k != i && k != j) {
                    let l = 6 - i - j - k;
                    let order = [causes[i], causes[j], causes[k], causes[l]];
                    assert_eq!(earliest(order), expected, "{order:?}");
                }
            }
        }
    }

    /// Only reconcile's two reasons are inferences; Clerk's three are real ends.
    #[test]
    fn only_reconciles_reasons_are_inferred() {
        assert!(inferred(NOT_IN_CLERK));
        assert!(inferred(WORKSPACE_NOT_IN_CLERK));
        for real in [
            "membership_deleted",
            "workspace_deleted",
            "user_deleted",
            "",
        ] {
            assert!(!inferred(real), "{real}");
        }
    }

    /// Clerk's millisecond times convert exactly; a time out of range (never
    /// decoded) falls to the earliest timestamp instead of panicking.
    #[test]
    fn clerk_times_convert_by_the_millisecond() {
        assert_eq!(ts(1_700_000_000_123).timestamp_millis(), 1_700_000_000_123);
        assert_eq!(ts(0), DateTime::<Utc>::UNIX_EPOCH);
        assert_eq!(ts(i64::MAX), DateTime::<Utc>::MIN_UTC);
    }
}
