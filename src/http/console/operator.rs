//! The signed-in operator and the one-line result ("flash") of their last action:
//! the plain data every console page is drawn with. How an operator is found (the
//! session behind the cookie, its CSRF check) is [`super::session`].
//!
//! Guarantee: an [`Operator`]'s CSRF token and session hash never reach a log
//! (its `Debug` shows the label only).

use serde::{Deserialize, Serialize};

/// The one-line result of an action, shown once by the next page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flash {
    /// Whether the action succeeded.
    pub ok: bool,
    /// The line.
    pub text: String,
    /// Details under it (a sync's drift, a bulk replay's failures).
    #[serde(default)]
    pub lines: Vec<String>,
}

impl Flash {
    /// A success.
    pub fn ok(text: impl Into<String>) -> Self {
        Self {
            ok: true,
            text: text.into(),
            lines: Vec::new(),
        }
    }

    /// A failure.
    pub fn failed(text: impl Into<String>) -> Self {
        Self {
            ok: false,
            text: text.into(),
            lines: Vec::new(),
        }
    }

    /// With detail lines.
    pub fn with_lines(mut self, lines: Vec<String>) -> Self {
        self.lines = lines;
        self
    }
}

/// A signed-in operator (a live session).
#[derive(Clone)]
pub struct Operator {
    /// Who: the login label or `ops token N`.
    pub label: String,
    /// The session's CSRF token, for the forms of the page.
    pub csrf: String,
    /// The result of the last action, taken by this (GET) request.
    pub flash: Option<Flash>,
    /// SHA-256 of the session id: the row of `ops_sessions` (set by [`super::session`]).
    pub(super) id_hash: Vec<u8>,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The CSRF token and the session hash stay out of logs.
        f.debug_struct("Operator")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}
