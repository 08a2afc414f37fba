//! What intake knows about a webhook apart from HTTP: its signature
//! ([`signature`]) and the head of the event it reads before publishing ([`EventHead`]).
//!
//! Guarantee: intake reads no more of a Clerk event than it needs to route it —
//! the type, the instance id, and that `data` is an object — and the body it
//! publishes is the body that was signed, unchanged.

pub mod signature;

use serde::Deserialize;
use serde_json::value::RawValue;

pub use signature::{Verifier, VerifyError};

/// The only part of a Clerk event intake reads.
#[derive(Debug, Deserialize)]
pub struct EventHead<'a> {
    /// Event type, e.g. `organization.created`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Clerk instance id.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Event data; intake only checks it is a JSON object.
    #[serde(borrow)]
    pub data: &'a RawValue,
}

impl<'a> EventHead<'a> {
    /// Parses the envelope; `data` must be an object.
    pub fn parse(body: &'a [u8]) -> Result<Self, String> {
        let env: EventHead<'a> = serde_json::from_slice(body).map_err(|e| {
            format!("body is not a Clerk event (JSON object with `type` and `data`): {e}")
        })?;
        if !env.data.get().trim_start().starts_with('{') {
            return Err("`data` must be a JSON object".to_owned());
        }
        Ok(env)
    }
}
