//! Signed orders: the fleet manager signs every job with its Ed25519 key,
//! and agents holding the manager's public key act only on jobs it signed.
//!
//! - The manager's key pair is made by `ferry certs`: `order.key` (PKCS#8
//!   PEM, 0600, stays with the manager) and `order.pub` (SPKI PEM, given to
//!   every agent as `--order-key`). Both are standard: `openssl pkey` reads
//!   them and `openssl pkeyutl -sign -rawin` signs with `order.key`.
//! - A signed job travels in an [`Envelope`] (shape in the MQTT contract):
//!   the signature covers the exact bytes of the job string, which names
//!   its node, its id, its issue time and its expiry.
//! - The source checks all of it before acting; it passes the envelope in
//!   `Prepare`, and the target checks it again itself: the signature, that
//!   it is the order's target, that the job id, source node and container
//!   are the `Prepare`'s. So a node can only ask a peer for what the manager
//!   ordered, and only once ([`Orders::admit_prepare`] keeps a ledger).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::migration::protocol::Prepare;
use crate::mqtt::contract::{
    self, quoted, ContractError, Envelope, JobRequest, Order, Target, Validity, ORDER_FIELDS,
};
use crate::mqtt::JobLedger;

/// The manager's signing key, as `ferry certs` writes it.
pub const ORDER_KEY_FILE: &str = "order.key";
/// The manager's public key, for the agents' `--order-key`.
pub const ORDER_PUB_FILE: &str = "order.pub";
/// How far the clocks of the manager and a node may differ: an order is
/// accepted from `CLOCK_SKEW` before its issue time to `CLOCK_SKEW` after
/// its expiry. Edge devices without an RTC get their time from NTP soon
/// after boot; a minute covers the rest.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The longest an order may be valid (`expires_at - issued_at`): a captured
/// order is of no use after this, and the ledgers (10,000 ids) need to
/// remember its id only this long.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long `ferry migrate` and `ferry sign` make an order valid by
/// default: long enough for a node that is briefly offline (its persistent
/// session keeps the job) and for a queue of a few migrations.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);
/// The target's ledger of incoming signed jobs, in the state dir.
pub const INCOMING_LEDGER: &str = "orders-received";

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error("unsigned job: node {node} acts only on jobs signed by the manager's key {key_id} (see ferry sign)")]
    Unsigned { node: String, key_id: String },
    #[error("bad signature: {0}")]
    BadSignature(String),
    #[error("order expired at {expires_at} (now {now}, clock skew allowed {skew} s)")]
    Expired {
        expires_at: u64,
        now: u64,
        skew: u64,
    },
    #[error("order issued at {issued_at}, in the future (now {now}, clock skew allowed {skew} s)")]
    NotYetValid { issued_at: u64, now: u64, skew: u64 },
    #[error("order validity {issued_at}..{expires_at}: expires_at must be after issued_at and at most {max} s later")]
    Lifetime {
        issued_at: u64,
        expires_at: u64,
        max: u64,
    },
    #[error(
        "job {job_id} was seen before on {node}: a replayed or redelivered order is not run again"
    )]
    Replayed { job_id: String, node: String },
    #[error("cannot record job {job_id} in the ledger: {source}")]
    Ledger {
        job_id: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "prepare without the signed order: node {node} acts only on migrations the manager signed"
    )]
    PrepareUnsigned { node: String },
    #[error("the signed order is {0}, not a migration")]
    NotMigrate(&'static str),
    #[error("the signed order {job_id} names {field} {named}, but the prepare has {got}")]
    PrepareMismatch {
        job_id: String,
        field: &'static str,
        named: String,
        got: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an Ed25519 {what} in PEM ({message})")]
    KeyFormat {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("job to sign: {0}")]
    Job(String),
}

/// Names a public key: the first 8 bytes of the SHA-256 of its 32 raw
/// bytes, in hex. Printed at start and carried in envelopes, so a key
/// mismatch is easy to see.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Seconds since the Unix epoch, by this machine's clock.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_pem(path: &Path) -> Result<String, OrderError> {
    std::fs::read_to_string(path).map_err(|source| OrderError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// The manager's public key, as an agent holds it.
#[derive(Debug, Clone)]
pub struct OrderKey {
    key: VerifyingKey,
    id: String,
}

impl OrderKey {
    pub fn new(key: VerifyingKey) -> Self {
        OrderKey {
            id: key_id(&key),
            key,
        }
    }

    /// Reads an SPKI PEM public key (`order.pub`).
    pub fn load(path: &Path) -> Result<Self, OrderError> {
        let pem = read_pem(path)?;
        let key = VerifyingKey::from_public_key_pem(&pem).map_err(|e| OrderError::KeyFormat {
            path: path.to_path_buf(),
            what: "public key",
            message: e.to_string(),
        })?;
        Ok(Self::new(key))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The signature of `envelope` is this key's over its job string.
    /// Strict verification: no malleable signatures, no weak keys.
    pub fn verify(&self, envelope: &Envelope) -> Result<(), OrderError> {
        let named = envelope
            .key_id
            .as_deref()
            .filter(|k| *k != self.id)
            .map(|k| format!(" (the envelope names key {})", quoted(k)))
            .unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(envelope.sig.as_bytes())
            .map_err(|e| OrderError::BadSignature(format!("sig is not base64: {e}")))?;
        let sig = Signature::from_slice(&bytes).map_err(|_| {
            OrderError::BadSignature(format!(
                "sig is {} bytes, an Ed25519 signature is 64",
                bytes.len()
            ))
        })?;
        self.key
            .verify_strict(envelope.job.as_bytes(), &sig)
            .map_err(|_| {
                OrderError::BadSignature(format!(
                    "not signed by the manager's key {}{named}",
                    self.id
                ))
            })
    }
}

/// The manager's signing key.
pub struct ManagerKey {
    key: SigningKey,
}

impl std::fmt::Debug for ManagerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ManagerKey({})", self.id())
    }
}

impl ManagerKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<Self, OrderError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::getrandom(seed.as_mut()).map_err(|e| OrderError::Io {
            what: "random source for",
            path: PathBuf::from(ORDER_KEY_FILE),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(ManagerKey {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// A key from its 32-byte seed (tests and fuzzing use fixed ones).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        ManagerKey {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// Reads a PKCS#8 PEM private key (`order.key`).
    pub fn load(path: &Path) -> Result<Self, OrderError> {
        let pem = zeroize::Zeroizing::new(read_pem(path)?);
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| OrderError::KeyFormat {
            path: path.to_path_buf(),
            what: "private key",
            message: e.to_string(),
        })?;
        Ok(ManagerKey { key })
    }

    pub fn id(&self) -> String {
        key_id(&self.key.verifying_key())
    }

    pub fn public(&self) -> OrderKey {
        OrderKey::new(self.key.verifying_key())
    }

    /// (private PEM, public PEM).
    pub fn to_pem(&self) -> Result<(zeroize::Zeroizing<String>, String), OrderError> {
        let bad = |e: String| OrderError::KeyFormat {
            path: PathBuf::from(ORDER_KEY_FILE),
            what: "key",
            message: e,
        };
        // PKCS#8 v1 (the seed alone): OpenSSL 3.0 (Debian 12) refuses the
        // v2 form that carries the public key too.
        let private = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.key.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(Default::default())
        .map_err(|e| bad(e.to_string()))?;
        let public = self
            .key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|e| bad(e.to_string()))?;
        Ok((private, public))
    }

    /// Signs `job` (a job JSON object without the [`ORDER_FIELDS`]) for
    /// `node` as job `job_id`, valid from `issued_at` for `ttl`.
    pub fn sign(
        &self,
        job: &Map<String, Value>,
        node: &str,
        job_id: &str,
        issued_at: u64,
        ttl: Duration,
    ) -> Result<Envelope, OrderError> {
        if let Some(f) = ORDER_FIELDS.iter().find(|f| job.contains_key(**f)) {
            return Err(OrderError::Job(format!(
                "it already has \"{f}\": the signer adds {ORDER_FIELDS:?}"
            )));
        }
        let mut signed = job.clone();
        signed.insert("node".into(), node.into());
        signed.insert("job_id".into(), job_id.into());
        signed.insert("issued_at".into(), issued_at.into());
        signed.insert(
            "expires_at".into(),
            issued_at.saturating_add(ttl.as_secs()).into(),
        );
        let text = Value::Object(signed).to_string();
        // What the agent will parse: a job the agent would reject is not
        // signed at all.
        contract::parse_signed_job(node, job_id, &text)?;
        Ok(self.sign_text(text))
    }

    /// The envelope of exactly `job`, whatever it holds: what [`sign`]
    /// ends with, and what a script signing by hand produces.
    ///
    /// [`sign`]: ManagerKey::sign
    pub fn sign_text(&self, job: String) -> Envelope {
        let sig = self.key.sign(job.as_bytes());
        Envelope {
            job,
            sig: base64::engine::general_purpose::STANDARD.encode(sig.to_bytes()),
            key_id: Some(self.id()),
        }
    }
}

/// An order's validity at `now`, with [`CLOCK_SKEW`] either side.
pub fn check_time(v: &Validity, now: u64) -> Result<(), OrderError> {
    let skew = CLOCK_SKEW.as_secs();
    let max = MAX_LIFETIME.as_secs();
    if v.expires_at <= v.issued_at || v.expires_at - v.issued_at > max {
        return Err(OrderError::Lifetime {
            issued_at: v.issued_at,
            expires_at: v.expires_at,
            max,
        });
    }
    if v.issued_at > now.saturating_add(skew) {
        return Err(OrderError::NotYetValid {
            issued_at: v.issued_at,
            now,
            skew,
        });
    }
    if now > v.expires_at.saturating_add(skew) {
        return Err(OrderError::Expired {
            expires_at: v.expires_at,
            now,
            skew,
        });
    }
    Ok(())
}

/// A node's policy for orders: with the manager's key, only signed orders
/// count; without, anything well formed does (a development bed), and a
/// signed order is still checked for its node, id and time.
pub struct Orders {
    key: Option<OrderKey>,
    /// Ids of the incoming migrations this node accepted (with a key only).
    incoming: Option<Mutex<JobLedger>>,
}

impl Orders {
    /// No key: unsigned jobs are accepted.
    pub fn open() -> Self {
        Orders {
            key: None,
            incoming: None,
        }
    }

    /// Signed orders only; the ids of accepted incoming migrations are
    /// remembered in `ledger` (the state dir's [`INCOMING_LEDGER`]).
    pub fn signed(key: OrderKey, ledger: JobLedger) -> Self {
        Orders {
            key: Some(key),
            incoming: Some(Mutex::new(ledger)),
        }
    }

    pub fn key(&self) -> Option<&OrderKey> {
        self.key.as_ref()
    }

    /// Parses and checks a job published to `node` as `job_id` at `now`.
    /// Replays of the same id are the caller's ledger's to catch.
    pub fn admit(
        &self,
        node: &str,
        job_id: &str,
        payload: &[u8],
        now: u64,
    ) -> Result<Order, OrderError> {
        let order = contract::parse_order(node, job_id, payload)?;
        match (&self.key, &order.signed) {
            (Some(key), None) => {
                return Err(OrderError::Unsigned {
                    node: node.to_string(),
                    key_id: key.id.clone(),
                })
            }
            (Some(key), Some((envelope, _))) => key.verify(envelope)?,
            (None, _) => {}
        }
        if let Some((_, validity)) = &order.signed {
            check_time(validity, now)?;
        }
        Ok(order)
    }

    /// The target's check of a `Prepare` on node `here`, before anything is
    /// created: the order is signed by the manager, valid now, a migration
    /// of this container from the prepare's source to this node under the
    /// prepare's job id, and its id was never accepted here before.
    /// `container_id` is the source's id of the container (the order may
    /// name it by id). Without a key, nothing is required.
    pub fn admit_prepare(&self, prepare: &Prepare, here: &str, now: u64) -> Result<(), OrderError> {
        let Some(key) = &self.key else {
            return Ok(());
        };
        let Some(envelope) = &prepare.order else {
            return Err(OrderError::PrepareUnsigned {
                node: here.to_string(),
            });
        };
        key.verify(envelope)?;
        // An evacuation's order covers its children, `{order id}.{n}`.
        let order_id = match contract::signed_job_id(&envelope.job) {
            Some(id)
                if prepare
                    .job_id
                    .strip_prefix(id.as_str())
                    .is_some_and(is_child_suffix) =>
            {
                id
            }
            _ => prepare.job_id.clone(),
        };
        let (request, validity) =
            contract::parse_signed_job(&prepare.source_node, &order_id, &envelope.job)?;
        check_time(&validity, now)?;
        let mismatch = |field, named: &str, got: &str| OrderError::PrepareMismatch {
            job_id: prepare.job_id.clone(),
            field,
            named: quoted(named),
            got: quoted(got),
        };
        let (target, container) = match request {
            JobRequest::Migrate {
                container, target, ..
            } if order_id == prepare.job_id => (target, Some(container)),
            JobRequest::Evacuate {
                targets, selector, ..
            } if order_id != prepare.job_id => {
                // The source picks the containers by label; the target
                // checks the label is on the body it is asked to create.
                let label = prepare.spec.create_body["Labels"][&selector.label_key].as_str();
                if label != Some(selector.label_value.as_str()) {
                    return Err(mismatch(
                        "label",
                        &selector.label(),
                        &format!("{}={}", selector.label_key, label.unwrap_or("")),
                    ));
                }
                (targets, None)
            }
            JobRequest::Migrate { .. } => {
                return Err(mismatch("job id", &order_id, &prepare.job_id))
            }
            JobRequest::Evacuate { .. } => {
                return Err(OrderError::NotMigrate("an evacuation (its children are)"))
            }
            JobRequest::Cancel { .. } => return Err(OrderError::NotMigrate("a cancel")),
        };
        let allowed = match &target {
            Target::Node(n) => n == here,
            Target::Auto => true,
            Target::Among(list) => list.iter().any(|n| n == here),
        };
        if !allowed || prepare.target_node != here {
            return Err(mismatch(
                "target",
                &target.to_string(),
                &prepare.target_node,
            ));
        }
        if let Some(container) = container {
            let by_id = container.len() >= 12
                && container.bytes().all(|b| b.is_ascii_hexdigit())
                && prepare.container_id.starts_with(&container);
            if container != prepare.spec.name && !by_id {
                return Err(mismatch("container", &container, &prepare.spec.name));
            }
        }
        if let Some(ledger) = &self.incoming {
            let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
            match ledger.first_seen(&prepare.job_id) {
                Ok(true) => {}
                Ok(false) => {
                    return Err(OrderError::Replayed {
                        job_id: prepare.job_id.clone(),
                        node: here.to_string(),
                    })
                }
                Err(source) => {
                    return Err(OrderError::Ledger {
                        job_id: prepare.job_id.clone(),
                        source,
                    })
                }
            }
        }
        Ok(())
    }
}

/// `.N` with N a number from 1: an evacuation child's id suffix.
fn is_child_suffix(rest: &str) -> bool {
    rest.strip_prefix('.').is_some_and(|n| {
        !n.is_empty() && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::TempDir;

    const NOW: u64 = 1_800_000_000;

    fn job() -> Map<String, Value> {
        let Value::Object(m) = serde_json::json!(
            {"action": "migrate", "container": "web", "target": "node-b"}
        ) else {
            unreachable!()
        };
        m
    }

    fn envelope(key: &ManagerKey) -> Envelope {
        key.sign(&job(), "node-a", "j1", NOW, DEFAULT_TTL).unwrap()
    }

    fn payload(e: &Envelope) -> Vec<u8> {
        serde_json::to_vec(e).unwrap()
    }

    fn signed_orders(key: &ManagerKey, dir: &TempDir) -> Orders {
        Orders::signed(
            key.public(),
            JobLedger::open(dir.join(INCOMING_LEDGER)).unwrap(),
        )
    }

    #[test]
    fn a_signed_job_is_admitted_and_parsed() {
        let key = ManagerKey::generate().unwrap();
        let dir = TempDir::new("order-ok");
        let orders = signed_orders(&key, &dir);
        let e = envelope(&key);
        assert_eq!(e.key_id.as_deref(), Some(key.id().as_str()));
        let order = orders.admit("node-a", "j1", &payload(&e), NOW).unwrap();
        assert!(matches!(
            &order.request,
            JobRequest::Migrate { container, target, .. } if container == "web" && *target == Target::Node("node-b".into())
        ));
        let (back, validity) = order.signed.unwrap();
        assert_eq!(back, e);
        assert_eq!(validity.expires_at - validity.issued_at, 600);
    }

    #[test]
    fn any_tampered_byte_breaks_the_signature() {
        let key = ManagerKey::generate().unwrap();
        let public = key.public();
        let e = envelope(&key);
        public.verify(&e).unwrap();
        for i in 0..e.job.len() {
            let mut bytes = e.job.clone().into_bytes();
            bytes[i] ^= 0x01;
            let Ok(job) = String::from_utf8(bytes) else {
                continue;
            };
            let tampered = Envelope { job, ..e.clone() };
            let err = public.verify(&tampered).unwrap_err().to_string();
            assert!(
                err.starts_with("bad signature: not signed by"),
                "{i}: {err}"
            );
        }
        let mut sig = base64::engine::general_purpose::STANDARD
            .decode(&e.sig)
            .unwrap();
        sig[10] ^= 0x80;
        let tampered = Envelope {
            sig: base64::engine::general_purpose::STANDARD.encode(&sig),
            ..e.clone()
        };
        assert!(public.verify(&tampered).is_err());
        for (sig, want) in [
            ("***", "sig is not base64"),
            ("AAAA", "sig is 3 bytes, an Ed25519 signature is 64"),
        ] {
            let bad = Envelope {
                sig: sig.into(),
                ..e.clone()
            };
            let err = public.verify(&bad).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn another_key_is_refused_and_named() {
        let manager = ManagerKey::generate().unwrap();
        let node = ManagerKey::generate().unwrap();
        let dir = TempDir::new("order-wrong-key");
        let orders = signed_orders(&manager, &dir);
        let err = orders
            .admit("node-a", "j1", &payload(&envelope(&node)), NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("not signed by the manager's key {}", manager.id())),
            "{err}"
        );
        assert!(err.contains(&node.id()), "{err}");
    }

    #[test]
    fn unsigned_jobs_only_without_a_key() {
        let key = ManagerKey::generate().unwrap();
        let dir = TempDir::new("order-unsigned");
        let bare = br#"{"action":"migrate","container":"web","target":"node-b"}"#;
        let err = signed_orders(&key, &dir)
            .admit("node-a", "j1", bare, NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("unsigned job: node node-a acts only"),
            "{err}"
        );
        let open = Orders::open();
        assert!(open
            .admit("node-a", "j1", bare, NOW)
            .unwrap()
            .signed
            .is_none());
        // Without the key a signed job still has to be for here and now.
        let e = envelope(&key);
        open.admit("node-a", "j1", &payload(&e), NOW).unwrap();
        let err = open
            .admit("node-c", "j1", &payload(&e), NOW)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            r#"signed job names node "node-a", but it was published as "node-c""#
        );
        let err = open
            .admit("node-a", "j2", &payload(&e), NOW)
            .unwrap_err()
            .to_string();
        assert!(err.contains(r#"names job_id "j1""#), "{err}");
        assert!(open
            .admit("node-a", "j1", &payload(&e), NOW + 3600)
            .is_err());
    }

    #[test]
    fn clock_skew_bounds() {
        let skew = CLOCK_SKEW.as_secs();
        let v = Validity {
            issued_at: NOW,
            expires_at: NOW + 600,
        };
        for now in [NOW - skew, NOW, NOW + 600, NOW + 600 + skew] {
            check_time(&v, now).unwrap_or_else(|e| panic!("{now}: {e}"));
        }
        let err = check_time(&v, NOW - skew - 1).unwrap_err().to_string();
        assert!(err.contains("in the future"), "{err}");
        let err = check_time(&v, NOW + 600 + skew + 1)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("order expired at"), "{err}");
        for (issued_at, expires_at) in [
            (NOW, NOW),
            (NOW, NOW - 1),
            (NOW, NOW + MAX_LIFETIME.as_secs() + 1),
        ] {
            let v = Validity {
                issued_at,
                expires_at,
            };
            let err = check_time(&v, NOW).unwrap_err().to_string();
            assert!(err.contains("expires_at must be after issued_at"), "{err}");
        }
    }

    #[test]
    fn keys_round_trip_through_pem() {
        let dir = TempDir::new("order-pem");
        let key = ManagerKey::generate().unwrap();
        let (private, public) = key.to_pem().unwrap();
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
        std::fs::write(dir.join("k"), private.as_bytes()).unwrap();
        std::fs::write(dir.join("p"), public.as_bytes()).unwrap();
        let back = ManagerKey::load(&dir.join("k")).unwrap();
        assert_eq!(back.id(), key.id());
        let public = OrderKey::load(&dir.join("p")).unwrap();
        assert_eq!(public.id(), key.id());
        public.verify(&envelope(&back)).unwrap();
        let err = OrderKey::load(&dir.join("k")).unwrap_err().to_string();
        assert!(err.contains("not an Ed25519 public key"), "{err}");
    }

    #[test]
    fn the_signer_adds_the_order_fields_and_refuses_its_own() {
        let key = ManagerKey::generate().unwrap();
        let mut j = job();
        j.insert("expires_at".into(), 5.into());
        let err = key
            .sign(&j, "node-a", "j1", NOW, DEFAULT_TTL)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already has \"expires_at\""), "{err}");
        // A job the agent would reject is not signed.
        let mut j = job();
        j.insert("colour".into(), "red".into());
        let err = key
            .sign(&j, "node-a", "j1", NOW, DEFAULT_TTL)
            .unwrap_err()
            .to_string();
        assert!(err.contains(r#"unknown field "colour""#), "{err}");
    }

    fn prepare(order: Option<Envelope>, name: &str) -> Prepare {
        Prepare {
            job_id: "j1".into(),
            source_node: "node-a".into(),
            target_node: "node-b".into(),
            checkpoint: "ferry-j1".into(),
            spec: crate::runtime::ContainerSpec {
                name: name.into(),
                image: "img".into(),
                create_body: serde_json::json!({}),
                networks: Vec::new(),
            },
            state: None,
            estimate_bytes: 1,
            arch: "x86_64".into(),
            page_size: 4096,
            container_id: "0123456789abcdef".repeat(4),
            order,
        }
    }

    #[test]
    fn placed_and_evacuation_orders_cover_their_targets_and_children() {
        let key = ManagerKey::generate().unwrap();
        let dir = TempDir::new("order-placed");
        let orders = signed_orders(&key, &dir);
        let reason = |p: &Prepare, here: &str| {
            orders
                .admit_prepare(p, here, NOW)
                .map(|()| String::new())
                .unwrap_or_else(|e| e.to_string())
        };
        let signed = |j: serde_json::Value, id: &str| {
            let serde_json::Value::Object(j) = j else {
                unreachable!()
            };
            key.sign(&j, "node-a", id, NOW, DEFAULT_TTL).unwrap()
        };
        // A list: only its members may take the job.
        let among = signed(
            serde_json::json!({"action": "migrate", "container": "web", "target": ["node-b", "node-c"]}),
            "j1",
        );
        let mut p = prepare(Some(among.clone()), "web");
        p.target_node = "node-d".into();
        assert!(reason(&p, "node-d").contains("names target \"one of node-b,node-c\""));
        assert_eq!(reason(&prepare(Some(among), "web"), "node-b"), "");
        // Auto: any node.
        let auto = signed(
            serde_json::json!({"action": "migrate", "container": "web", "target": "auto"}),
            "j2",
        );
        let mut p = prepare(Some(auto), "web");
        p.job_id = "j2".into();
        assert_eq!(reason(&p, "node-b"), "");

        // An evacuation covers its children `e1.N` whose body has its label.
        let evac = signed(
            serde_json::json!({"action": "evacuate", "selector": {"label": "app=yes"}, "targets": "auto"}),
            "e1",
        );
        let child = |id: &str, label: Option<&str>| {
            let mut p = prepare(Some(evac.clone()), "web");
            p.job_id = id.into();
            if let Some(v) = label {
                p.spec.create_body = serde_json::json!({"Labels": {"app": v}});
            }
            p
        };
        assert_eq!(reason(&child("e1.1", Some("yes")), "node-b"), "");
        assert!(reason(&child("e1.2", Some("no")), "node-b")
            .contains("names label \"app=yes\", but the prepare has \"app=no\""));
        assert!(reason(&child("e1.3", None), "node-b").contains("names label"));
        // Not a child: the evacuation itself, a look-alike id, a bad number.
        assert!(reason(&child("e1", Some("yes")), "node-b").contains("an evacuation"));
        for id in ["e1.x", "e1.01", "e1.", "e10.1"] {
            assert!(
                reason(&child(id, Some("yes")), "node-b").contains("names job_id"),
                "{id}: {}",
                reason(&child(id, Some("yes")), "node-b")
            );
        }
        // A migrate order does not cover `j1.1`.
        let m = envelope(&key);
        let mut p = prepare(Some(m), "web");
        p.job_id = "j1.1".into();
        assert!(
            reason(&p, "node-b").contains("names job id \"j1\""),
            "{}",
            reason(&p, "node-b")
        );
    }

    #[test]
    fn the_target_checks_the_prepare_against_the_order() {
        let key = ManagerKey::generate().unwrap();
        let dir = TempDir::new("order-prepare");
        let orders = signed_orders(&key, &dir);
        let e = envelope(&key);
        let reason = |p: &Prepare, here: &str| {
            orders
                .admit_prepare(p, here, NOW)
                .map(|()| String::new())
                .unwrap_or_else(|e| e.to_string())
        };
        assert!(
            reason(&prepare(None, "web"), "node-b").starts_with("prepare without the signed order")
        );
        assert!(reason(&prepare(Some(e.clone()), "other"), "node-b")
            .contains(r#"names container "web", but the prepare has "other""#));
        let mut p = prepare(Some(e.clone()), "web");
        p.target_node = "node-c".into();
        assert!(reason(&p, "node-c").contains(r#"names target "node-b""#));
        let mut p = prepare(Some(e.clone()), "web");
        p.source_node = "node-x".into();
        assert!(reason(&p, "node-b").contains(r#"names node "node-a""#));
        let mut p = prepare(Some(e.clone()), "web");
        p.job_id = "j2".into();
        assert!(reason(&p, "node-b").contains(r#"names job_id "j1""#));
        let other = ManagerKey::generate().unwrap();
        assert!(
            reason(&prepare(Some(envelope(&other)), "web"), "node-b").starts_with("bad signature")
        );
        assert!(orders
            .admit_prepare(&prepare(Some(e.clone()), "web"), "node-b", NOW + 7200)
            .unwrap_err()
            .to_string()
            .starts_with("order expired"));
        // None of the refusals used the id up; the first good one does.
        assert_eq!(reason(&prepare(Some(e.clone()), "web"), "node-b"), "");
        assert_eq!(
            reason(&prepare(Some(e.clone()), "web"), "node-b"),
            "job j1 was seen before on node-b: a replayed or redelivered order is not run again"
        );
        // And across a restart.
        let orders = signed_orders(&key, &dir);
        assert!(orders
            .admit_prepare(&prepare(Some(e.clone()), "web"), "node-b", NOW)
            .is_err());

        // An order naming the container by id (a prefix of 12 or more).
        let mut j = job();
        j.insert("container".into(), "0123456789abcdef".into());
        let by_id = key.sign(&j, "node-a", "j9", NOW, DEFAULT_TTL).unwrap();
        let mut p = prepare(Some(by_id), "web");
        p.job_id = "j9".into();
        orders.admit_prepare(&p, "node-b", NOW).unwrap();

        // Without a key, nothing is required of a prepare.
        Orders::open()
            .admit_prepare(&prepare(None, "web"), "node-b", NOW)
            .unwrap();
    }
}
