//! Clerk webhook vocabulary shared by intake, worker and tools.
//!
//! Payload shapes and their tolerant decoding live in `provision::payload`.

/// Event types this service handles; everything else is answered `ignored`.
pub const HANDLED_TYPES: [&str; 8] = [
    "organization.created",
    "organization.updated",
    "organization.deleted",
    "organizationMembership.created",
    "organizationMembership.updated",
    "organizationMembership.deleted",
    "user.updated",
    "user.deleted",
];

/// Whether intake queues events of this type.
pub fn is_handled(kind: &str) -> bool {
    HANDLED_TYPES.contains(&kind)
}
