//! A development PKI for a fleet: one CA, and certificates for the broker,
//! each node and the manager (ECDSA P-256, standard PEM, as openssl and
//! mosquitto read them).
//!
//! Files written to the output folder:
//! - `ca.pem`, `ca.key`: the fleet CA (broker and nodes), reused when both
//!   exist, so nodes can be added later without re-issuing everyone's
//!   trust anchor;
//! - `manager-ca.pem`, `manager-ca.key`: the manager's CA, reused alike.
//!   Only the broker's manager listener trusts it: agents never do, and a
//!   node certificate never gets onto that listener (see
//!   `broker-config/mosquitto.conf`, "Identities");
//! - `broker.pem`, `broker.key`: server certificate, SANs = broker hosts;
//! - `<node>.pem`, `<node>.key` and `<manager>.pem`, `<manager>.key`:
//!   CN = DNS SAN = the name, usable as TLS client and server, plus the
//!   role as a SAN URI: `ferry:role:node` or `ferry:role:manager` (see
//!   [`crate::stream::tls`]).
//! - `order.key`, `order.pub`: the manager's Ed25519 key for signing jobs
//!   (see [`crate::order`]); `order.pub` goes to every agent
//!   (`--order-key`). Reused when both exist, like the CA: a new one would
//!   have to be given to every agent again.
//!
//! Leaf certificates are issued anew on every run; keys are mode 0600.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};

pub const DEFAULT_MANAGER: &str = "manager";
/// Where a development broker is reached: its certificate's SANs.
pub const DEFAULT_BROKER_HOSTS: [&str; 2] = ["localhost", "127.0.0.1"];
/// Validity of leaf certificates, in days: 825 is the longest that Apple's
/// TLS clients (and the CA/Browser Forum rule of 2018-2020) accept for a
/// server certificate, so the broker's certificate works with any client.
/// Re-running `ferry certs` renews the leaves under the same CA.
pub const DEFAULT_DAYS: u32 = 825;
/// The CA outlives the leaves it signs, so adding a node later works.
const CA_MIN_DAYS: u32 = 3650;
const CA_NAME: &str = "ferry fleet CA";
/// The manager's own CA: the broker's manager listener trusts it alone, so
/// no node certificate gets onto that listener, where client ids are free.
const MANAGER_CA_NAME: &str = "ferry manager CA";
/// Edge device clocks drift; leaves are valid from a little before now.
const BACKDATE: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid fleet spec: {0}")]
    InvalidSpec(String),
    #[error("existing CA in {dir}: {reason}")]
    ExistingCa { dir: PathBuf, reason: String },
    #[error("existing order key in {dir}: {reason}")]
    ExistingOrderKey { dir: PathBuf, reason: String },
    #[error(transparent)]
    Order(#[from] crate::order::OrderError),
    #[error("generating {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

/// Who gets a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSpec {
    pub nodes: Vec<String>,
    pub manager: String,
    /// DNS names and IP addresses the broker is reached at.
    pub broker_hosts: Vec<String>,
    /// Validity of the leaf certificates.
    pub days: u32,
}

impl Default for FleetSpec {
    fn default() -> Self {
        FleetSpec {
            nodes: Vec::new(),
            manager: DEFAULT_MANAGER.into(),
            broker_hosts: DEFAULT_BROKER_HOSTS.map(String::from).to_vec(),
            days: DEFAULT_DAYS,
        }
    }
}

impl FleetSpec {
    pub fn validate(&self) -> Result<(), CertsError> {
        if self.days == 0 {
            return Err(CertsError::InvalidSpec("days must be at least 1".into()));
        }
        if self.broker_hosts.is_empty() {
            return Err(CertsError::InvalidSpec("no broker host".into()));
        }
        for host in &self.broker_hosts {
            if host.parse::<IpAddr>().is_err() {
                check_name(host)?;
            }
        }
        let mut seen = HashSet::new();
        for name in self.nodes.iter().chain(std::iter::once(&self.manager)) {
            check_name(name)?;
            if ["ca", "broker", "manager-ca"].contains(&name.as_str()) {
                return Err(invalid(name, "reserved for the CA and broker files"));
            }
            if !seen.insert(name) {
                return Err(invalid(name, "appears twice among the nodes and manager"));
            }
        }
        Ok(())
    }
}

fn invalid(name: &str, reason: &str) -> CertsError {
    CertsError::InvalidName {
        name: name.into(),
        reason: reason.into(),
    }
}

/// A name is a file name and a DNS name: letters, digits, `-` and `.`.
fn check_name(name: &str) -> Result<(), CertsError> {
    if name.is_empty() || name.len() > 253 {
        return Err(invalid(name, "must be 1 to 253 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(invalid(
            name,
            "only letters, digits, '-' and '.' are allowed",
        ));
    }
    if name
        .split('.')
        .any(|label| label.is_empty() || label.starts_with('-') || label.ends_with('-'))
    {
        return Err(invalid(name, "not a DNS name"));
    }
    Ok(())
}

/// Writes the fleet's certificates and keys into `out_dir` (created if
/// missing), reusing the CA found there.
pub fn generate(out_dir: &Path, spec: &FleetSpec) -> Result<(), CertsError> {
    spec.validate()?;
    fs::create_dir_all(out_dir).map_err(|source| CertsError::Io {
        what: "creating",
        path: out_dir.to_path_buf(),
        source,
    })?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ca = load_or_create_ca(out_dir, "ca", CA_NAME, spec, now)?;
    let manager_ca = load_or_create_ca(out_dir, "manager-ca", MANAGER_CA_NAME, spec, now)?;

    let mut broker = leaf_params(&spec.broker_hosts[0], &spec.broker_hosts, spec, now)?;
    broker.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(out_dir, "broker", broker, &ca)?;

    let roles = spec
        .nodes
        .iter()
        .map(|n| (n, crate::stream::tls::NODE_ROLE))
        .chain(std::iter::once((
            &spec.manager,
            crate::stream::tls::MANAGER_ROLE,
        )));
    for (name, role) in roles {
        let mut params = leaf_params(name, std::slice::from_ref(name), spec, now)?;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let uri = generated(&format!("the role of {name}"), role.try_into())?;
        params.subject_alt_names.push(SanType::URI(uri));
        let issuer = if name == &spec.manager {
            &manager_ca
        } else {
            &ca
        };
        issue(out_dir, name, params, issuer)?;
    }
    // An empty list to start with: mosquitto's crlfile must exist.
    if !out_dir.join(CRL_FILE).exists() {
        write_crl(out_dir, &[], now)?;
    }
    load_or_create_order_key(out_dir)?;
    Ok(())
}

/// The manager's order signing key in `dir`: reused when both files are
/// there and belong together, else created.
fn load_or_create_order_key(dir: &Path) -> Result<(), CertsError> {
    use crate::order::{ManagerKey, OrderKey, ORDER_KEY_FILE, ORDER_PUB_FILE};
    let (key_path, pub_path) = (dir.join(ORDER_KEY_FILE), dir.join(ORDER_PUB_FILE));
    let existing = |reason: String| CertsError::ExistingOrderKey {
        dir: dir.to_path_buf(),
        reason,
    };
    match (key_path.exists(), pub_path.exists()) {
        (true, true) => {
            let key = ManagerKey::load(&key_path)?;
            let public = OrderKey::load(&pub_path)?;
            if key.id() != public.id() {
                return Err(existing(format!(
                    "{ORDER_PUB_FILE} ({}) is not the public key of {ORDER_KEY_FILE} ({})",
                    public.id(),
                    key.id()
                )));
            }
            Ok(())
        }
        (false, false) => {
            let key = ManagerKey::generate()?;
            let (private, public) = key.to_pem()?;
            write_file(&key_path, private.as_bytes(), 0o600)?;
            write_file(&pub_path, public.as_bytes(), 0o644)
        }
        (true, false) => Err(existing(format!(
            "{ORDER_KEY_FILE} without {ORDER_PUB_FILE}"
        ))),
        (false, true) => Err(existing(format!(
            "{ORDER_PUB_FILE} without {ORDER_KEY_FILE}"
        ))),
    }
}

/// The fleet's certificate revocation list, signed by the fleet CA: what
/// mosquitto's `crlfile` and the agents' `tls_crl` read.
pub const CRL_FILE: &str = "crl.pem";

/// Revokes `node`'s certificate in `dir` (its `<node>.pem`): adds its
/// serial to `crl.pem` (kept with the earlier entries) and signs the list
/// anew with the fleet CA. Returns the serial, in hex.
pub fn revoke(dir: &Path, node: &str) -> Result<String, CertsError> {
    check_name(node)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let cert_path = dir.join(format!("{node}.pem"));
    let der = pem_der(&read(&cert_path)?).ok_or_else(|| {
        CertsError::InvalidSpec(format!("{}: no certificate", cert_path.display()))
    })?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CertsError::InvalidSpec(format!("{}: {e}", cert_path.display())))?;
    let serial = x509.raw_serial().to_vec();
    let mut revoked = read_crl(dir)?;
    if !revoked.iter().any(|(s, _)| *s == serial) {
        revoked.push((serial.clone(), now.as_secs() as i64));
    }
    write_crl(dir, &revoked, now)?;
    Ok(serial.iter().map(|b| format!("{b:02x}")).collect())
}

/// The serials and revocation times (Unix seconds) of `dir`'s `crl.pem`;
/// none when there is no such file.
fn read_crl(dir: &Path) -> Result<Vec<(Vec<u8>, i64)>, CertsError> {
    let path = dir.join(CRL_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bad = |reason: String| CertsError::InvalidSpec(format!("{}: {reason}", path.display()));
    let pem = read(&path)?;
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    let (_, crl) = x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| bad(e.to_string()))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| (r.raw_serial().to_vec(), r.revocation_date.timestamp()))
        .collect())
}

/// Signs and writes `crl.pem` listing `revoked`, valid as long as a CA.
fn write_crl(dir: &Path, revoked: &[(Vec<u8>, i64)], now: Duration) -> Result<(), CertsError> {
    let spec = FleetSpec::default();
    if !dir.join("ca.key").exists() {
        return Err(CertsError::ExistingCa {
            dir: dir.to_path_buf(),
            reason: "no ca.key: the CRL is signed by the fleet CA".into(),
        });
    }
    let ca = load_or_create_ca(dir, "ca", CA_NAME, &spec, now)?;
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let params = CertificateRevocationListParams {
        this_update: epoch + now.saturating_sub(BACKDATE),
        next_update: epoch + now + DAY * CA_MIN_DAYS,
        // Grows with every issue: clients keep the newest list.
        crl_number: SerialNumber::from(now.as_millis() as u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: epoch + Duration::from_secs((*at).max(0) as u64),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = generated("the CRL", params.signed_by(&ca))?;
    let pem = generated("the CRL", crl.pem())?;
    write_file(&dir.join(CRL_FILE), pem.as_bytes(), 0o644)
}

/// Issues `<name>.pem`/`.key` in `dir` from the fleet CA found there, as a
/// node's but with `role` (or none): what a mistaken or tampered issuance
/// would hand out, for tests of the role check.
#[cfg(test)]
pub(crate) fn issue_with_role(dir: &Path, name: &str, role: Option<&str>) {
    let spec = FleetSpec::default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ca = load_or_create_ca(dir, "ca", CA_NAME, &spec, now).expect("the fleet CA");
    let mut params = leaf_params(name, &[name.to_string()], &spec, now).expect("params");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    if let Some(role) = role {
        params
            .subject_alt_names
            .push(SanType::URI(role.try_into().expect("an IA5 role")));
    }
    issue(dir, name, params, &ca).expect("issue");
}

/// Valid from a little before `now` (since the epoch) for `days`.
fn set_validity(params: &mut CertificateParams, now: Duration, days: u32) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + now.saturating_sub(BACKDATE);
    params.not_after = epoch + now + DAY * days;
}

/// The CA `<file>.pem`/`<file>.key` in `dir`, or a new one named `cn`.
fn load_or_create_ca(
    dir: &Path,
    file: &str,
    cn: &str,
    spec: &FleetSpec,
    now: Duration,
) -> Result<Issuer<'static, KeyPair>, CertsError> {
    let (cert_path, key_path) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    let existing = |reason: String| CertsError::ExistingCa {
        dir: dir.to_path_buf(),
        reason,
    };
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let cert_pem = read(&cert_path)?;
            let key = KeyPair::from_pem(&read(&key_path)?)
                .map_err(|e| existing(format!("{file}.key: {e}")))?;
            let der = rustls_pki_types::CertificateDer::from(
                pem_der(&cert_pem)
                    .ok_or_else(|| existing(format!("{file}.pem: no certificate")))?,
            );
            let (_, x509) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| existing(format!("{file}.pem: {e}")))?;
            if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
                return Err(existing(format!("{file}.key is not the key of {file}.pem")));
            }
            Issuer::from_ca_cert_der(&der, key).map_err(|e| existing(format!("{file}.pem: {e}")))
        }
        (false, false) => {
            let key = generated("the CA key", KeyPair::generate())?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            set_validity(&mut params, now, spec.days.max(CA_MIN_DAYS));
            let cert = generated("the CA certificate", params.self_signed(&key))?;
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
            Ok(Issuer::new(params, key))
        }
        (true, false) => Err(existing(format!("{file}.pem without {file}.key"))),
        (false, true) => Err(existing(format!("{file}.key without {file}.pem"))),
    }
}

/// The DER of the first PEM block of `pem`.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|der| der.to_vec())
}

fn leaf_params(
    cn: &str,
    sans: &[String],
    spec: &FleetSpec,
    now: Duration,
) -> Result<CertificateParams, CertsError> {
    // `new` makes IP SANs of what parses as an IP, DNS SANs of the rest.
    let mut params =
        CertificateParams::new(sans.to_vec()).map_err(|source| CertsError::Generate {
            what: format!("the certificate for {cn}"),
            source,
        })?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, now, spec.days);
    Ok(params)
}

fn issue(
    dir: &Path,
    name: &str,
    params: CertificateParams,
    ca: &Issuer<'_, KeyPair>,
) -> Result<(), CertsError> {
    let what = format!("the certificate for {name}");
    let key = generated(&what, KeyPair::generate())?;
    let cert = generated(&what, params.signed_by(&key, ca))?;
    write_file(
        &dir.join(format!("{name}.key")),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_file(
        &dir.join(format!("{name}.pem")),
        cert.pem().as_bytes(),
        0o644,
    )
}

fn generated<T>(what: &str, result: Result<T, rcgen::Error>) -> Result<T, CertsError> {
    result.map_err(|source| CertsError::Generate {
        what: what.to_string(),
        source,
    })
}

fn read(path: &Path) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(|source| CertsError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes through a fresh temporary file renamed into place, so the mode is
/// the one asked for even when replacing a file, and no reader sees half.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertsError> {
    let tmp = path.with_extension("tmp");
    let io = |what, source| CertsError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("creating", e))?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(|e| io("writing", e))?;
    fs::rename(&tmp, path).map_err(|e| io("writing", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::testutil::TempDir;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn spec(nodes: &[&str]) -> FleetSpec {
        FleetSpec {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            ..FleetSpec::default()
        }
    }

    /// Runs openssl with `args` in `dir`; returns (success, output).
    fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed by this test: apt-get install openssl");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn verify(dir: &Path, purpose: &str, extra: &[&str], cert: &str) -> (bool, String) {
        verify_with(dir, "ca.pem", purpose, extra, cert)
    }

    fn verify_with(
        dir: &Path,
        ca: &str,
        purpose: &str,
        extra: &[&str],
        cert: &str,
    ) -> (bool, String) {
        let mut args = vec!["verify", "-CAfile", ca, "-purpose", purpose];
        args.extend_from_slice(extra);
        args.push(cert);
        openssl(dir, &args)
    }

    #[test]
    fn openssl_accepts_the_fleet() {
        let dir = TempDir::new("certs-openssl");
        generate(dir.path(), &spec(&["edge-1", "edge-2"])).unwrap();
        for (name, ca) in [
            ("edge-1", "ca.pem"),
            ("edge-2", "ca.pem"),
            ("manager", "manager-ca.pem"),
        ] {
            let cert = format!("{name}.pem");
            for purpose in ["sslclient", "sslserver"] {
                let (ok, out) =
                    verify_with(dir.path(), ca, purpose, &["-verify_hostname", name], &cert);
                assert!(ok, "{name} as {purpose}: {out}");
            }
            // Each CA vouches for its own side only.
            let other = if ca == "ca.pem" {
                "manager-ca.pem"
            } else {
                "ca.pem"
            };
            let (ok, out) = verify_with(dir.path(), other, "sslclient", &[], &cert);
            assert!(!ok, "{name} must not verify under {other}: {out}");
            let (ok, out) = verify_with(
                dir.path(),
                ca,
                "sslserver",
                &["-verify_hostname", "other"],
                &cert,
            );
            assert!(!ok, "{name} must not be valid for another host: {out}");
            let (ok, out) = openssl(
                dir.path(),
                &["pkey", "-in", &format!("{name}.key"), "-noout"],
            );
            assert!(ok, "{name}.key: {out}");
        }
        let (ok, out) = verify(
            dir.path(),
            "sslserver",
            &["-verify_ip", "127.0.0.1"],
            "broker.pem",
        );
        assert!(ok, "broker by IP: {out}");
        let (ok, out) = verify(
            dir.path(),
            "sslserver",
            &["-verify_hostname", "localhost"],
            "broker.pem",
        );
        assert!(ok, "broker by name: {out}");
        let (ok, out) = verify(dir.path(), "sslclient", &[], "broker.pem");
        assert!(!ok, "the broker cert is no client cert: {out}");
    }

    #[test]
    fn a_revoked_node_fails_openssl_and_the_others_do_not() {
        let dir = TempDir::new("certs-revoke");
        generate(dir.path(), &spec(&["edge-1", "edge-2", "edge-3"])).unwrap();
        let crl_check = |cert: &str| {
            openssl(
                dir.path(),
                &[
                    "verify",
                    "-crl_check",
                    "-CAfile",
                    "ca.pem",
                    "-CRLfile",
                    "crl.pem",
                    cert,
                ],
            )
        };
        // The empty list `ferry certs` writes is a valid CRL.
        for cert in ["edge-1.pem", "edge-2.pem"] {
            let (ok, out) = crl_check(cert);
            assert!(ok, "{cert}: {out}");
        }
        let serial = revoke(dir.path(), "edge-1").unwrap();
        revoke(dir.path(), "edge-3").unwrap();
        // Again: no second entry.
        revoke(dir.path(), "edge-1").unwrap();
        assert_eq!(read_crl(dir.path()).unwrap().len(), 2);
        for (cert, revoked) in [
            ("edge-1.pem", true),
            ("edge-2.pem", false),
            ("edge-3.pem", true),
        ] {
            let (ok, out) = crl_check(cert);
            assert_eq!(!ok, revoked, "{cert}: {out}");
            if revoked {
                assert!(out.contains("certificate revoked"), "{cert}: {out}");
            }
        }
        let (_, text) = openssl(dir.path(), &["crl", "-in", "crl.pem", "-noout", "-text"]);
        let digits = serial.trim_start_matches("00");
        assert!(text.to_lowercase().contains(digits), "{serial}: {text}");
        let err = revoke(dir.path(), "edge-9").unwrap_err().to_string();
        assert!(err.contains("edge-9.pem"), "{err}");
    }

    #[test]
    fn keys_are_private() {
        let dir = TempDir::new("certs-mode");
        generate(dir.path(), &spec(&["edge-1"])).unwrap();
        for file in [
            "ca.key",
            "manager-ca.key",
            "broker.key",
            "edge-1.key",
            "manager.key",
            "order.key",
        ] {
            let mode = fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        let mode = fs::metadata(dir.join("edge-1.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode & 0o044, 0o044, "certificates are readable");
    }

    #[test]
    fn the_order_key_is_kept_and_openssl_reads_it() {
        let dir = TempDir::new("certs-order");
        generate(dir.path(), &spec(&["edge-1"])).unwrap();
        let key = fs::read(dir.join("order.key")).unwrap();
        let public = fs::read(dir.join("order.pub")).unwrap();
        generate(dir.path(), &spec(&["edge-1", "edge-2"])).unwrap();
        assert_eq!(fs::read(dir.join("order.key")).unwrap(), key);
        assert_eq!(fs::read(dir.join("order.pub")).unwrap(), public);
        let (ok, out) = openssl(dir.path(), &["pkey", "-in", "order.key", "-noout", "-text"]);
        assert!(ok && out.contains("ED25519"), "{out}");
        let (ok, out) = openssl(
            dir.path(),
            &["pkey", "-pubin", "-in", "order.pub", "-noout", "-text"],
        );
        assert!(ok && out.contains("ED25519"), "{out}");

        // openssl signs an order the agent's key check accepts: any script
        // can sign without ferry.
        let job = r#"{"action":"cancel","job":"j0","node":"edge-1","job_id":"j1","issued_at":1,"expires_at":2}"#;
        fs::write(dir.join("job.json"), job).unwrap();
        let (ok, out) = openssl(
            dir.path(),
            &[
                "pkeyutl",
                "-sign",
                "-rawin",
                "-inkey",
                "order.key",
                "-in",
                "job.json",
                "-out",
                "job.sig",
            ],
        );
        assert!(ok, "{out}");
        use base64::Engine as _;
        let envelope = crate::mqtt::contract::Envelope {
            job: job.into(),
            sig: base64::engine::general_purpose::STANDARD
                .encode(fs::read(dir.join("job.sig")).unwrap()),
            key_id: None,
        };
        let public = crate::order::OrderKey::load(&dir.join("order.pub")).unwrap();
        public.verify(&envelope).unwrap();

        // A public key that is not the signing key's is refused.
        let other = TempDir::new("certs-order-other");
        generate(other.path(), &spec(&["edge-1"])).unwrap();
        fs::copy(other.join("order.pub"), dir.join("order.pub")).unwrap();
        let err = generate(dir.path(), &spec(&["edge-1"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("order.pub ("), "{err}");
        fs::remove_file(dir.join("order.pub")).unwrap();
        let err = generate(dir.path(), &spec(&["edge-1"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("order.key without order.pub"), "{err}");
    }

    #[test]
    fn adding_a_node_reuses_the_ca() {
        let dir = TempDir::new("certs-reuse");
        generate(dir.path(), &spec(&["edge-1"])).unwrap();
        let ca = fs::read(dir.join("ca.pem")).unwrap();
        let edge1 = fs::read(dir.join("edge-1.pem")).unwrap();
        generate(dir.path(), &spec(&["edge-1", "edge-2"])).unwrap();
        assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), ca);
        // The first run's certificate still verifies against the same CA.
        fs::write(dir.join("edge-1-old.pem"), edge1).unwrap();
        for cert in ["edge-1-old.pem", "edge-2.pem"] {
            let (ok, out) = verify(dir.path(), "sslclient", &[], cert);
            assert!(ok, "{cert}: {out}");
        }
    }

    #[test]
    fn refuses_half_a_ca_and_a_foreign_key() {
        let dir = TempDir::new("certs-half");
        generate(dir.path(), &spec(&["edge-1"])).unwrap();
        let other = TempDir::new("certs-other");
        generate(other.path(), &spec(&["edge-1"])).unwrap();
        fs::copy(other.join("ca.key"), dir.join("ca.key")).unwrap();
        let err = generate(dir.path(), &spec(&["edge-1"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.key is not the key of ca.pem"), "{err}");
        fs::remove_file(dir.join("ca.key")).unwrap();
        let err = generate(dir.path(), &spec(&["edge-1"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.pem without ca.key"), "{err}");
    }

    #[test]
    fn rejects_bad_names() {
        let dir = TempDir::new("certs-names");
        for (nodes, bad) in [
            (vec!["../evil"], "../evil"),
            (vec!["a b"], "a b"),
            (vec![""], ""),
            (vec!["ca"], "ca"),
            (vec!["edge-1", "edge-1"], "edge-1"),
            (vec!["manager"], "manager"),
            (vec!["-x"], "-x"),
        ] {
            let err = generate(dir.path(), &spec(&nodes)).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{nodes:?}: {err}");
        }
        assert!(crate::stream::testutil::tree(dir.path()).is_empty());
    }
}
