//! Clerk Billing (issue 22, DESIGN §5b) against a real PostgreSQL: storage of
//! subscriptions and items (version gates, duplicates and every order converge),
//! user payers ignored, billing before its organization, deleted workspaces.

mod common;
#[path = "billing/pipeline.rs"]
mod pipeline;
#[path = "billing/storage.rs"]
mod storage;
