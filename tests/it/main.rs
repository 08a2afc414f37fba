//! The integration tests, one binary with a module per concern (as
//! zero-to-production and svix do): the harness in [`common`] compiles once,
//! and tests of different concerns run side by side on libtest's threads.
//! Test names read `module::test`; `cargo test --test it module::` runs one
//! concern. Every test opens with a `///` line saying what it proves.
//!
//! Every test runs against the machine's real PostgreSQL and RabbitMQ in a
//! database and broker names of its own ([`common::Isolation`]); the suites that
//! start their own RabbitMQ cluster ([`cluster`]), PostgreSQL cluster and
//! processes ([`faults`]) or a browser ([`ops_browser`]) own everything they
//! break, so they share the run with the rest.
//!
//! What a process holds once is shared by every test here: the metrics recorder
//! above all, which counts every in-process app's intake and worker. A test that
//! needs a process of its own state (the console overview of a process without a
//! worker) runs the binary as a child process (`common::ops::Served`,
//! `common::children::Process`).

mod common;

mod api;
mod api_isolation;
mod billing;
mod clerk_api;
mod cluster;
mod convergence;
mod database_faults;
mod faults;
mod http_connections;
mod http_limits;
mod intake;
mod intake_broker;
mod lifecycle;
mod nemesis;
mod observability;
mod ops_browser;
mod ops_console;
mod ops_dlq;
mod ops_events;
mod ops_login;
mod ops_loop;
mod ops_send;
mod provision;
mod reconcile;
mod sync;
mod worker;
mod worker_failures;
