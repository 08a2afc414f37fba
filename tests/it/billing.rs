//! Clerk Billing (issue 22, DESIGN §5b) against a real PostgreSQL: storage of
//! subscriptions and items (version gates, duplicates and every order converge),
//! user payers ignored, billing before its organization, deleted workspaces.

mod pipeline;
mod storage;
