//! Authentication: mutual TLS 1.3 between two self-signed certificates, each side pinning
//! the other's SHA-256 certificate fingerprint (as SSH pins host keys). No certificate
//! authority, names or expiry dates are involved; possession of the private key is proven
//! by the TLS 1.3 handshake signature, which is checked normally.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest as _, Sha256};

/// File names inside a key directory.
pub const KEY_FILE: &str = "standby.key";
pub const CERT_FILE: &str = "standby.crt";

/// The name the client asks for in the handshake (never checked: the pin is what counts).
pub const SERVER_NAME: &str = "bkimg-standby";

/// The one crypto provider used here, named explicitly: the process may link another
/// (the S3 SDK), so no process-wide default is relied on.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// SHA-256 of a certificate (DER), as 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint(pub String);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(hex::encode(Sha256::digest(cert.as_ref())))
    }

    /// Accepts 64 hex digits, optionally prefixed "sha256:" and with ':' separators.
    pub fn parse(text: &str) -> Result<Fingerprint> {
        let t = text.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .unwrap_or(t);
        let hex: String = t.chars().filter(|&c| c != ':').collect();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "{text:?} is not a certificate fingerprint: give the 64 hex digits printed by \
                 `bkimg standby keygen` (or `bkimg standby fingerprint`)"
            );
        }
        Ok(Fingerprint(hex.to_ascii_lowercase()))
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A certificate and its private key, loaded from a key directory.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    pub fn load(dir: &Path) -> Result<Identity> {
        let (key_path, cert_path) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
        let cert = CertificateDer::from_pem_file(&cert_path).with_context(|| {
            format!(
                "reading the certificate {} (make one with `bkimg standby keygen --dir {}`)",
                cert_path.display(),
                dir.display()
            )
        })?;
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .with_context(|| format!("reading the private key {}", key_path.display()))?;
        Ok(Identity { cert, key })
    }

    /// An identity given inline: the private key and the certificate as PEM text (the
    /// contents of standby.key and standby.crt), e.g. from recovery media's configuration.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Identity> {
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context(
            "the certificate is not PEM (give the contents of standby.crt, from `bkimg \
             standby keygen`)",
        )?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context(
            "the private key is not PEM (give the contents of standby.key, from `bkimg \
             standby keygen`)",
        )?;
        Ok(Identity { cert, key })
    }
}

/// Makes a new key pair and self-signed certificate in `dir` (created if missing). Refuses
/// to replace an existing key: peers have pinned its fingerprint.
pub fn keygen(dir: &Path) -> Result<(Fingerprint, PathBuf)> {
    let (key_path, cert_path) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
    if key_path.exists() || cert_path.exists() {
        bail!(
            "{} already holds a standby key: peers may have pinned it; remove {} and {} first \
             to make a new one",
            dir.display(),
            key_path.display(),
            cert_path.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .context("generating a key pair")?;
    let write = |path: &Path, text: &str, mode: u32| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", path.display()))
    };
    write(&key_path, &ck.signing_key.serialize_pem(), 0o600)?;
    write(&cert_path, &ck.cert.pem(), 0o644)?;
    Ok((Fingerprint::of(ck.cert.der()), cert_path))
}

/// Reads allowed fingerprints: each `--allow` value is a fingerprint or a file with one
/// per line ('#' starts a comment; anything after the fingerprint on a line is a label).
pub fn allowed_list(values: &[String]) -> Result<BTreeSet<Fingerprint>> {
    let out = fingerprints(values, "--allow")?;
    if out.is_empty() {
        bail!("no client is allowed: give --allow FINGERPRINT (or a file of them)");
    }
    Ok(out)
}

/// Reads the fingerprints `option`'s values name (each a fingerprint or a file of them,
/// as for `--allow`); may be empty.
pub fn fingerprints(values: &[String], option: &str) -> Result<BTreeSet<Fingerprint>> {
    let mut out = BTreeSet::new();
    for v in values {
        if let Ok(fp) = Fingerprint::parse(v) {
            out.insert(fp);
            continue;
        }
        let text = fs::read_to_string(v).with_context(|| {
            format!("{option} {v:?} is neither a fingerprint nor a readable file of fingerprints")
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let Some(first) = line.split_whitespace().next() else {
                continue;
            };
            out.insert(Fingerprint::parse(first).with_context(|| format!("{v} line {}", n + 1))?);
        }
    }
    Ok(out)
}

/// What a verifier saw, for messages and logs.
pub type Seen = Arc<Mutex<Option<Fingerprint>>>;

fn check_sig13(
    msg: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        msg,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

fn schemes() -> Vec<SignatureScheme> {
    provider()
        .signature_verification_algorithms
        .supported_schemes()
}

/// Client side: the server's certificate must have the pinned fingerprint.
#[derive(Debug)]
struct PinnedServer {
    pin: Fingerprint,
    seen: Seen,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        let ok = fp == self.pin;
        judge(&self.seen, fp, ok).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _msg: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_sig13(msg, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Records the fingerprint a peer presented (for the log line) and accepts it if `ok`.
fn judge(seen: &Seen, fp: Fingerprint, ok: bool) -> Result<(), rustls::Error> {
    *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
    if ok {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }
}

/// Only TLS 1.3 is offered, so a TLS 1.2 signature is never right.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls13RequiredForQuic,
    ))
}

/// Server side: the client must present a certificate whose fingerprint is allowed.
#[derive(Debug)]
struct AllowedClients {
    allowed: Arc<BTreeSet<Fingerprint>>,
    seen: Seen,
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fp = Fingerprint::of(end_entity);
        let ok = self.allowed.contains(&fp);
        judge(&self.seen, fp, ok).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _msg: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        msg: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_sig13(msg, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// A client configuration pinning `pin`; `seen` receives the server's fingerprint.
pub fn client_config(id: &Identity, pin: &Fingerprint, seen: Seen) -> Result<rustls::ClientConfig> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with aws-lc-rs")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer {
            pin: pin.clone(),
            seen,
        }))
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .context("loading the client key")?;
    Ok(cfg)
}

/// A server configuration for one connection; `seen` receives the client's fingerprint.
pub fn server_config(
    id: &Identity,
    allowed: Arc<BTreeSet<Fingerprint>>,
    seen: Seen,
) -> Result<rustls::ServerConfig> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with aws-lc-rs")?
        .with_client_cert_verifier(Arc::new(AllowedClients { allowed, seen }))
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .context("loading the server key")?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_common_spellings() {
        let hex = "ab".repeat(32);
        let colons = hex
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(Fingerprint::parse(&hex).unwrap().0, hex);
        assert_eq!(Fingerprint::parse(&format!("sha256:{hex}")).unwrap().0, hex);
        assert_eq!(Fingerprint::parse(&colons).unwrap().0, hex);
        assert!(Fingerprint::parse("abc").is_err());
        assert!(Fingerprint::parse(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn keygen_writes_a_loadable_identity_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (fp, _) = keygen(dir.path()).unwrap();
        let id = Identity::load(dir.path()).unwrap();
        assert_eq!(id.fingerprint(), fp);
        assert!(keygen(dir.path()).is_err());
        // The same key given inline.
        let pem = |f| fs::read_to_string(dir.path().join(f)).unwrap();
        let inline = Identity::from_pem(&pem(KEY_FILE), &pem(CERT_FILE)).unwrap();
        assert_eq!(inline.fingerprint(), fp);
        assert!(Identity::from_pem("not a key", &pem(CERT_FILE)).is_err());
        assert!(Identity::from_pem(&pem(KEY_FILE), &pem(KEY_FILE)).is_err());
        client_config(&id, &fp, Seen::default()).unwrap();
        server_config(&id, Arc::new([fp].into()), Seen::default()).unwrap();
    }
}
