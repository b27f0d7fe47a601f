//! MQTT: orders in, events out.
//!
//! - [`contract`]: topics and payloads as plain data, and the job parser that
//!   treats every payload as hostile.
//! - [`ledger`]: the job ids already seen, so a job never runs twice.
//! - [`board`]: retained statuses, latest value wins, until the broker
//!   acknowledged them.
//! - [`client`]: the one task that owns the broker connection.

pub mod board;
pub mod client;
pub mod contract;
pub mod ledger;

pub use client::{spawn, Ack, BrokerUrl, ClientSettings, Inbound, MqttHandle};
pub use contract::{
    parse_job, validate_id, Accepted, ContractError, JobRequest, JobState, JobStatus,
    MigrateOptions, NodeStatus, Phase, RateSpec, Rejected, Role, TopicKind, Topics,
};
pub use ledger::JobLedger;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error("invalid broker url {url}: {reason}")]
    BrokerUrl { url: String, reason: String },
    #[error("invalid mqtt settings: {0}")]
    Settings(String),
    #[error("cannot publish to topic {topic}: {reason}")]
    Topic { topic: String, reason: &'static str },
    #[error("cannot encode the payload for {topic}: {source}")]
    Encode {
        topic: String,
        source: serde_json::Error,
    },
    #[error("payload for {topic} too large: {size} bytes (max {max})")]
    TooLarge {
        topic: String,
        size: usize,
        max: usize,
    },
    #[error("mqtt outgoing queue full, {topic} not published (broker unreachable?)")]
    QueueFull { topic: String },
    #[error("mqtt client stopped, {topic} not published")]
    Closed { topic: String },
}
