//! Switchyard: an OpenAI-compatible inference gateway. The binary's CLI is in `main.rs`;
//! the request path is described on `server` (see `server/mod.rs`).
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

/// A name from the config (key, team, route, deployment, provider) as requests carry it:
/// shared, so that a request's log line, ledger row and metrics take it without copying.
pub type Name = std::sync::Arc<str>;

pub mod api;
pub mod auth;
pub mod cache;
pub mod config;
pub mod error;
pub mod ledger;
pub mod policy;
pub mod provider;
pub mod route;
pub mod server;
pub mod stream;
pub mod telemetry;
