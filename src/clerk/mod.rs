//! Clerk's vocabulary shared by intake, worker and tools: the event types, and
//! (in [`api`]) the Backend API client reconciliation reads Clerk with.
//!
//! Guarantee: an event type is parsed once into an [`EventType`]; whether it is
//! handled, and which entity kind it is about, is read from that value, never by
//! comparing strings again. Payload shapes and their tolerant decoding live in
//! `provision::payload`.

pub mod api;
pub mod fake;
pub mod sample;

/// Event types this service handles; everything else (`paymentAttempt.*`, sessions,
/// emails, invitations, …) is answered `ignored`.
pub const HANDLED_TYPES: [&str; 22] = [
    "organization.created",
    "organization.updated",
    "organization.deleted",
    "organizationMembership.created",
    "organizationMembership.updated",
    "organizationMembership.deleted",
    "user.updated",
    "user.deleted",
    "subscription.created",
    "subscription.updated",
    "subscription.active",
    "subscription.pastDue",
    "subscriptionItem.created",
    "subscriptionItem.updated",
    "subscriptionItem.active",
    "subscriptionItem.canceled",
    "subscriptionItem.upcoming",
    "subscriptionItem.ended",
    "subscriptionItem.abandoned",
    "subscriptionItem.incomplete",
    "subscriptionItem.pastDue",
    "subscriptionItem.freeTrialEnding",
];

/// A handled event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handled {
    /// `organization.created`.
    OrganizationCreated,
    /// `organization.updated`.
    OrganizationUpdated,
    /// `organization.deleted`.
    OrganizationDeleted,
    /// `organizationMembership.created`.
    MembershipCreated,
    /// `organizationMembership.updated`.
    MembershipUpdated,
    /// `organizationMembership.deleted`.
    MembershipDeleted,
    /// `user.updated`.
    UserUpdated,
    /// `user.deleted`.
    UserDeleted,
    /// `subscription.created`.
    SubscriptionCreated,
    /// `subscription.updated`.
    SubscriptionUpdated,
    /// `subscription.active`.
    SubscriptionActive,
    /// `subscription.pastDue`.
    SubscriptionPastDue,
    /// `subscriptionItem.created` (typed in `@clerk/backend`, absent from the spec).
    ItemCreated,
    /// `subscriptionItem.updated`.
    ItemUpdated,
    /// `subscriptionItem.active`.
    ItemActive,
    /// `subscriptionItem.canceled`.
    ItemCanceled,
    /// `subscriptionItem.upcoming`.
    ItemUpcoming,
    /// `subscriptionItem.ended`.
    ItemEnded,
    /// `subscriptionItem.abandoned`.
    ItemAbandoned,
    /// `subscriptionItem.incomplete`.
    ItemIncomplete,
    /// `subscriptionItem.pastDue`.
    ItemPastDue,
    /// `subscriptionItem.freeTrialEnding`.
    ItemFreeTrialEnding,
}

impl Handled {
    /// Every handled type, in the order of [`HANDLED_TYPES`].
    pub const ALL: [Handled; 22] = [
        Handled::OrganizationCreated,
        Handled::OrganizationUpdated,
        Handled::OrganizationDeleted,
        Handled::MembershipCreated,
        Handled::MembershipUpdated,
        Handled::MembershipDeleted,
        Handled::UserUpdated,
        Handled::UserDeleted,
        Handled::SubscriptionCreated,
        Handled::SubscriptionUpdated,
        Handled::SubscriptionActive,
        Handled::SubscriptionPastDue,
        Handled::ItemCreated,
        Handled::ItemUpdated,
        Handled::ItemActive,
        Handled::ItemCanceled,
        Handled::ItemUpcoming,
        Handled::ItemEnded,
        Handled::ItemAbandoned,
        Handled::ItemIncomplete,
        Handled::ItemPastDue,
        Handled::ItemFreeTrialEnding,
    ];

    /// The type's name on the wire.
    pub fn as_str(self) -> &'static str {
        HANDLED_TYPES[self as usize]
    }

    /// A `subscription.*` type: `data` is the subscription with its items.
    pub fn is_subscription(self) -> bool {
        matches!(
            self,
            Handled::SubscriptionCreated
                | Handled::SubscriptionUpdated
                | Handled::SubscriptionActive
                | Handled::SubscriptionPastDue
        )
    }

    /// A `subscriptionItem.*` type: `data` is one item with its payer.
    pub fn is_subscription_item(self) -> bool {
        self as usize >= Handled::ItemCreated as usize
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.as_str() == name)
    }
}

/// A Clerk event type as named on the wire, with its handled kind read once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventType {
    name: String,
    handled: Option<Handled>,
}

impl EventType {
    /// Reads a type name; any text is a type, handled or not.
    pub fn parse(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            handled: Handled::from_name(name),
        }
    }

    /// The name as on the wire.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The handled kind, `None` for types this service ignores.
    pub fn handled(&self) -> Option<Handled> {
        self.handled
    }

    /// Whether intake queues events of this type.
    pub fn is_handled(&self) -> bool {
        self.handled.is_some()
    }

    /// The `type` label of metrics: handled types as they are, anything else
    /// folded into `other`, so a stray message cannot create unbounded series.
    pub fn metric_label(&self) -> &'static str {
        self.handled.map_or("other", Handled::as_str)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Whether intake queues events of this type (for callers holding only the name).
pub fn is_handled(kind: &str) -> bool {
    Handled::from_name(kind).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_types_parse_to_their_kind_and_back() {
        for (name, handled) in HANDLED_TYPES.into_iter().zip(Handled::ALL) {
            let t = EventType::parse(name);
            assert_eq!(t.handled(), Some(handled));
            assert_eq!(t.as_str(), name);
            assert_eq!(t.metric_label(), name);
        }
    }

    #[test]
    fn billing_types_are_handled_and_payment_attempts_ignored() {
        for name in ["subscription.pastDue", "subscriptionItem.freeTrialEnding"] {
            assert!(is_handled(name), "{name}");
        }
        let sub = EventType::parse("subscription.active").handled().unwrap();
        assert!(sub.is_subscription() && !sub.is_subscription_item());
        let item = EventType::parse("subscriptionItem.created")
            .handled()
            .unwrap();
        assert!(item.is_subscription_item() && !item.is_subscription());
        let org = EventType::parse("organization.created").handled().unwrap();
        assert!(!org.is_subscription() && !org.is_subscription_item());
        for name in [
            "paymentAttempt.created",
            "paymentAttempt.updated",
            "subscription.past_due",
        ] {
            assert!(!is_handled(name), "{name}");
        }
    }

    #[test]
    fn other_types_are_kept_but_not_handled() {
        let t = EventType::parse("session.created");
        assert!(!t.is_handled());
        assert_eq!(t.as_str(), "session.created");
        assert_eq!(t.metric_label(), "other");
        assert!(!is_handled(""));
    }
}
