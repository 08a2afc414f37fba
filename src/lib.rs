//! Callmine provisioner: turns Clerk organization and membership webhooks into
//! Callmine's own record of workspaces.
//!
//! The flow reads from the module tree: [`config`] → [`intake`] → [`broker`] →
//! [`worker`] / [`provision`] → [`db`] → [`store`] → [`http`] → [`ops`];
//! [`domain`] holds the types they share (one `Role`); [`startup`] builds and
//! runs it, and only [`cli`] imports [`startup`].

pub mod broker;
pub mod clerk;
pub mod cli;
pub mod config;
pub mod db;
pub mod dead_letters;
pub mod domain;
pub mod http;
pub mod intake;
pub mod ops;
pub mod progress;
pub mod provision;
pub mod reconcile;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod worker;
