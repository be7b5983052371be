//! TLS for the proxy: a serving certificate that can be swapped at runtime (renewal without a
//! restart), and client certificates checked in the HTTP layer so a certificate from another
//! CA gets a 401 like any other bad credential, instead of a failed handshake.

use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("PEM: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("no certificate in PEM")]
    Empty,
    #[error("issuing a certificate: {0}")]
    Issue(String),
}

pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::Empty);
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    Ok(PrivateKeyDer::from_pem_slice(pem.as_bytes())?)
}

pub fn root_store(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The serving certificate, replaceable while the server runs.
#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingCert {
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(ServingCert { current: RwLock::new(certified_key(cert_pem, key_pem)?) }))
    }

    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = certified_key(cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    Ok(Arc::new(CertifiedKey::from_der(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?, &provider)?))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Accepts any client certificate during the handshake (still requiring proof of its key), so
/// the HTTP layer can answer 401 for a certificate of the wrong CA. [`ClientCerts::verify`]
/// is the real check and must run on every authenticated request.
#[derive(Debug)]
struct AcceptThenCheck {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for AcceptThenCheck {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The chain check for client certificates against the virtual cluster's CA.
#[derive(Debug, Clone)]
pub struct ClientCerts {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl ClientCerts {
    pub fn new(ca_pem: &str) -> Result<Self, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(ca_pem)?),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .allow_unauthenticated()
        .build()?;
        Ok(ClientCerts { verifier })
    }

    /// Whether `chain` (end entity first) chains to the CA and is valid now.
    pub fn verify(&self, chain: &[CertificateDer<'_>]) -> bool {
        match chain.split_first() {
            Some((end, intermediates)) => self.verifier.verify_client_cert(end, intermediates, UnixTime::now()).is_ok(),
            None => false,
        }
    }
}

/// The proxy's server configuration: HTTP/2 and HTTP/1.1 (upgrades need 1.1).
pub fn server_config(serving: Arc<ServingCert>, clients: &ClientCerts) -> Result<rustls::ServerConfig, TlsError> {
    let verifier = Arc::new(AcceptThenCheck { inner: clients.verifier.clone() });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A client configuration trusting `ca_pem` and presenting `cert_pem`/`key_pem`.
pub fn client_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(root_store(ca_pem)?)
        .with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?)
}

/// How long the virtual API server has for its TLS handshake with what vkube serves it itself.
const IN_PROCESS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long an in-process serving certificate is made for, and kept for reuse (half of it).
const IN_PROCESS_VALIDITY_DAYS: i64 = 1;
const IN_PROCESS_REUSE: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// TLS for something vkube answers itself on the virtual API server's way out (`kubelet`,
/// `resource_metrics`): a serving certificate for the name or address dialled, signed by a CA
/// the virtual API server trusts for it, made once per name (a key and a signature) and reused
/// for half its day; and a request served only for the client certificate of one user of
/// another CA.
pub struct InProcessServer {
    ca: vkube_pki::Bundle,
    clients: Arc<dyn ClientCertVerifier>,
    configs: moka::future::Cache<String, Arc<rustls::ServerConfig>>,
    /// The client certificate's user served, and what is served (for certificates and logs).
    user: &'static str,
    what: &'static str,
}

impl InProcessServer {
    pub fn new(
        ca_cert_pem: &str,
        ca_key_pem: &str,
        client_ca_pem: &str,
        user: &'static str,
        what: &'static str,
    ) -> Result<Self, TlsError> {
        let clients = WebPkiClientVerifier::builder_with_provider(
            Arc::new(root_store(client_ca_pem)?),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()?;
        let ca = vkube_pki::Bundle {
            files: [("ca.crt", ca_cert_pem), ("ca.key", ca_key_pem)]
                .into_iter()
                .map(|(f, pem)| (f.to_string(), pem.to_string()))
                .collect(),
        };
        let configs = moka::future::Cache::builder().max_capacity(256).time_to_live(IN_PROCESS_REUSE).build();
        Ok(InProcessServer { ca, clients, configs, user, what })
    }

    /// A fresh certificate for `host` (an IP address or a name).
    pub fn config(&self, host: &str) -> Result<rustls::ServerConfig, TlsError> {
        let leaf = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => vkube_pki::LeafSpec::server(self.what, "ca", &[], &[ip]),
            Err(_) => vkube_pki::LeafSpec::server(self.what, "ca", &[host.to_string()], &[]),
        };
        let validity =
            vkube_pki::Validity { leaf: vkube_pki::Duration::days(IN_PROCESS_VALIDITY_DAYS), ..Default::default() };
        let (cert, key) = self
            .ca
            .issue(&leaf, validity, vkube_pki::OffsetDateTime::now_utc())
            .map_err(|e| TlsError::Issue(format!("{}'s for {host}: {e}", self.what)))?;
        Ok(rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(self.clients.clone())
            .with_single_cert(certs_from_pem(&cert)?, key_from_pem(&key)?)?)
    }

    /// Serves one connection the virtual API server opened to `host` with `handle`.
    pub async fn serve<IO, F, Fut>(&self, io: IO, host: &str, handle: F)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = http::Response<crate::ProxyBody>> + Send + 'static,
    {
        let config = self.configs.try_get_with(host.to_string(), async { self.config(host).map(Arc::new) }).await;
        match config {
            Ok(config) => serve_in_process(io, config, self.user, self.what, handle).await,
            Err(e) => tracing::error!(error = %e, %host, "no serving certificate for the {}", self.what),
        }
    }
}

/// Serves one connection with `config`, a request served only for the client certificate of
/// `user` (the verifier of `config` has checked its CA).
async fn serve_in_process<IO, F, Fut>(io: IO, config: Arc<rustls::ServerConfig>, user: &str, what: &str, handle: F)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<crate::ProxyBody>> + Send + 'static,
{
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(io);
    let tls = match tokio::time::timeout(IN_PROCESS_HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "{what} connection refused: TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!("{what} connection refused: no TLS handshake in time");
            return;
        }
    };
    let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(crate::auth::Identity::from_cert);
    if peer.as_ref().map(|u| u.user.as_str()) != Some(user) {
        tracing::warn!(user = ?peer.map(|u| u.user), "{what} connection refused: not the virtual API server");
        return;
    }
    let handle = Arc::new(handle);
    let service = hyper::service::service_fn(move |req| {
        let handle = handle.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "{what} connection ended");
    }
}
