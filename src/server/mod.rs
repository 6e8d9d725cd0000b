//! The agent's listeners: the HTTP ingest API and the Unix-socket admin API.

pub mod accept;
pub mod admin;
pub mod body;
pub mod connection;
pub mod ingest;
pub mod ingest_token;
pub mod tls;
