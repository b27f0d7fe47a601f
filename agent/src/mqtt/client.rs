//! The one task that owns the broker connection.
//!
//! It polls rumqttc's `EventLoop` and nothing else does: incoming publishes
//! go to a bounded channel as [`Inbound`] events, outgoing ones come in
//! through cloned [`MqttHandle`]s. It adds what rumqttc leaves to its user:
//! a backoff between reconnects (rumqttc reconnects on the very next poll),
//! subscriptions on every ConnAck, and a clean goodbye on shutdown.
//!
//! Two guarantees on top:
//! - Manual acknowledgements: an incoming QoS 1 publish is acknowledged
//!   only when the consumer calls [`MqttHandle::ack`] (after it recorded
//!   the job). Unacknowledged, the broker redelivers it on the next
//!   connection of our persistent session.
//! - Retained statuses go through a [`board`](super::board) (latest value
//!   per topic, never blocking the caller). This task alone sends them,
//!   straight into rumqttc's pending queue, so it can tie each to its
//!   packet id and learn which value the broker acknowledged; after a
//!   reconnect it republishes every live or unconfirmed status.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, Publish, QoS, Request,
    SubAck, Subscribe, SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use super::board::SharedBoard;
use super::contract::{quoted, validate_id};
use super::MqttError;

pub const DEFAULT_PORT: u16 = 1883;
pub const DEFAULT_TLS_PORT: u16 = 8883;
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Largest MQTT packet either way. Far above the 16 KiB job cap so that an
/// oversized job is rejected by the contract: rumqttc drops the connection
/// on an oversized packet, and a persistent session would then redeliver it
/// after every reconnect.
pub const MAX_PACKET_SIZE: usize = 256 * 1024;
/// Inbound events not yet taken by the consumer.
pub const INBOUND_CAPACITY: usize = 64;
/// Outgoing requests queued while the broker is slow or away.
pub const OUTGOING_CAPACITY: usize = 256;
/// How long a publish may wait for room in the outgoing queue. Bounded so
/// that a consumer publishing while the task waits on it cannot deadlock,
/// and a migration is never stalled for long by a missing broker.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Board statuses sent and not yet acknowledged, at most. Well under
/// rumqttc's in-flight limit (100): rumqttc sends its pending queue, where
/// these go, without checking that limit.
const BOARD_WINDOW: usize = 16;
/// How long an acknowledgement may wait for room in the outgoing queue.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the goodbye to be written.
const GOODBYE_DEADLINE: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that lived this long resets the backoff; one that dies
/// sooner (duplicate client id, poisoned session) keeps growing it.
const STABLE_AFTER: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Broker URL

/// `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    tls: bool,
    /// As rumqttc wants it: IPv6 literals keep their brackets.
    host: String,
    port: u16,
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<Self, MqttError> {
        let bad = |reason: &str| MqttError::BrokerUrl {
            url: quoted(url),
            reason: reason.to_owned(),
        };
        let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(bad("expected mqtt://host[:port] or mqtts://host[:port]"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad(
                "only a host and a port are allowed (no user, path or query)",
            ));
        }

        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed '[' in an IPv6 address"))?;
            addr.parse::<Ipv6Addr>()
                .map_err(|_| bad("invalid IPv6 address"))?;
            if tls {
                // rumqttc would pass "[addr]" as the TLS server name, which fails.
                return Err(bad(
                    "mqtts:// to an IPv6 literal is not supported; use a host name",
                ));
            }
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad("expected ':' after ']'"))?,
                ),
            };
            (format!("[{addr}]"), port)
        } else {
            let (host, port) = match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            };
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            if host.len() > 253
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            {
                return Err(bad("invalid host name"));
            }
            (host.to_owned(), port)
        };

        let port = match port {
            None if tls => DEFAULT_TLS_PORT,
            None => DEFAULT_PORT,
            Some(p) => {
                // u16::from_str would take "+1".
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad("the port must be a number"));
                }
                match p.parse::<u16>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(bad("the port must be 1..=65535")),
                }
            }
        };
        Ok(BrokerUrl { tls, host, port })
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for BrokerUrl {
    type Err = MqttError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BrokerUrl::parse(s)
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

// ---------------------------------------------------------------------------
// Settings

#[derive(Clone)]
pub struct ClientSettings {
    pub url: BrokerUrl,
    /// The node id for an agent: fixed, so that its session survives.
    pub client_id: String,
    /// False for agents: jobs published while they were away still arrive.
    pub clean_session: bool,
    pub keep_alive: Duration,
    /// Required for `mqtts://`, refused for `mqtt://`. Build it with an
    /// explicit provider (`rustls::crypto::ring::default_provider()`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Topic, payload, retain; QoS 1. Also published by the client itself on
    /// a clean shutdown, since a clean DISCONNECT makes the broker drop it.
    pub last_will: Option<(String, Vec<u8>, bool)>,
    /// Filters subscribed with QoS 1 on every ConnAck.
    pub subscriptions: Vec<String>,
    /// Incoming publishes are acknowledged only through [`MqttHandle::ack`]
    /// (an agent, after recording a job); otherwise on receipt.
    pub manual_acks: bool,
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The TLS config holds the client key: never print it.
        f.debug_struct("ClientSettings")
            .field("url", &self.url.to_string())
            .field("client_id", &self.client_id)
            .field("clean_session", &self.clean_session)
            .field("keep_alive", &self.keep_alive)
            .field("tls", &self.tls.as_ref().map(|_| "<rustls config>"))
            .field(
                "last_will",
                &self
                    .last_will
                    .as_ref()
                    .map(|(t, p, r)| format!("{t} ({} bytes, retain {r})", p.len())),
            )
            .field("subscriptions", &self.subscriptions)
            .field("manual_acks", &self.manual_acks)
            .finish()
    }
}

impl ClientSettings {
    /// A persistent session with the default keep-alive, no TLS, no will,
    /// no subscriptions.
    pub fn new(url: BrokerUrl, client_id: impl Into<String>) -> Self {
        ClientSettings {
            url,
            client_id: client_id.into(),
            clean_session: false,
            keep_alive: DEFAULT_KEEP_ALIVE,
            tls: None,
            last_will: None,
            subscriptions: Vec::new(),
            manual_acks: false,
        }
    }

    /// Everything rumqttc would otherwise panic on or fail at connect time.
    pub fn validate(&self) -> Result<(), MqttError> {
        validate_id("client id", &self.client_id)?;
        if self.keep_alive < Duration::from_secs(1) || self.keep_alive > Duration::from_secs(65535)
        {
            return Err(MqttError::Settings(format!(
                "keep_alive must be 1 s..=65535 s, got {:?}",
                self.keep_alive
            )));
        }
        match (self.url.is_tls(), self.tls.is_some()) {
            (true, false) => {
                return Err(MqttError::Settings(format!(
                    "{} needs a TLS client config",
                    self.url
                )))
            }
            (false, true) => {
                return Err(MqttError::Settings(format!(
                    "a TLS client config was given for the plain url {}",
                    self.url
                )))
            }
            _ => {}
        }
        if let Some((topic, payload, _)) = &self.last_will {
            check_publish(topic, payload.len())?;
        }
        for filter in &self.subscriptions {
            if !rumqttc::valid_filter(filter) || filter.contains('\0') {
                return Err(MqttError::Settings(format!(
                    "invalid subscription filter {}",
                    quoted(filter)
                )));
            }
        }
        Ok(())
    }

    fn mqtt_options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(self.client_id.clone(), self.url.host(), self.url.port());
        o.set_clean_session(self.clean_session)
            .set_manual_acks(self.manual_acks)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE);
        if let Some((topic, payload, retain)) = &self.last_will {
            o.set_last_will(LastWill::new(
                topic.clone(),
                payload.clone(),
                QoS::AtLeastOnce,
                *retain,
            ));
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        o
    }
}

/// Refuses what would otherwise fail inside rumqttc's event loop, where an
/// oversized QoS 1 publish kills the connection and is retried after every
/// reconnect.
fn check_publish(topic: &str, payload_len: usize) -> Result<(), MqttError> {
    let reason = if topic.is_empty() {
        "the topic is empty"
    } else if topic.contains(['+', '#']) {
        "wildcards are not allowed in a topic name"
    } else if topic.contains('\0') {
        "the topic contains NUL"
    } else {
        // Fixed header (1 + up to 4), topic length (2), packet id (2).
        let size = 9 + topic.len() + payload_len;
        if size > MAX_PACKET_SIZE {
            return Err(MqttError::TooLarge {
                topic: topic.to_owned(),
                size,
                max: MAX_PACKET_SIZE,
            });
        }
        return Ok(());
    };
    Err(MqttError::Topic {
        topic: quoted(topic),
        reason,
    })
}

// ---------------------------------------------------------------------------
// Handle and events

/// What the connection task reports, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// After every ConnAck, subscriptions already queued, board statuses
    /// (live or unconfirmed) due again.
    Connected { session_present: bool },
    /// A publish on a subscribed filter. With manual acks, not
    /// acknowledged to the broker until the consumer passes `ack` to
    /// [`MqttHandle::ack`]; every message must be, or the broker stops
    /// delivering once its in-flight window is full.
    Message {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
        ack: Ack,
    },
    /// The connection failed or could not be made; the next attempt is in
    /// `retry_in`.
    Disconnected { error: String, retry_in: Duration },
}

/// What acknowledges one incoming publish (its QoS and packet id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    qos: QoS,
    pkid: u16,
}

impl Ack {
    fn of(p: &Publish) -> Ack {
        Ack {
            qos: p.qos,
            pkid: p.pkid,
        }
    }
}

/// Publishes through the connection task. Cheap to clone.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    board: Arc<SharedBoard>,
}

impl fmt::Debug for MqttHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MqttHandle")
    }
}

/// `value` as the JSON payload of a publish on `topic`.
fn encode<T: Serialize + ?Sized>(topic: &str, value: &T) -> Result<Vec<u8>, MqttError> {
    serde_json::to_vec(value).map_err(|source| MqttError::Encode {
        topic: topic.to_owned(),
        source,
    })
}

impl MqttHandle {
    /// Sets the retained status on `topic` to `value` (JSON, QoS 1) without
    /// waiting: the connection task sends the latest value when it can.
    /// `live`: republish it after every reconnect (a running job, the node
    /// status); otherwise only until the broker acknowledged it.
    pub fn publish_latest<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
        live: bool,
    ) -> Result<(), MqttError> {
        let payload = encode(topic, value)?;
        check_publish(topic, payload.len())?;
        self.board.set(topic, payload, live);
        Ok(())
    }

    /// Acknowledges an incoming publish to the broker. Call it once the
    /// message is handled for good (a job: recorded in the ledger). If it
    /// does not get through (the connection dropped), the broker delivers
    /// the message again.
    pub async fn ack(&self, ack: &Ack) -> Result<(), MqttError> {
        let mut p = Publish::new("", ack.qos, Vec::new());
        p.pkid = ack.pkid;
        let closed = || MqttError::Closed {
            topic: format!("(ack of packet {})", ack.pkid),
        };
        match tokio::time::timeout(ACK_TIMEOUT, self.client.ack(&p)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(MqttError::QueueFull {
                topic: format!("(ack of packet {})", ack.pkid),
            }),
        }
    }

    /// Queues `value` as JSON with QoS 1. Returns once queued (sent later,
    /// after a reconnect if need be), or an error after a bounded wait.
    pub async fn publish_json<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
        retain: bool,
    ) -> Result<(), MqttError> {
        let payload = encode(topic, value)?;
        self.publish_raw(topic, payload, retain).await
    }

    /// Queues raw bytes with QoS 1; see [`MqttHandle::publish_json`].
    pub async fn publish_raw(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), MqttError> {
        check_publish(topic, payload.len())?;
        let queued = self
            .client
            .publish(topic, QoS::AtLeastOnce, retain, payload);
        match tokio::time::timeout(ENQUEUE_TIMEOUT, queued).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(MqttError::Closed {
                topic: topic.to_owned(),
            }),
            Err(_) => Err(MqttError::QueueFull {
                topic: topic.to_owned(),
            }),
        }
    }
}

/// Starts the connection task (inside a Tokio runtime).
///
/// It runs until `shutdown` is cancelled or the receiver is dropped, then
/// publishes the will (if any), disconnects cleanly within a short deadline
/// and ends; the receiver then yields `None`. Cancel `shutdown` only after
/// the last status that must reach the broker has been published.
pub fn spawn(
    settings: ClientSettings,
    shutdown: CancellationToken,
) -> Result<(MqttHandle, mpsc::Receiver<Inbound>, JoinHandle<()>), MqttError> {
    settings.validate()?;
    let (client, eventloop) = AsyncClient::new(settings.mqtt_options(), OUTGOING_CAPACITY);
    let (tx, rx) = mpsc::channel(INBOUND_CAPACITY);
    let board = Arc::new(SharedBoard::default());
    let span = tracing::info_span!("mqtt", broker = %settings.url, client_id = %settings.client_id);
    let conn = Connection {
        eventloop,
        client: client.clone(),
        tx,
        shutdown,
        subscriptions: settings.subscriptions,
        will: settings.last_will,
        carry: VecDeque::new(),
        backoff: Backoff::default(),
        board: board.clone(),
        connected: false,
        awaiting: VecDeque::new(),
        inflight: HashMap::new(),
    };
    let task = tokio::spawn(conn.run().instrument(span));
    Ok((MqttHandle { client, board }, rx, task))
}

// ---------------------------------------------------------------------------
// The task

struct Connection {
    eventloop: EventLoop,
    /// For the goodbye only; the task must never await its own queue.
    client: AsyncClient,
    tx: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
    subscriptions: Vec<String>,
    will: Option<(String, Vec<u8>, bool)>,
    /// Unacknowledged requests of the lost connection, kept here because
    /// rumqttc clears its own copy when the broker has no session for us.
    carry: VecDeque<Request>,
    backoff: Backoff,
    board: Arc<SharedBoard>,
    /// Between a ConnAck and the next error.
    connected: bool,
    /// Board statuses in rumqttc's pending queue, not yet given a packet id.
    awaiting: VecDeque<(String, u64)>,
    /// Board statuses sent, by packet id, until the broker acknowledges them.
    inflight: HashMap<u16, (String, u64)>,
}

impl Connection {
    async fn run(mut self) {
        loop {
            let board = self.board.clone();
            let polled = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                () = board.changed(), if self.connected => {
                    self.send_board(BOARD_WINDOW);
                    continue;
                }
                ev = self.eventloop.poll() => ev,
            };
            match polled {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.connected = true;
                    info!(
                        session_present = ack.session_present,
                        "connected to the broker"
                    );
                    self.on_connack(ack.session_present);
                    let ev = Inbound::Connected {
                        session_present: ack.session_present,
                    };
                    if !deliver(&self.tx, &self.shutdown, ev).await {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let ev = Inbound::Message {
                        ack: Ack::of(&p),
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        retain: p.retain,
                    };
                    if !deliver(&self.tx, &self.shutdown, ev).await {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => self.check_suback(&ack),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    // Pending goes out in order, before anything else: the
                    // next publish sent is the oldest board status queued.
                    if let Some(sent) = self.awaiting.pop_front() {
                        self.inflight.insert(pkid, sent);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some((topic, version)) = self.inflight.remove(&ack.pkid) {
                        self.board.with(|b| b.acked(&topic, version));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.connected = false;
                    // Board statuses are resent from the board, as their
                    // latest value, not as the copy that was in flight.
                    self.awaiting.clear();
                    self.inflight.clear();
                    let board = &self.board;
                    let carried = self.eventloop.pending.drain(..).filter(|r| match r {
                        Request::Publish(p) => !board.with(|b| b.owns(&p.topic)),
                        _ => true,
                    });
                    self.carry.extend(carried);
                    let retry_in = self.backoff.on_error(Instant::now());
                    warn!(error = %e, retry_in_ms = retry_in.as_millis() as u64, "broker connection lost");
                    let ev = Inbound::Disconnected {
                        error: e.to_string(),
                        retry_in,
                    };
                    if !deliver(&self.tx, &self.shutdown, ev).await {
                        break;
                    }
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(retry_in) => {}
                    }
                }
            }
            if self.connected {
                self.send_board(BOARD_WINDOW);
            }
        }
        if self.connected {
            self.goodbye().await;
        } else if !self.carry.is_empty() {
            warn!(
                requests = self.carry.len(),
                "stopping while disconnected; unacknowledged publishes are lost"
            );
        }
        debug!("mqtt task ended");
    }

    /// Queues the subscriptions ahead of everything, then what the lost
    /// connection left unacknowledged.
    fn on_connack(&mut self, session_present: bool) {
        self.backoff.on_connected(Instant::now());
        let carried = std::mem::take(&mut self.carry);
        let mut queue: VecDeque<Request> = if session_present {
            carried
        } else {
            // A new session knows no packet ids: resend publishes as new,
            // drop acks and releases that refer to the old session.
            carried
                .into_iter()
                .filter_map(|r| match r {
                    Request::Publish(mut p) => {
                        p.pkid = 0;
                        p.dup = false;
                        Some(Request::Publish(p))
                    }
                    _ => None,
                })
                .collect()
        };
        if !self.subscriptions.is_empty() {
            let filters = self
                .subscriptions
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            queue.push_front(Request::Subscribe(Subscribe::new_many(filters)));
        }
        queue.extend(self.eventloop.pending.drain(..));
        self.eventloop.pending = queue;
        self.board.with(|b| b.reconnected());
    }

    /// Hands due board statuses to rumqttc, `window` in flight at most.
    /// Only into an empty pending queue, so that the next publishes rumqttc
    /// sends are exactly these, in order (see `awaiting`).
    fn send_board(&mut self, window: usize) {
        if !self.eventloop.pending.is_empty() {
            return;
        }
        let room = window.saturating_sub(self.inflight.len() + self.awaiting.len());
        if room == 0 {
            return;
        }
        for o in self.board.with(|b| b.take(room)) {
            let mut p = Publish::new(o.topic.clone(), QoS::AtLeastOnce, o.payload);
            p.retain = true;
            self.eventloop.pending.push_back(Request::Publish(p));
            self.awaiting.push_back((o.topic, o.version));
        }
    }

    fn check_suback(&self, ack: &SubAck) {
        // Ours is the only SUBSCRIBE, its codes follow our filters' order.
        for (i, code) in ack.return_codes.iter().enumerate() {
            if *code == SubscribeReasonCode::Failure {
                let filter = self.subscriptions.get(i).map_or("?", String::as_str);
                error!(filter, "the broker refused a subscription (check its ACL)");
            }
        }
    }

    /// Due board statuses, the will (if any), then DISCONNECT behind
    /// everything already queued.
    async fn goodbye(mut self) {
        // Nothing is confirmed any more: order no longer matters.
        for o in self.board.with(|b| b.take(usize::MAX)) {
            let mut p = Publish::new(o.topic, QoS::AtLeastOnce, o.payload);
            p.retain = true;
            self.eventloop.pending.push_back(Request::Publish(p));
        }
        if let Some((topic, payload, retain)) = self.will.take() {
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                .is_err()
            {
                warn!("outgoing queue full; the will is left to the broker");
            }
        }
        if self.client.try_disconnect().is_err() {
            warn!("outgoing queue full; closing without a clean disconnect");
            return;
        }
        let eventloop = &mut self.eventloop;
        let tx = &self.tx;
        // After our DISCONNECT, read on until the broker closes: dropping a
        // socket with unread input sends a RST, and the broker's kernel may
        // then discard the will and DISCONNECT before mosquitto reads them.
        let mut sent = false;
        let drain = async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => sent = true,
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // Not acknowledged: the broker delivers it again.
                        let ev = Inbound::Message {
                            ack: Ack::of(&p),
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        };
                        if tx.try_send(ev).is_err() {
                            warn!("a message arrived during shutdown and was dropped");
                        }
                    }
                    Ok(_) => {}
                    Err(e) if sent => {
                        debug!(error = %e, "the broker closed the connection");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "connection lost during the goodbye");
                        return;
                    }
                }
            }
        };
        let finished = tokio::time::timeout(GOODBYE_DEADLINE, drain).await.is_ok();
        match (sent, finished) {
            (true, _) => info!("disconnected from the broker"),
            (false, true) => {}
            (false, false) => warn!("clean disconnect timed out"),
        }
    }
}

/// Waits for room in the inbound channel. False when the task should stop:
/// shutdown, or nobody listens any more. (A free function: `&Connection`
/// is not `Send`, rumqttc's network is not `Sync`.)
async fn deliver(tx: &mpsc::Sender<Inbound>, shutdown: &CancellationToken, ev: Inbound) -> bool {
    let permit = tokio::select! {
        biased;
        () = shutdown.cancelled() => {
            // Unacknowledged: if there is no room, the broker redelivers it.
            let _ = tx.try_send(ev);
            return false;
        }
        permit = tx.reserve() => permit,
    };
    match permit {
        Ok(permit) => {
            permit.send(ev);
            true
        }
        Err(_) => {
            info!("inbound receiver dropped; stopping");
            false
        }
    }
}

/// Exponential backoff between connection attempts. Pure: the caller passes
/// the time in.
#[derive(Debug)]
struct Backoff {
    next: Duration,
    connected_at: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_MIN,
            connected_at: None,
        }
    }
}

impl Backoff {
    fn on_connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The delay before the next attempt.
    fn on_error(&mut self, now: Instant) -> Duration {
        if let Some(since) = self.connected_at.take() {
            if now.saturating_duration_since(since) >= STABLE_AFTER {
                self.next = BACKOFF_MIN;
            }
        }
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> BrokerUrl {
        BrokerUrl::parse(s).unwrap()
    }

    #[test]
    fn broker_urls() {
        let u = url("mqtt://broker.local");
        assert_eq!(
            (u.is_tls(), u.host(), u.port()),
            (false, "broker.local", 1883)
        );
        let u = url("mqtts://broker.local");
        assert_eq!(
            (u.is_tls(), u.host(), u.port()),
            (true, "broker.local", 8883)
        );
        let u = url("mqtt://127.0.0.1:18830/");
        assert_eq!((u.host(), u.port()), ("127.0.0.1", 18830));
        assert_eq!(u.to_string(), "mqtt://127.0.0.1:18830");
        let u = url("mqtt://[::1]:1884");
        assert_eq!((u.host(), u.port()), ("[::1]", 1884));
        assert_eq!(url("mqtt://[::1]").port(), 1883);
        assert_eq!(
            "mqtts://b:1".parse::<BrokerUrl>().unwrap(),
            url("mqtts://b:1")
        );
    }

    #[test]
    fn bad_broker_urls_say_why() {
        let cases = [
            (
                "tcp://host",
                "expected mqtt://host[:port] or mqtts://host[:port]",
            ),
            ("host:1883", "expected mqtt://"),
            ("MQTT://host", "expected mqtt://"),
            ("mqtt://", "missing host"),
            ("mqtt://:1883", "missing host"),
            ("mqtt://host:", "the port must be a number"),
            ("mqtt://host:+1", "the port must be a number"),
            ("mqtt://host:x", "the port must be a number"),
            ("mqtt://host:0", "the port must be 1..=65535"),
            ("mqtt://host:65536", "the port must be 1..=65535"),
            ("mqtt://user:pw@host", "no user, path or query"),
            ("mqtt://host/path", "no user, path or query"),
            ("mqtt://host?x=1", "no user, path or query"),
            ("mqtt://ho st", "invalid host name"),
            ("mqtt://host:1:2", "the port must be a number"),
            ("mqtt://[::1", "unclosed '['"),
            ("mqtt://[zz]", "invalid IPv6 address"),
            ("mqtt://[::1]x", "expected ':' after ']'"),
            ("mqtts://[::1]", "IPv6 literal is not supported"),
        ];
        for (input, want) in cases {
            let err = BrokerUrl::parse(input).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("invalid broker url {}", quoted(input))),
                "{err}"
            );
            assert!(err.contains(want), "{input}: {err}");
        }
    }

    fn tls_config() -> Arc<rustls::ClientConfig> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        Arc::new(config)
    }

    #[test]
    fn settings_are_validated_before_rumqttc_sees_them() {
        let refusal = |s: &ClientSettings| s.validate().unwrap_err().to_string();
        let ok = ClientSettings::new(url("mqtt://b"), "node-a");
        ok.validate().unwrap();
        assert!(!ok.clean_session);

        let mut s = ok.clone();
        s.client_id = String::new();
        assert!(refusal(&s).starts_with("invalid client id \"\""));

        let mut s = ok.clone();
        s.keep_alive = Duration::from_millis(500);
        assert!(refusal(&s).contains("keep_alive"));

        let mut s = ok.clone();
        s.url = url("mqtts://b");
        assert!(refusal(&s).contains("needs a TLS client config"));
        s.tls = Some(tls_config());
        s.validate().unwrap();
        s.url = url("mqtt://b");
        assert!(refusal(&s).contains("plain url mqtt://b:1883"));

        let mut s = ok.clone();
        s.subscriptions = vec!["ferry/v1/a/jobs/+".into(), "ferry/#/x".into()];
        assert!(refusal(&s).contains("invalid subscription filter \"ferry/#/x\""));

        let mut s = ok;
        s.last_will = Some(("ferry/v1/+/status".into(), b"{}".to_vec(), true));
        assert!(refusal(&s).contains("wildcards"));
    }

    #[test]
    fn debug_hides_the_tls_config() {
        let mut s = ClientSettings::new(url("mqtts://b"), "node-a");
        s.tls = Some(tls_config());
        let d = format!("{s:?}");
        assert!(
            d.contains("<rustls config>") && !d.contains("RootCertStore"),
            "{d}"
        );
    }

    #[test]
    fn publish_checks() {
        check_publish("ferry/v1/a/status", 100).unwrap();
        for (topic, want) in [
            ("", "the topic is empty"),
            ("a/+/b", "wildcards"),
            ("a/#", "wildcards"),
            ("a\0b", "NUL"),
        ] {
            let err = check_publish(topic, 1).unwrap_err().to_string();
            assert!(err.contains(want), "{topic:?}: {err}");
        }
        let err = check_publish("t", MAX_PACKET_SIZE).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "payload for t too large: {} bytes (max {MAX_PACKET_SIZE})",
                MAX_PACKET_SIZE + 10
            )
        );
        check_publish("t", MAX_PACKET_SIZE - 10).unwrap();
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut b = Backoff::default();
        let t = Instant::now();
        let delays: Vec<u64> = (0..10).map(|_| b.on_error(t).as_millis() as u64).collect();
        assert_eq!(
            delays,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn backoff_resets_after_a_stable_connection_only() {
        let mut b = Backoff::default();
        let t = Instant::now();
        for _ in 0..4 {
            b.on_error(t);
        }
        // Connected, then dropped at once (e.g. another client took our id):
        // keep backing off.
        b.on_connected(t);
        assert_eq!(
            b.on_error(t + Duration::from_millis(50)),
            Duration::from_secs(4)
        );
        // A connection that held: start over.
        b.on_connected(t);
        assert_eq!(b.on_error(t + STABLE_AFTER), BACKOFF_MIN);
        assert_eq!(b.on_error(t + STABLE_AFTER), BACKOFF_MIN * 2);
    }

    /// The broker side of one connection, scripted by the test with
    /// rumqttc's own codec. Not a stand-in for mosquitto: it checks what
    /// our task sends, packet by packet, where a real broker would hide it.
    struct ScriptedBroker {
        stream: tokio::net::TcpStream,
        buf: bytes::BytesMut,
    }

    const STEP: Duration = Duration::from_secs(5);
    /// How long "nothing more was sent" is watched for.
    const QUIET: Duration = Duration::from_millis(300);

    impl ScriptedBroker {
        async fn accept(listener: &tokio::net::TcpListener) -> Self {
            let (stream, _) = tokio::time::timeout(STEP, listener.accept())
                .await
                .expect("the client did not connect")
                .unwrap();
            ScriptedBroker {
                stream,
                buf: bytes::BytesMut::new(),
            }
        }

        async fn read(&mut self) -> Packet {
            use tokio::io::AsyncReadExt;
            loop {
                match Packet::read(&mut self.buf, 1 << 20) {
                    Ok(p) => return p,
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("undecodable packet from the client: {e}"),
                }
                let n = tokio::time::timeout(STEP, self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("the client sent nothing")
                    .unwrap();
                assert!(n > 0, "the client closed the connection");
            }
        }

        /// The next packet other than a ping within `wait`, if any.
        async fn quiet(&mut self, wait: Duration) -> Option<Packet> {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                match tokio::time::timeout_at(deadline, self.read()).await {
                    Err(_) => return None,
                    Ok(Packet::PingReq) => self.write(Packet::PingResp).await,
                    Ok(p) => return Some(p),
                }
            }
        }

        /// `n` retained publishes, acknowledged; (topic, payload) sorted.
        async fn take_statuses(&mut self, n: usize, ack: bool) -> Vec<(String, String)> {
            let mut got = Vec::new();
            while got.len() < n {
                match self.read().await {
                    Packet::Publish(p) => {
                        assert!(p.retain && p.qos == QoS::AtLeastOnce, "{p:?}");
                        if ack {
                            self.write(Packet::PubAck(rumqttc::PubAck::new(p.pkid)))
                                .await;
                        }
                        let payload = String::from_utf8(p.payload.to_vec()).unwrap();
                        got.push((p.topic, payload));
                    }
                    Packet::PingReq => self.write(Packet::PingResp).await,
                    other => panic!("expected a status, got {other:?}"),
                }
            }
            got.sort();
            got
        }

        async fn write(&mut self, p: Packet) {
            use tokio::io::AsyncWriteExt;
            let mut b = bytes::BytesMut::new();
            p.write(&mut b, 1 << 20).unwrap();
            self.stream.write_all(&b).await.unwrap();
        }

        async fn connack(&mut self, session_present: bool) -> rumqttc::Connect {
            let Packet::Connect(c) = self.read().await else {
                panic!("expected CONNECT")
            };
            self.write(Packet::ConnAck(rumqttc::ConnAck::new(
                rumqttc::ConnectReturnCode::Success,
                session_present,
            )))
            .await;
            c
        }

        async fn expect_subscribe(&mut self, filters: &[&str]) {
            let Packet::Subscribe(sub) = self.read().await else {
                panic!("expected SUBSCRIBE first after CONNACK")
            };
            let got: Vec<(&str, QoS)> = sub
                .filters
                .iter()
                .map(|f| (f.path.as_str(), f.qos))
                .collect();
            let want: Vec<(&str, QoS)> = filters.iter().map(|f| (*f, QoS::AtLeastOnce)).collect();
            assert_eq!(got, want);
            let codes = vec![SubscribeReasonCode::Success(QoS::AtLeastOnce); filters.len()];
            self.write(Packet::SubAck(SubAck::new(sub.pkid, codes)))
                .await;
        }

        async fn expect_publish(&mut self, topic: &str, payload: &[u8], retain: bool) -> u16 {
            match self.read().await {
                Packet::Publish(p) => {
                    assert_eq!(
                        (p.topic.as_str(), &p.payload[..], p.retain, p.qos),
                        (topic, payload, retain, QoS::AtLeastOnce)
                    );
                    p.pkid
                }
                other => panic!("expected PUBLISH to {topic}, got {other:?}"),
            }
        }
    }

    async fn next(rx: &mut mpsc::Receiver<Inbound>) -> Inbound {
        tokio::time::timeout(STEP, rx.recv())
            .await
            .expect("no inbound event")
            .expect("inbound channel closed")
    }

    #[tokio::test]
    async fn resubscribes_resends_unacked_and_says_goodbye() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let will = br#"{"online":false}"#.to_vec();
        let mut s = ClientSettings::new(url(&format!("mqtt://127.0.0.1:{port}")), "node-a");
        s.keep_alive = Duration::from_secs(60);
        s.subscriptions = vec!["t/node-a/jobs/+".into()];
        s.manual_acks = true;
        s.last_will = Some(("t/node-a/status".into(), will.clone(), true));
        let shutdown = CancellationToken::new();
        let (handle, mut rx, task) = spawn(s, shutdown.clone()).unwrap();

        // First connection: persistent session, will set, subscribed.
        let mut broker = ScriptedBroker::accept(&listener).await;
        let connect = broker.connack(false).await;
        assert_eq!(connect.client_id, "node-a");
        assert!(!connect.clean_session);
        let w = connect.last_will.expect("no last will");
        assert_eq!(
            (w.topic.as_str(), &w.message[..], w.retain),
            ("t/node-a/status", &will[..], true)
        );
        assert_eq!(
            next(&mut rx).await,
            Inbound::Connected {
                session_present: false
            }
        );
        broker.expect_subscribe(&["t/node-a/jobs/+"]).await;

        // A job comes in and is forwarded; it is acknowledged only when
        // the consumer says so.
        let mut job = rumqttc::Publish::new("t/node-a/jobs/j1", QoS::AtLeastOnce, b"{}".to_vec());
        job.pkid = 7;
        broker.write(Packet::Publish(job)).await;
        let Inbound::Message {
            topic,
            payload,
            retain,
            ack,
        } = next(&mut rx).await
        else {
            panic!("expected the job")
        };
        assert_eq!(
            (topic.as_str(), &payload[..], retain),
            ("t/node-a/jobs/j1", &b"{}"[..], false)
        );
        assert_eq!(broker.quiet(QUIET).await, None, "acknowledged too early");
        handle.ack(&ack).await.unwrap();
        assert_eq!(broker.read().await, Packet::PubAck(rumqttc::PubAck::new(7)));

        // A status goes out; the broker dies before acknowledging it.
        handle
            .publish_raw("t/node-a/jobs/j1/status", b"s1".to_vec(), true)
            .await
            .unwrap();
        broker
            .expect_publish("t/node-a/jobs/j1/status", b"s1", true)
            .await;
        drop(broker);
        match next(&mut rx).await {
            Inbound::Disconnected { retry_in, .. } => assert_eq!(retry_in, BACKOFF_MIN),
            other => panic!("expected Disconnected, got {other:?}"),
        }

        // The broker came back without our session: subscribe again, and
        // the unacknowledged status is sent again rather than dropped.
        let mut broker = ScriptedBroker::accept(&listener).await;
        broker.connack(false).await;
        assert_eq!(
            next(&mut rx).await,
            Inbound::Connected {
                session_present: false
            }
        );
        broker.expect_subscribe(&["t/node-a/jobs/+"]).await;
        let pkid = broker
            .expect_publish("t/node-a/jobs/j1/status", b"s1", true)
            .await;
        broker
            .write(Packet::PubAck(rumqttc::PubAck::new(pkid)))
            .await;

        // Shutdown: the will, published by us (a clean DISCONNECT discards
        // the broker's copy), then DISCONNECT.
        shutdown.cancel();
        broker.expect_publish("t/node-a/status", &will, true).await;
        assert_eq!(broker.read().await, Packet::Disconnect);
        drop(broker);
        tokio::time::timeout(STEP, task).await.unwrap().unwrap();
        assert!(rx.recv().await.is_none());
        let err = handle
            .publish_raw("t/x", b"x".to_vec(), false)
            .await
            .unwrap_err();
        assert!(matches!(err, MqttError::Closed { .. }), "{err}");
    }

    fn pair(topic: &str, payload: &str) -> (String, String) {
        (topic.to_owned(), payload.to_owned())
    }

    #[tokio::test]
    async fn statuses_never_wait_and_the_latest_of_each_is_republished_after_a_reconnect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut s = ClientSettings::new(url(&format!("mqtt://127.0.0.1:{port}")), "node-a");
        s.keep_alive = Duration::from_secs(60);
        let shutdown = CancellationToken::new();
        let (handle, mut rx, task) = spawn(s, shutdown.clone()).unwrap();
        let mut broker = ScriptedBroker::accept(&listener).await;
        broker.connack(false).await;
        next(&mut rx).await;

        // j1 runs, j2 ends; the broker confirms both.
        handle.publish_latest("s/j1", "transfer 1", true).unwrap();
        handle.publish_latest("s/j2", "succeeded", false).unwrap();
        assert_eq!(
            broker.take_statuses(2, true).await,
            [
                pair("s/j1", "\"transfer 1\""),
                pair("s/j2", "\"succeeded\"")
            ]
        );
        // j1's next value is sent but never confirmed: the broker dies.
        handle.publish_latest("s/j1", "transfer 2", true).unwrap();
        broker.take_statuses(1, false).await;
        drop(broker);
        assert!(matches!(next(&mut rx).await, Inbound::Disconnected { .. }));

        // While the broker is away, thousands of updates return at once:
        // publish_latest only replaces the board's value, it never waits.
        for i in 0..5000 {
            handle
                .publish_latest("s/j1", &format!("transfer {i}"), true)
                .unwrap();
        }
        handle.publish_latest("s/j1", "rolled_back", false).unwrap();
        handle.publish_latest("s/j3", "failed", false).unwrap();

        // Back: the latest value of each job not confirmed, once; not j2's
        // (confirmed, final), not the stale copy that was in flight.
        let mut broker = ScriptedBroker::accept(&listener).await;
        broker.connack(false).await;
        assert!(matches!(next(&mut rx).await, Inbound::Connected { .. }));
        assert_eq!(
            broker.take_statuses(2, true).await,
            [pair("s/j1", "\"rolled_back\""), pair("s/j3", "\"failed\"")]
        );
        assert_eq!(broker.quiet(QUIET).await, None);

        // A live status (a running job, the node) is republished after
        // every reconnect, even when confirmed: the broker may have lost it
        // or published our will over it.
        handle.publish_latest("node", "online", true).unwrap();
        broker.take_statuses(1, true).await;
        drop(broker);
        assert!(matches!(next(&mut rx).await, Inbound::Disconnected { .. }));
        let mut broker = ScriptedBroker::accept(&listener).await;
        broker.connack(true).await;
        assert_eq!(
            broker.take_statuses(1, true).await,
            [pair("node", "\"online\"")]
        );
        assert_eq!(broker.quiet(QUIET).await, None);

        // A status set right before shutdown still goes out, before the
        // DISCONNECT.
        handle.publish_latest("s/j4", "canceled", false).unwrap();
        shutdown.cancel();
        assert_eq!(
            broker.take_statuses(1, true).await,
            [pair("s/j4", "\"canceled\"")]
        );
        assert_eq!(broker.read().await, Packet::Disconnect);
        drop(broker);
        tokio::time::timeout(STEP, task).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_unacknowledged_job_is_delivered_again_after_a_reconnect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut s = ClientSettings::new(url(&format!("mqtt://127.0.0.1:{port}")), "node-a");
        s.keep_alive = Duration::from_secs(60);
        s.manual_acks = true;
        let shutdown = CancellationToken::new();
        let (handle, mut rx, task) = spawn(s, shutdown.clone()).unwrap();
        let mut broker = ScriptedBroker::accept(&listener).await;
        broker.connack(false).await;
        next(&mut rx).await;

        let mut job = rumqttc::Publish::new("t/jobs/j1", QoS::AtLeastOnce, b"{}".to_vec());
        job.pkid = 3;
        broker.write(Packet::Publish(job.clone())).await;
        assert!(matches!(next(&mut rx).await, Inbound::Message { .. }));
        // The consumer did not get to record it: no acknowledgement.
        assert_eq!(broker.quiet(QUIET).await, None);
        drop(broker);
        assert!(matches!(next(&mut rx).await, Inbound::Disconnected { .. }));

        // The broker redelivers (as MQTT 3.1.1 requires for a session);
        // this time it is acknowledged.
        let mut broker = ScriptedBroker::accept(&listener).await;
        broker.connack(true).await;
        next(&mut rx).await;
        job.dup = true;
        broker.write(Packet::Publish(job)).await;
        let Inbound::Message { ack, .. } = next(&mut rx).await else {
            panic!("expected the job again")
        };
        handle.ack(&ack).await.unwrap();
        assert_eq!(broker.read().await, Packet::PubAck(rumqttc::PubAck::new(3)));
        shutdown.cancel();
        assert_eq!(broker.read().await, Packet::Disconnect);
        drop(broker);
        tokio::time::timeout(STEP, task).await.unwrap().unwrap();
    }
}
