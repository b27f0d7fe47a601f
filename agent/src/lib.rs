//! ferry: live migration of Docker containers between edge devices.
//!
//! The binary (`src/main.rs`) is a thin shell over this library:
//! - [`config`]: the agent's validated configuration (flags + TOML).
//! - [`mqtt`]: the MQTT contract (topics, payloads) and the one task that owns the connection.
//! - [`runtime`]: the container engine behind a trait; Docker via bollard.
//! - [`stream`]: checkpoint transfer: tar, zstd, rate limit, checksum, mutual TLS.
//! - [`migration`]: the sans-I/O migration state machine and the drivers that act on it.
//! - [`cli`]: the fleet manager's commands (migrate, nodes, watch, certs).
//! - [`agent`]: `ferry agent`, the service that ties these together on a device.
//! - [`certs`]: a development fleet PKI, and the manager's order signing key.
//! - [`order`]: signed orders: the manager signs jobs, agents verify them.
//! - [`systemd`]: sd_notify (READY, watchdog, STOPPING) for the systemd unit.

pub mod agent;
pub mod certs;
pub mod cli;
pub mod config;
pub mod error;
pub mod migration;
pub mod mqtt;
pub mod order;
pub mod runtime;
pub mod stream;
pub mod sysinfo;
pub mod systemd;

pub use error::Error;
