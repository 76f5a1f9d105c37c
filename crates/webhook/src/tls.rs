//! The server's certificate, read from PEM files and read again when either file changes (as
//! cert-manager renews a Secret mounted into the pod), without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;

use crate::Error;

/// rustls config with kube's `ring` provider, HTTP/1.1 over ALPN, and a certificate that follows
/// its files. Fails at once when the files are unreadable, so a bad start is loud.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, Error> {
    let provider = Arc::new(ring::default_provider());
    let resolver = ReloadingCert::new(cert, key, provider.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    stamp: (Option<SystemTime>, Option<SystemTime>),
    key: Arc<CertifiedKey>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, Error> {
    let bad = |path: &Path, what: String| Error::Certificate { path: path.to_path_buf(), message: what };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no CERTIFICATE block in the file".into()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    CertifiedKey::from_der(chain, der, provider)
        .map_err(|e| bad(key, format!("{e} (is it the key of {}?)", cert.display())))
}

impl ReloadingCert {
    fn new(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, Error> {
        let stamp = (mtime(cert), mtime(key));
        let loaded = load(cert, key, &provider)?;
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: Mutex::new(Loaded { stamp, key: Arc::new(loaded) }),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = (mtime(&self.cert), mtime(&self.key));
        if stamp != cur.stamp {
            // A half-written pair fails to load or to match; keep serving the old one until
            // both files agree.
            match load(&self.cert, &self.key, &self.provider) {
                Ok(k) => {
                    tracing::info!(cert = %self.cert.display(), "certificate reloaded");
                    *cur = Loaded { stamp, key: Arc::new(k) };
                }
                Err(e) => tracing::warn!("keeping the previous certificate: {e}"),
            }
        }
        Some(cur.key.clone())
    }
}

pub(crate) type Acceptor = tokio_rustls::TlsAcceptor;

pub(crate) fn acceptor(config: ServerConfig) -> Acceptor {
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
