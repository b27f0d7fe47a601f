//! The control conversation between a source and a target agent on the data
//! connection, around the checkpoint stream (see `stream::wire`):
//!
//! ```text
//! source                                 target
//!   Prepare{job, spec, state, estimate,
//!           the signed order}        ->  the order checked; precheck; has the image?
//!                                 <-      SendImage{have}      (only if not)
//!   (the image stream)            ->      load it              (only if asked)
//!                                         tag the image, create the volumes
//!                                         and the container
//!                                 <-      Prepared | Refused{reason}
//!   Progress{phase, bytes} ...    ->      (every few seconds while the
//!                                         source checkpoints and packs)
//!   Sending                       ->      the stream follows at once
//!   (the stream)                  ->      verify, unpack, apply files and
//!                                         volumes
//!                                 <-      Restored | Failed{reason}
//!   Commit                        ->      keep the container
//!                                 <-      Committed
//! ```
//! If the connection ends before `Commit`, the target removes what it
//! created (container, volumes): the source then still holds (or restores)
//! the original. A target that stops (its agent drains) before `Restored`
//! says `Failed{reason}` (or a refusing stream verdict once the stream
//! began) and removes what it created; the source rolls back. While the
//! source checkpoints, the target waits only as long as `Progress` keeps
//! coming: a checkpoint may take minutes, a silent source is gone. The image stream is a second `stream::wire` transfer on
//! the same connection, so it has the checkpoint's rate limit and TLS; it
//! runs while the container still runs.
//! Messages are JSON, each behind a u32 big-endian length.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

use super::recovery::{Decision, Holding};
use crate::runtime::state::StatePlan;
use crate::runtime::ContainerSpec;
use crate::stream::{wire, StreamError};

/// Control messages share the data connection's frame cap: a `Prepare`
/// carries the whole create body (env, labels, mounts).
pub use crate::stream::wire::MAX_MESSAGE;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToTarget {
    Prepare(Box<Prepare>),
    /// Keepalive between `Prepared` and the stream: the source is still at
    /// `phase` (`checkpoint`, `pack`), `bytes` written so far if known.
    Progress {
        phase: String,
        bytes: u64,
    },
    /// The checkpoint stream (`stream::wire`) follows this message.
    Sending,
    Commit,
    /// Recovery, first message on a new connection from the job's source:
    /// what does the target hold for `job_id`? Answer: `Holding`.
    Outcome {
        job_id: String,
        container: String,
    },
    /// Recovery, from the job's target to its source (any data port
    /// serves both): what did the source decide? Answer: `Decided`.
    Decision {
        job_id: String,
    },
}

/// How often the source says `Progress` while the target waits for the
/// stream.
pub const KEEPALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The source's request to receive a container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepare {
    pub job_id: String,
    pub source_node: String,
    pub target_node: String,
    pub checkpoint: String,
    pub spec: ContainerSpec,
    /// The container's image, volumes and restart policy. `None` from a
    /// source that moves memory only: the target must have the image.
    #[serde(default)]
    pub state: Option<StatePlan>,
    /// Expected size of the checkpoint images (the container's memory,
    /// plus its files and volumes).
    pub estimate_bytes: u64,
    /// The source engine's view, checked again by the target.
    pub arch: String,
    pub page_size: u64,
    /// The container's full id on the source: a signed order may name the
    /// container by id.
    #[serde(default)]
    pub container_id: String,
    /// The manager's signed order for this job, as the source received it;
    /// a target with the manager's key checks it itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<crate::mqtt::contract::Envelope>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToSource {
    /// The target lacks the image: send it without the layers whose chain
    /// ids are in `have`.
    SendImage {
        have: Vec<String>,
    },
    Prepared {
        container_id: String,
    },
    Refused {
        reason: String,
    },
    Restored,
    Failed {
        reason: String,
    },
    Committed,
    /// Answer to `Outcome`.
    Holding {
        holding: Holding,
    },
    /// Answer to `Decision`.
    Decided {
        decision: Decision,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("peer closed the data connection")]
    Closed,
    #[error(transparent)]
    Stream(#[from] StreamError),
}

pub async fn send<W, M>(w: &mut W, msg: &M) -> Result<(), ProtocolError>
where
    W: AsyncWrite + Unpin,
    M: Serialize,
{
    Ok(wire::write_json_frame(w, msg, "control message", MAX_MESSAGE).await?)
}

pub async fn recv<R, M>(r: &mut R) -> Result<M, ProtocolError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
{
    match wire::read_json_frame(r, "control message", MAX_MESSAGE).await {
        Err(StreamError::Truncated(_)) => Err(ProtocolError::Closed),
        other => Ok(other?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn messages_round_trip_and_limits_hold() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        send(
            &mut a,
            &ToSource::Refused {
                reason: "no image".into(),
            },
        )
        .await
        .unwrap();
        let got: ToSource = recv(&mut b).await.unwrap();
        assert_eq!(
            got,
            ToSource::Refused {
                reason: "no image".into()
            }
        );

        a.write_all(&(MAX_MESSAGE + 1).to_be_bytes()).await.unwrap();
        let err = recv::<_, ToSource>(&mut b).await.unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");

        let (mut a, mut b) = tokio::io::duplex(1024);
        send(
            &mut a,
            &serde_json::json!({"msg": "failed", "reason": "x", "extra": 1}),
        )
        .await
        .unwrap();
        let err = recv::<_, ToSource>(&mut b).await.unwrap_err();
        assert!(err.to_string().contains("extra"), "{err}");
        drop(a);
        assert!(matches!(
            recv::<_, ToSource>(&mut b).await,
            Err(ProtocolError::Closed)
        ));
    }
}
