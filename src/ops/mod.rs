//! Operator commands: send test events, dead letters, the event log, reconcile, load.

pub mod dlq;
pub mod events;
pub mod load;
pub mod reconcile;
pub mod send;
