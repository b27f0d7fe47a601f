//! Mutual TLS from PEM files, and the node identity in a peer certificate.
//!
//! Every node holds a certificate from the fleet CA whose subject CN and DNS
//! SAN are its node name (see [`crate::certs`]). So:
//! - the source connects to the target's data port with
//!   [`server_name`]`(target_node)`: rustls checks the target's DNS SAN;
//! - the target reads the client chain (`peer_certificates()`) and accepts
//!   the transfer only if [`cert_matches_node`]`(&chain[0], &header.source_node)`,
//!   i.e. `cn == node || dns_sans.contains(node)` (exact, case-sensitive).
//!
//! - the certificate must also carry the role of a fleet node: the SAN URI
//!   [`NODE_ROLE`]. The manager's certificate (role [`MANAGER_ROLE`]) is
//!   as valid a client of the same CA, but cannot open a migration.
//!
//! The role is a SAN URI rather than an extended key usage: it says who the
//! holder is, not which protocol the key serves; it shows in `openssl x509
//! -ext subjectAltName`, needs no private OID, and leaves the standard
//! clientAuth/serverAuth usages that rustls, openssl and mosquitto check
//! as they are.
//!
//! The `ring` provider is passed explicitly, never the process default: the
//! MQTT client is built with `use-rustls-no-provider` and installs none.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{server::TlsStream, TlsAcceptor};
use x509_parser::extensions::GeneralName;

use super::StreamError;

/// Where a node's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The fleet CA certificate(s): the only roots trusted.
    pub ca: PathBuf,
    /// This node's certificate (chain), leaf first.
    pub cert: PathBuf,
    /// This node's private key (PKCS#8, PKCS#1 or SEC1 PEM).
    pub key: PathBuf,
}

/// The SAN URI of a fleet node's certificate: it may open a migration on a
/// peer's data port.
pub const NODE_ROLE: &str = "ferry:role:node";
/// The SAN URI of the manager's certificate: it orders jobs over MQTT and
/// is refused on data ports.
pub const MANAGER_ROLE: &str = "ferry:role:manager";

/// Longest a peer may take over its TLS handshake on the data port. Before
/// it ends the peer is anonymous: it must not hold a connection, nor the
/// agent's drain, for longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side of a data-port connection: the TLS handshake (client
/// certificate required by `acceptor`'s config) within `timeout` (the
/// agent gives [`HANDSHAKE_TIMEOUT`]), then the names of the peer's
/// certificate.
pub async fn accept_peer<S>(
    acceptor: &TlsAcceptor,
    conn: S,
    timeout: Duration,
) -> Result<(TlsStream<S>, Vec<String>), StreamError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls = tokio::time::timeout(timeout, acceptor.accept(conn))
        .await
        .map_err(|_| StreamError::Timeout {
            what: "waiting for the TLS handshake".into(),
            secs: timeout.as_secs(),
        })?
        .map_err(|e| StreamError::Handshake(e.to_string()))?;
    let Some(leaf) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return Err(StreamError::PeerCert(
            "the peer presented no certificate".into(),
        ));
    };
    let names = cert_names(leaf)?;
    let roles = cert_roles(leaf)?;
    if !roles.iter().any(|r| r == NODE_ROLE) {
        return Err(StreamError::PeerCert(format!(
            "certificate of {names:?} has roles {roles:?}, not {NODE_ROLE}: only fleet nodes may open a migration"
        )));
    }
    Ok((tls, names))
}

/// A TLS config that SIGHUP replaces: a connection takes the current one
/// when it starts; those under way keep theirs, so running jobs go on.
#[derive(Debug)]
pub struct Current<T>(std::sync::RwLock<Arc<T>>);

impl<T> Current<T> {
    pub fn new(config: Arc<T>) -> Current<T> {
        Current(std::sync::RwLock::new(config))
    }

    pub fn get(&self) -> Arc<T> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, config: Arc<T>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = config;
    }
}

/// This node's TLS material as the agent checks and uses it: the key's
/// mode, the certificate's identity and role, the data port's server side
/// (with the CRL, if any) and the client side. Called at start and on
/// SIGHUP.
pub fn load_node_tls(
    files: &TlsFiles,
    node: &str,
    crl: Option<&Path>,
) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>), StreamError> {
    check_key_private(&files.key)?;
    check_identity(files, node)?;
    Ok((server_config_with_crl(files, crl)?, client_config(files)?))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side of the data port: requires a client certificate chaining to
/// the CA, and presents this node's certificate.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, StreamError> {
    server_config_with_crl(files, None)
}

/// [`server_config`], refusing also the client certificates the CRL file
/// `crl` lists (the leaf's status must be known: a CRL of its issuer).
pub fn server_config_with_crl(
    files: &TlsFiles,
    crl: Option<&Path>,
) -> Result<Arc<ServerConfig>, StreamError> {
    let provider = provider();
    let roots = Arc::new(load_roots(&files.ca)?);
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if let Some(path) = crl {
        let pem = read(path)?;
        let crls = rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StreamError::TlsFile {
                path: path.to_path_buf(),
                reason: format!("bad CRL PEM: {e}"),
            })?;
        if crls.is_empty() {
            return Err(StreamError::TlsFile {
                path: path.to_path_buf(),
                reason: "no CRL found".into(),
            });
        }
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = builder
        .build()
        .map_err(|e| StreamError::TlsConfig(format!("client verifier: {e}")))?;
    let (certs, key) = load_identity(files)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StreamError::TlsConfig(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| mismatched(files, e))?;
    Ok(Arc::new(config))
}

/// Client side (data port, MQTT): trusts only the CA, presents this node's
/// certificate.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, StreamError> {
    let roots = load_roots(&files.ca)?;
    let (certs, key) = load_identity(files)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StreamError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| mismatched(files, e))?;
    Ok(Arc::new(config))
}

/// The name to connect to `node` with: its certificate's DNS SAN.
pub fn server_name(node: &str) -> Result<ServerName<'static>, StreamError> {
    ServerName::try_from(node.to_string())
        .map_err(|e| StreamError::TlsConfig(format!("node name {node:?} is not a DNS name: {e}")))
}

/// The subject CN(s) then the DNS SANs of a certificate, without repeats.
pub fn cert_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, StreamError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| StreamError::PeerCert(format!("cannot parse: {e}")))?;
    let mut names: Vec<String> = Vec::new();
    for cn in x509.subject().iter_common_name() {
        let cn = cn
            .as_str()
            .map_err(|e| StreamError::PeerCert(format!("unreadable common name: {e}")))?;
        names.push(cn.to_string());
    }
    let san = x509
        .subject_alternative_name()
        .map_err(|e| StreamError::PeerCert(format!("bad subject alternative names: {e}")))?;
    for name in san.iter().flat_map(|san| &san.value.general_names) {
        if let GeneralName::DNSName(dns) = name {
            names.push(dns.to_string());
        }
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Ok(names)
}

/// The `ferry:role:` SAN URIs of a certificate.
pub fn cert_roles(cert: &CertificateDer<'_>) -> Result<Vec<String>, StreamError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| StreamError::PeerCert(format!("cannot parse: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| StreamError::PeerCert(format!("bad subject alternative names: {e}")))?;
    Ok(san
        .iter()
        .flat_map(|san| &san.value.general_names)
        .filter_map(|name| match name {
            GeneralName::URI(uri) if uri.starts_with("ferry:role:") => Some(uri.to_string()),
            _ => None,
        })
        .collect())
}

/// Whether `cert` is `node`'s: its CN or one of its DNS SANs is `node`.
pub fn cert_matches_node(cert: &CertificateDer<'_>, node: &str) -> bool {
    cert_names(cert).is_ok_and(|names| names.iter().any(|n| n == node))
}

/// Checks that the certificate in `files` is `node`'s own (its CN or a
/// DNS SAN is `node`). A node started with another node's files then fails
/// at once, instead of being refused by every peer and by the broker's
/// ACL (which keys on the CN).
pub fn check_identity(files: &TlsFiles, node: &str) -> Result<(), StreamError> {
    let certs = load_certs(&files.cert)?;
    let names = cert_names(&certs[0]).map_err(|e| StreamError::TlsFile {
        path: files.cert.clone(),
        reason: e.to_string(),
    })?;
    if !names.iter().any(|n| n == node) {
        return Err(StreamError::TlsFile {
            path: files.cert.clone(),
            reason: format!("certificate names {names:?}, not this node's id {node:?}"),
        });
    }
    let roles = cert_roles(&certs[0]).map_err(|e| StreamError::TlsFile {
        path: files.cert.clone(),
        reason: e.to_string(),
    })?;
    if !roles.iter().any(|r| r == NODE_ROLE) {
        return Err(StreamError::TlsFile {
            path: files.cert.clone(),
            reason: format!(
                "certificate has roles {roles:?}, not {NODE_ROLE}: peers would refuse it (issue node certificates with `ferry certs`)"
            ),
        });
    }
    Ok(())
}

/// The private key is readable by its owner alone (mode 0600 or 0400): a
/// key that group or others can read is as good as leaked, so the agent
/// refuses to start with one and says how to fix it.
pub fn check_key_private(path: &Path) -> Result<(), StreamError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| StreamError::TlsFile {
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StreamError::TlsFile {
            path: path.to_path_buf(),
            reason: format!(
                "private key has mode {mode:04o}: group or others can read it; \
                 run chmod 600 on it (owned by the user the agent runs as, uid {})",
                meta.uid()
            ),
        });
    }
    Ok(())
}

fn load_identity(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), StreamError> {
    let certs = load_certs(&files.cert)?;
    let pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| StreamError::TlsFile {
        path: files.key.clone(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no private key found".into(),
            e => format!("bad private key PEM: {e}"),
        },
    })?;
    Ok((certs, key))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, StreamError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StreamError::TlsFile {
            path: path.to_path_buf(),
            reason: format!("bad certificate PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(StreamError::TlsFile {
            path: path.to_path_buf(),
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, StreamError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| StreamError::TlsFile {
            path: path.to_path_buf(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn read(path: &Path) -> Result<Vec<u8>, StreamError> {
    std::fs::read(path).map_err(|e| StreamError::TlsFile {
        path: path.to_path_buf(),
        reason: format!("cannot read: {e}"),
    })
}

fn mismatched(files: &TlsFiles, e: rustls::Error) -> StreamError {
    StreamError::TlsFile {
        path: files.cert.clone(),
        reason: format!("unusable with key {}: {e}", files.key.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{generate, FleetSpec};
    use crate::stream::testutil::{noise, TempDir};
    use crate::stream::{receive_checkpoint, send_checkpoint, SendOptions, TransferHeader};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn fleet(tag: &str) -> TempDir {
        let dir = TempDir::new(tag);
        let spec = FleetSpec {
            nodes: vec!["node-a".into(), "node-b".into()],
            ..FleetSpec::default()
        };
        generate(dir.path(), &spec).expect("generate fleet certs");
        dir
    }

    fn files(dir: &TempDir, name: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }

    /// Accepts one connection; returns the client's node id, or the error.
    async fn serve_once(
        server: Arc<ServerConfig>,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<String, String>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut hello = [0u8; 5];
            tls.read_exact(&mut hello)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"olleh").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
            let leaf = certs
                .first()
                .ok_or_else(|| "the client presented no certificate".to_string())?;
            let names = cert_names(leaf).map_err(|e| e.to_string())?;
            Ok(names.into_iter().next().unwrap_or_default())
        });
        (addr, task)
    }

    async fn talk(
        client: Arc<ClientConfig>,
        addr: std::net::SocketAddr,
        name: &str,
    ) -> Result<Vec<String>, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(client)
            .connect(server_name(name).map_err(|e| e.to_string())?, tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut answer = [0u8; 5];
        tls.read_exact(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(&answer, b"olleh");
        let server_certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
        cert_names(&server_certs[0]).map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn mutual_handshake_names_both_peers() {
        let dir = fleet("tls-ok");
        let server = server_config(&files(&dir, "node-a")).unwrap();
        let client = client_config(&files(&dir, "node-b")).unwrap();
        let (addr, server_task) = serve_once(server).await;
        let server_names = talk(client, addr, "node-a").await.unwrap();
        assert_eq!(server_names, vec!["node-a".to_string()]);
        assert_eq!(server_task.await.unwrap().unwrap(), "node-b");
    }

    #[tokio::test]
    async fn client_from_another_ca_is_refused() {
        let dir = fleet("tls-ca1");
        let other = fleet("tls-ca2");
        let server = server_config(&files(&dir, "node-a")).unwrap();
        // Trusts the right CA but presents a cert from another one.
        let mut intruder = files(&other, "node-b");
        intruder.ca = dir.join("ca.pem");
        let client = client_config(&intruder).unwrap();
        let (addr, server_task) = serve_once(server).await;
        assert!(talk(client, addr, "node-a").await.is_err());
        let err = server_task.await.unwrap().unwrap_err();
        // Both fleets' CAs are named alike: webpki finds the issuer by name
        // and then fails on the signature.
        assert!(err.contains("invalid peer certificate"), "{err}");
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let dir = fleet("tls-nocert");
        let server = server_config(&files(&dir, "node-a")).unwrap();
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(load_roots(&dir.join("ca.pem")).unwrap())
            .with_no_client_auth();
        let (addr, server_task) = serve_once(server).await;
        assert!(talk(Arc::new(client), addr, "node-a").await.is_err());
        let err = server_task.await.unwrap().unwrap_err();
        assert!(
            err.contains("NoCertificatesPresented") || err.contains("no certificate"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn client_refuses_a_server_under_the_wrong_name() {
        let dir = fleet("tls-name");
        let server = server_config(&files(&dir, "node-a")).unwrap();
        let client = client_config(&files(&dir, "node-b")).unwrap();
        let (addr, server_task) = serve_once(server).await;
        let err = talk(client, addr, "node-b").await.unwrap_err();
        assert!(
            err.contains("NotValidForName") || err.contains("not valid for name"),
            "{err}"
        );
        assert!(server_task.await.unwrap().is_err());
    }

    #[test]
    fn names_and_matching() {
        let dir = fleet("tls-names");
        let cert = load_certs(&dir.join("node-a.pem")).unwrap().remove(0);
        assert_eq!(cert_names(&cert).unwrap(), vec!["node-a".to_string()]);
        assert!(cert_matches_node(&cert, "node-a"));
        assert!(!cert_matches_node(&cert, "node-b"));
        assert!(!cert_matches_node(&cert, "node"));
        assert!(!cert_matches_node(
            &CertificateDer::from(vec![1, 2, 3]),
            "node-a"
        ));
        let broker = load_certs(&dir.join("broker.pem")).unwrap().remove(0);
        assert_eq!(cert_names(&broker).unwrap(), vec!["localhost".to_string()]);
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_in_the_handshake() {
        let dir = fleet("tls-silent");
        let acceptor = TlsAcceptor::from(server_config(&files(&dir, "node-a")).unwrap());
        let (_client, server) = tokio::io::duplex(1024);
        let err = accept_peer(&acceptor, server, Duration::from_millis(100))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("waiting for the TLS handshake"), "{err}");
    }

    #[tokio::test]
    async fn accept_peer_names_the_client() {
        let dir = fleet("tls-accept");
        let acceptor = TlsAcceptor::from(server_config(&files(&dir, "node-a")).unwrap());
        let client = client_config(&files(&dir, "node-b")).unwrap();
        let (c, s) = tokio::io::duplex(64 * 1024);
        let connect = TlsConnector::from(client).connect(server_name("node-a").unwrap(), c);
        let (accepted, connected) =
            tokio::join!(accept_peer(&acceptor, s, HANDSHAKE_TIMEOUT), connect);
        connected.unwrap();
        assert_eq!(accepted.unwrap().1, vec!["node-b".to_string()]);
    }

    #[tokio::test]
    async fn the_manager_certificate_cannot_open_a_migration() {
        let dir = fleet("tls-manager");
        let acceptor = TlsAcceptor::from(server_config(&files(&dir, "node-a")).unwrap());
        let attempt = |who: TlsFiles| {
            let acceptor = acceptor.clone();
            async move {
                let client = client_config(&who).unwrap();
                let (c, s) = tokio::io::duplex(64 * 1024);
                let connect = TlsConnector::from(client).connect(server_name("node-a").unwrap(), c);
                let (accepted, _) =
                    tokio::join!(accept_peer(&acceptor, s, HANDSHAKE_TIMEOUT), connect);
                accepted.map(|(_, names)| names).unwrap_err().to_string()
            }
        };
        // The manager's certificate comes from its own CA, which agents
        // do not trust.
        let err = attempt(files(&dir, "manager")).await;
        assert!(err.contains("invalid peer certificate"), "{err}");
        // A certificate of the fleet CA with the manager's role (a mistaken
        // issuance) is refused for its role, as is one with no role.
        crate::certs::issue_with_role(dir.path(), "boss", Some(MANAGER_ROLE));
        crate::certs::issue_with_role(dir.path(), "old", None);
        let err = attempt(files(&dir, "boss")).await;
        assert!(
            err.contains("[\"boss\"]") && err.contains(MANAGER_ROLE) && err.contains(NODE_ROLE),
            "{err}"
        );
        let err = attempt(files(&dir, "old")).await;
        assert!(err.contains("roles []") && err.contains(NODE_ROLE), "{err}");
        let manager = load_certs(&dir.join("manager.pem")).unwrap().remove(0);
        assert_eq!(
            cert_roles(&manager).unwrap(),
            vec![MANAGER_ROLE.to_string()]
        );
        let node = load_certs(&dir.join("node-a.pem")).unwrap().remove(0);
        assert_eq!(cert_roles(&node).unwrap(), vec![NODE_ROLE.to_string()]);
        let broker = load_certs(&dir.join("broker.pem")).unwrap().remove(0);
        assert!(cert_roles(&broker).unwrap().is_empty());
        // An agent started with the manager's files refuses to.
        let err = check_identity(&files(&dir, "manager"), "manager")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("manager.pem") && err.contains(NODE_ROLE),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_revoked_node_is_refused_when_the_crl_is_given() {
        let dir = fleet("tls-crl");
        let crl = dir.join(crate::certs::CRL_FILE);
        let attempt = |server: Arc<ServerConfig>, who: &str| {
            let client = client_config(&files(&dir, who)).unwrap();
            async move {
                let acceptor = TlsAcceptor::from(server);
                let (c, s) = tokio::io::duplex(64 * 1024);
                let connect = TlsConnector::from(client).connect(server_name("node-a").unwrap(), c);
                let (accepted, _) =
                    tokio::join!(accept_peer(&acceptor, s, HANDSHAKE_TIMEOUT), connect);
                accepted.map(|(_, names)| names).map_err(|e| e.to_string())
            }
        };
        let with_crl = || server_config_with_crl(&files(&dir, "node-a"), Some(&crl)).unwrap();
        // The empty list lets everyone in.
        assert!(attempt(with_crl(), "node-b").await.is_ok());
        crate::certs::revoke(dir.path(), "node-b").unwrap();
        let err = attempt(with_crl(), "node-b").await.unwrap_err();
        assert!(err.contains("Revoked"), "{err}");
        // Without the list, the same certificate still gets in.
        let without = server_config(&files(&dir, "node-a")).unwrap();
        assert!(attempt(without, "node-b").await.is_ok());
        let err = server_config_with_crl(&files(&dir, "node-a"), Some(&dir.join("node-a.pem")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no CRL found"), "{err}");
    }

    #[test]
    fn a_key_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = fleet("tls-keymode");
        let key = dir.join("node-a.key");
        check_key_private(&key).unwrap();
        for (mode, ok) in [
            (0o400, true),
            (0o640, false),
            (0o604, false),
            (0o644, false),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = check_key_private(&key);
            assert_eq!(got.is_ok(), ok, "{mode:o}: {got:?}");
            if let Err(e) = got {
                let e = e.to_string();
                assert!(
                    e.contains("node-a.key")
                        && e.contains(&format!("mode {mode:04o}"))
                        && e.contains("chmod 600"),
                    "{e}"
                );
            }
        }
        let err = check_key_private(&dir.join("missing.key"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.key") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn own_identity_is_checked() {
        let dir = fleet("tls-own");
        check_identity(&files(&dir, "node-a"), "node-a").unwrap();
        let err = check_identity(&files(&dir, "node-a"), "node-b")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("node-a.pem")
                && err.contains("\"node-b\"")
                && err.contains("[\"node-a\"]"),
            "{err}"
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = fleet("tls-bad");
        let mut f = files(&dir, "node-a");
        f.ca = dir.join("missing-ca.pem");
        let err = server_config(&f).unwrap_err().to_string();
        assert!(
            err.contains("missing-ca.pem") && err.contains("cannot read"),
            "{err}"
        );

        std::fs::write(dir.join("garbage.pem"), b"not pem at all").unwrap();
        let mut f = files(&dir, "node-a");
        f.cert = dir.join("garbage.pem");
        let err = client_config(&f).unwrap_err().to_string();
        assert!(
            err.contains("garbage.pem") && err.contains("no certificate"),
            "{err}"
        );

        let mut f = files(&dir, "node-a");
        f.key = dir.join("node-a.pem");
        let err = client_config(&f).unwrap_err().to_string();
        assert!(
            err.contains("node-a.pem") && err.contains("no private key"),
            "{err}"
        );

        // node-a's cert with node-b's key.
        let mut f = files(&dir, "node-a");
        f.key = dir.join("node-b.key");
        let err = server_config(&f).unwrap_err().to_string();
        assert!(
            err.contains("node-a.pem") && err.contains("node-b.key"),
            "{err}"
        );
    }

    /// The intended use: checkpoint over mutual TLS, identity checked
    /// against the header.
    #[tokio::test]
    async fn checkpoint_transfer_over_mutual_tls() {
        let dir = fleet("tls-wire");
        let src = TempDir::new("tls-wire-src");
        std::fs::write(src.join("pages-1.img"), noise(1 << 20, 3)).unwrap();
        let staging = TempDir::new("tls-wire-dst");
        let server = server_config(&files(&dir, "node-b")).unwrap();
        let client = client_config(&files(&dir, "node-a")).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let into = staging.join("job-1");
        let target = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = TlsAcceptor::from(server).accept(tcp).await.unwrap();
            let peer = tls.get_ref().1.peer_certificates().unwrap_or_default()[0].clone();
            receive_checkpoint(tls, &into, &Default::default(), |h| {
                if cert_matches_node(&peer, &h.source_node) {
                    Ok(())
                } else {
                    Err(format!("peer is not {}", h.source_node))
                }
            })
            .await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = TlsConnector::from(client)
            .connect(server_name("node-b").unwrap(), tcp)
            .await
            .unwrap();
        let header = TransferHeader {
            job_id: "job-1".into(),
            source_node: "node-a".into(),
            target_node: "node-b".into(),
            container: "web".into(),
            checkpoint: "cp1".into(),
        };
        let report = send_checkpoint(tls, &header, src.path(), &SendOptions::default(), |_| {})
            .await
            .unwrap();
        let received = target.await.unwrap().unwrap();
        assert_eq!(received.bytes_raw, report.bytes_raw);
        assert_eq!(
            std::fs::read(staging.join("job-1/pages-1.img")).unwrap(),
            std::fs::read(src.join("pages-1.img")).unwrap()
        );
    }
}
