//! The crate's error type: one enum per module, joined here.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Mqtt(#[from] crate::mqtt::MqttError),
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    #[error(transparent)]
    Certs(#[from] crate::certs::CertsError),
}
