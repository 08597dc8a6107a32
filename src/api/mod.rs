//! The local HTTP API (axum) and the web console's embedded assets.

pub mod console;
