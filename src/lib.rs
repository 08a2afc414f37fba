//! Callmine provisioner: turns Clerk organization and membership webhooks into
//! Callmine's own record of workspaces.
//!
//! The flow reads from the module tree: [`config`] → [`intake`] → [`broker`] →
//! [`worker`] / [`provision`] → [`db`] → [`store`] → [`http`]; [`dead_letters`]
//! and [`store::events`] are the operator's capabilities, which the ops console
//! ([`http::console`]) and the command line ([`cli`]) both call; [`domain`] holds
//! the types they share (one `Role`), [`progress`] how long operations report
//! progress, [`telemetry`] logging, metrics and the series names; [`startup`]
//! builds and runs it, and only [`cli`] imports [`startup`].

pub mod broker;
pub mod clerk;
pub mod cli;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod domain;
pub mod http;
pub mod intake;
pub mod progress;
pub mod provision;
pub mod reconcile;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod worker;
