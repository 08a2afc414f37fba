//! The authenticated read API of DESIGN §6 for the main app.

use axum::Router;

use crate::startup::AppState;

/// The `/v1` routes.
pub fn router() -> Router<AppState> {
    Router::new()
}
