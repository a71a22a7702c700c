//! The consul CLI's environment: where the agent is, the ACL token, TLS.
//!
//! Read as the consul CLI reads it (`api.DefaultConfig` in Consul's Go client):
//! `CONSUL_HTTP_ADDR` is `host:port` (default `127.0.0.1:8500`), `http://host:port`,
//! `https://host:port` or `unix:///path/to/socket`; `CONSUL_HTTP_SSL=true` turns a
//! scheme-less (or `http://`) address into HTTPS; `CONSUL_HTTP_TOKEN_FILE` wins over
//! `CONSUL_HTTP_TOKEN`; `CONSUL_HTTP_SSL_VERIFY=false` skips server verification;
//! `CONSUL_CACERT` (a PEM file) or `CONSUL_CAPATH` (a directory of them) replace the
//! system roots; `CONSUL_CLIENT_CERT` + `CONSUL_CLIENT_KEY` present a client
//! certificate; `CONSUL_TLS_SERVER_NAME` is the name the server's certificate is
//! checked against (and sent as SNI). Files are read once, at startup, so a bad path
//! is a startup error naming its variable.

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::{fmt, path::PathBuf, sync::Arc};

/// `CONSUL_HTTP_ADDR`.
pub const CONSUL_HTTP_ADDR: &str = "CONSUL_HTTP_ADDR";
/// `CONSUL_HTTP_TOKEN`.
pub const CONSUL_HTTP_TOKEN: &str = "CONSUL_HTTP_TOKEN";
/// `CONSUL_HTTP_TOKEN_FILE`.
pub const CONSUL_HTTP_TOKEN_FILE: &str = "CONSUL_HTTP_TOKEN_FILE";
/// `CONSUL_HTTP_SSL`.
pub const CONSUL_HTTP_SSL: &str = "CONSUL_HTTP_SSL";
/// `CONSUL_HTTP_SSL_VERIFY`.
pub const CONSUL_HTTP_SSL_VERIFY: &str = "CONSUL_HTTP_SSL_VERIFY";
/// `CONSUL_CACERT`.
pub const CONSUL_CACERT: &str = "CONSUL_CACERT";
/// `CONSUL_CAPATH`.
pub const CONSUL_CAPATH: &str = "CONSUL_CAPATH";
/// `CONSUL_CLIENT_CERT`.
pub const CONSUL_CLIENT_CERT: &str = "CONSUL_CLIENT_CERT";
/// `CONSUL_CLIENT_KEY`.
pub const CONSUL_CLIENT_KEY: &str = "CONSUL_CLIENT_KEY";
/// `CONSUL_TLS_SERVER_NAME`.
pub const CONSUL_TLS_SERVER_NAME: &str = "CONSUL_TLS_SERVER_NAME";

/// Every variable read here, with its default, in README order.
pub const ALL: &[(&str, &str)] = &[
    (CONSUL_HTTP_ADDR, "127.0.0.1:8500"),
    (CONSUL_HTTP_TOKEN, ""),
    (CONSUL_HTTP_TOKEN_FILE, ""),
    (CONSUL_HTTP_SSL, "false"),
    (CONSUL_HTTP_SSL_VERIFY, "true"),
    (CONSUL_CACERT, ""),
    (CONSUL_CAPATH, ""),
    (CONSUL_CLIENT_CERT, ""),
    (CONSUL_CLIENT_KEY, ""),
    (CONSUL_TLS_SERVER_NAME, ""),
];

/// Where the agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A TCP address (a host name is resolved at each connect).
    Tcp {
        /// Host name or IP.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// TLS to the agent.
#[derive(Clone)]
pub struct TlsSettings {
    /// The rustls configuration built from the variables.
    pub config: Arc<ClientConfig>,
    /// The name the server certificate must carry (and SNI).
    pub server_name: ServerName<'static>,
    /// Whether the server certificate is verified.
    pub verify: bool,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("server_name", &self.server_name)
            .field("verify", &self.verify)
            .finish_non_exhaustive()
    }
}

/// Consul's consistency modes for reads (`BATON_CONSUL_CONSISTENCY`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Reads go to the leader, which may serve them without a quorum round trip.
    #[default]
    Default,
    /// Any server answers, possibly slightly behind: scales reads, survives no leader.
    Stale,
    /// The leader confirms its leadership with a quorum first: never stale, slowest.
    Consistent,
}

impl std::str::FromStr for Consistency {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "default" => Ok(Self::Default),
            "stale" => Ok(Self::Stale),
            "consistent" => Ok(Self::Consistent),
            _ => Err(()),
        }
    }
}

/// A secret that never shows in logs or `/config`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How to reach and authenticate to the Consul agent.
#[derive(Clone, Debug)]
pub struct ClientSettings {
    /// The agent's address.
    pub addr: Address,
    /// TLS, when the address is HTTPS.
    pub tls: Option<TlsSettings>,
    /// The ACL token, sent as `X-Consul-Token`.
    pub token: Option<Secret>,
    /// `CONSUL_HTTP_TOKEN_FILE`: re-read when it changes (a rotated token).
    pub token_file: Option<PathBuf>,
    /// Datacenter to query (`None`: the agent's).
    pub datacenter: Option<String>,
    /// Consistency mode of reads.
    pub consistency: Consistency,
}

impl ClientSettings {
    /// The agent's base URL, as shown to people (`/config`, logs).
    pub fn url(&self) -> String {
        match (&self.addr, &self.tls) {
            (Address::Unix(_), _) => self.addr.to_string(),
            (a, Some(_)) => format!("https://{a}"),
            (a, None) => format!("http://{a}"),
        }
    }
}

/// One bad variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvError {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What was expected, or what went wrong.
    pub expected: String,
}

/// Reads the consul CLI's variables through `get`, reporting every bad one.
pub fn from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<ClientSettings, Vec<EnvError>> {
    let get = |name: &str| {
        get(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let mut errors = Vec::new();
    let mut fail = |name: &'static str, value: &str, expected: String| {
        errors.push(EnvError {
            name,
            value: value.to_string(),
            expected,
        })
    };
    let flag =
        |name: &'static str, default: bool, fail: &mut dyn FnMut(&'static str, &str, String)| {
            match get(name) {
                None => default,
                Some(v) => parse_bool(&v).unwrap_or_else(|| {
                    fail(name, &v, "expected true or false".into());
                    default
                }),
            }
        };
    let ssl = flag(CONSUL_HTTP_SSL, false, &mut fail);
    let verify = flag(CONSUL_HTTP_SSL_VERIFY, true, &mut fail);

    let raw_addr = get(CONSUL_HTTP_ADDR).unwrap_or_else(|| "127.0.0.1:8500".into());
    let (https, addr) = match parse_addr(&raw_addr) {
        Ok((scheme_https, addr)) => (scheme_https || ssl, Some(addr)),
        Err(e) => {
            // Never echo a password someone put in the URL.
            let shown = match raw_addr.split_once('@') {
                Some((_, host)) => format!("<redacted>@{host}"),
                None => raw_addr.clone(),
            };
            fail(CONSUL_HTTP_ADDR, &shown, e);
            (ssl, None)
        }
    };
    let https = https && !matches!(addr, Some(Address::Unix(_)));

    let token = match get(CONSUL_HTTP_TOKEN_FILE) {
        Some(path) => match std::fs::read_to_string(&path) {
            Ok(t) if !t.trim().is_empty() => Some(Secret(t.trim().to_string())),
            Ok(_) => get(CONSUL_HTTP_TOKEN).map(Secret),
            Err(e) => {
                fail(
                    CONSUL_HTTP_TOKEN_FILE,
                    &path,
                    format!("cannot read the token file: {e}"),
                );
                None
            }
        },
        None => get(CONSUL_HTTP_TOKEN).map(Secret),
    };
    if let Some(t) = &token {
        if http::HeaderValue::from_str(&t.0).is_err() {
            let name = if get(CONSUL_HTTP_TOKEN_FILE).is_some() {
                CONSUL_HTTP_TOKEN_FILE
            } else {
                CONSUL_HTTP_TOKEN
            };
            fail(
                name,
                "<redacted>",
                "the token has characters not allowed in an HTTP header".into(),
            );
        }
    }

    let tls = match (&addr, https) {
        (Some(Address::Tcp { host, .. }), true) => {
            let name_text = get(CONSUL_TLS_SERVER_NAME).unwrap_or_else(|| host.clone());
            let server_name = match ServerName::try_from(name_text.clone()) {
                Ok(n) => Some(n),
                Err(_) => {
                    let var = if get(CONSUL_TLS_SERVER_NAME).is_some() {
                        CONSUL_TLS_SERVER_NAME
                    } else {
                        CONSUL_HTTP_ADDR
                    };
                    fail(var, &name_text, "expected a DNS name or IP address".into());
                    None
                }
            };
            let config = tls_config(&get, verify, &mut fail);
            match (server_name, config) {
                (Some(server_name), Some(config)) => Some(TlsSettings {
                    config: Arc::new(config),
                    server_name,
                    verify,
                }),
                _ => None,
            }
        }
        _ => None,
    };
    if errors.is_empty() {
        if let Some(addr) = addr {
            return Ok(ClientSettings {
                addr,
                tls,
                token,
                token_file: get(CONSUL_HTTP_TOKEN_FILE).map(PathBuf::from),
                datacenter: None,
                consistency: Consistency::Default,
            });
        }
    }
    Err(errors)
}

fn parse_bool(v: &str) -> Option<bool> {
    // Go's strconv.ParseBool, which the consul CLI uses.
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Parses `CONSUL_HTTP_ADDR`: whether the scheme asks for HTTPS, and the address.
fn parse_addr(raw: &str) -> Result<(bool, Address), String> {
    const EXPECTED: &str =
        "expected HOST:PORT, http://HOST:PORT, https://HOST:PORT or unix:///PATH";
    let (scheme, rest) = match raw.split_once("://") {
        Some((s, r)) => (s, r),
        None => ("", raw),
    };
    let https = match scheme {
        "" | "http" => false,
        "https" => true,
        "unix" => {
            if rest.is_empty() {
                return Err(EXPECTED.into());
            }
            return Ok((false, Address::Unix(PathBuf::from(rest))));
        }
        _ => return Err(format!("unknown scheme {scheme:?}; {EXPECTED}")),
    };
    let rest = rest.trim_end_matches('/');
    // `[v6]:port`, `host:port`, or, with a scheme, a host alone (the scheme's port).
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed.split_once(']').ok_or(EXPECTED)?;
        match after.strip_prefix(':') {
            Some(p) => (host, Some(p)),
            None if after.is_empty() => (host, None),
            None => return Err(EXPECTED.into()),
        }
    } else {
        match rest.split_once(':') {
            // More than one colon: an IPv6 address without brackets.
            Some((_, p)) if p.contains(':') => {
                return Err(format!(
                    "put an IPv6 address in brackets, e.g. [::1]:8500; {EXPECTED}"
                ))
            }
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let port = match (port, scheme) {
        (Some(p), _) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| EXPECTED.to_string())?,
        (None, "https") => 443,
        (None, "http") => 80,
        (None, _) => return Err(EXPECTED.into()),
    };
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ', '[', ']']) {
        return Err(EXPECTED.into());
    }
    Ok((
        https,
        Address::Tcp {
            host: host.to_string(),
            port,
        },
    ))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration from the TLS variables.
fn tls_config(
    get: &dyn Fn(&str) -> Option<String>,
    verify: bool,
    fail: &mut dyn FnMut(&'static str, &str, String),
) -> Option<ClientConfig> {
    let builder = match ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b,
        Err(e) => {
            fail(CONSUL_HTTP_SSL, "", format!("cannot set up TLS: {e}"));
            return None;
        }
    };
    let mut ok = true;
    let builder = if verify {
        let mut roots = RootCertStore::empty();
        let mut custom = false;
        if let Some(file) = get(CONSUL_CACERT) {
            custom = true;
            match CertificateDer::pem_file_iter(&file)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            {
                Ok(certs) if !certs.is_empty() => {
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        fail(
                            CONSUL_CACERT,
                            &file,
                            "no usable CA certificate in the file".into(),
                        );
                        ok = false;
                    }
                }
                Ok(_) => {
                    fail(
                        CONSUL_CACERT,
                        &file,
                        "expected a PEM file with CA certificates".into(),
                    );
                    ok = false;
                }
                Err(e) => {
                    fail(
                        CONSUL_CACERT,
                        &file,
                        format!("cannot read CA certificates: {e}"),
                    );
                    ok = false;
                }
            }
        }
        if let Some(dir) = get(CONSUL_CAPATH) {
            custom = true;
            match std::fs::read_dir(&dir) {
                Ok(entries) => {
                    let certs: Vec<_> = entries
                        .filter_map(|e| e.ok())
                        .filter(|e| e.path().is_file())
                        .filter_map(|e| CertificateDer::pem_file_iter(e.path()).ok())
                        .flat_map(|i| i.filter_map(|c| c.ok()))
                        .collect();
                    if roots.add_parsable_certificates(certs).0 == 0 && roots.is_empty() {
                        fail(
                            CONSUL_CAPATH,
                            &dir,
                            "no PEM CA certificate in the directory".into(),
                        );
                        ok = false;
                    }
                }
                Err(e) => {
                    fail(
                        CONSUL_CAPATH,
                        &dir,
                        format!("cannot read the directory: {e}"),
                    );
                    ok = false;
                }
            }
        }
        if !custom {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                // A slim image without a CA bundle: every handshake would fail later.
                fail(
                    CONSUL_CACERT,
                    "",
                    "HTTPS needs CA certificates and the system has none: set CONSUL_CACERT (or CONSUL_CAPATH)".into(),
                );
                ok = false;
            }
        }
        builder.with_root_certificates(roots)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    };
    let config = match (get(CONSUL_CLIENT_CERT), get(CONSUL_CLIENT_KEY)) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(&cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    if c.is_empty() {
                        Err("no certificate in the file".to_string())
                    } else {
                        Ok(c)
                    }
                });
            let certs = match certs {
                Ok(c) => Some(c),
                Err(e) => {
                    fail(
                        CONSUL_CLIENT_CERT,
                        &cert,
                        format!("cannot read the certificate: {e}"),
                    );
                    None
                }
            };
            let private = match PrivateKeyDer::from_pem_file(&key) {
                Ok(k) => Some(k),
                Err(e) => {
                    fail(
                        CONSUL_CLIENT_KEY,
                        &key,
                        format!("cannot read the private key: {e}"),
                    );
                    None
                }
            };
            let (Some(certs), Some(private)) = (certs, private) else {
                return None;
            };
            match builder.with_client_auth_cert(certs, private) {
                Ok(c) => c,
                Err(e) => {
                    fail(
                        CONSUL_CLIENT_KEY,
                        &key,
                        format!("the key does not fit the certificate: {e}"),
                    );
                    return None;
                }
            }
        }
        (Some(cert), None) => {
            fail(
                CONSUL_CLIENT_KEY,
                "",
                format!("required with CONSUL_CLIENT_CERT={cert}"),
            );
            return None;
        }
        (None, Some(key)) => {
            fail(
                CONSUL_CLIENT_CERT,
                "",
                format!("required with CONSUL_CLIENT_KEY={key}"),
            );
            return None;
        }
    };
    ok.then_some(config)
}

/// `CONSUL_HTTP_SSL_VERIFY=false`: accept any server certificate (signatures are still
/// checked, so the session keys belong to whoever holds the certificate's key).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<ClientSettings, Vec<EnvError>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_env(&move |name| map.get(name).cloned())
    }

    #[test]
    fn addresses_as_the_consul_cli_reads_them() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.url(), "http://127.0.0.1:8500");
        assert!(s.tls.is_none() && s.token.is_none());
        let s = parse(&[(CONSUL_HTTP_ADDR, "http://consul.local:8500/")]).unwrap();
        assert_eq!(
            s.addr,
            Address::Tcp {
                host: "consul.local".into(),
                port: 8500
            }
        );
        let s = parse(&[(CONSUL_HTTP_ADDR, "unix:///run/consul/http.sock")]).unwrap();
        assert_eq!(s.addr, Address::Unix("/run/consul/http.sock".into()));
        assert_eq!(s.url(), "unix:///run/consul/http.sock");
        let s = parse(&[(CONSUL_HTTP_ADDR, "[::1]:8500")]).unwrap();
        assert_eq!(s.url(), "http://[::1]:8500");
        // A scheme without a port means the scheme's port.
        let s = parse(&[(CONSUL_HTTP_ADDR, "http://consul.service")]).unwrap();
        assert_eq!(s.url(), "http://consul.service:80");
        // https:// or CONSUL_HTTP_SSL=true means TLS, verified against system roots.
        let s = parse(&[(CONSUL_HTTP_ADDR, "https://10.0.0.1:8501")]).unwrap();
        assert!(s.tls.as_ref().is_some_and(|t| t.verify));
        let s = parse(&[
            (CONSUL_HTTP_ADDR, "10.0.0.1:8501"),
            (CONSUL_HTTP_SSL, "true"),
            (CONSUL_HTTP_SSL_VERIFY, "false"),
            (CONSUL_TLS_SERVER_NAME, "server.dc1.consul"),
        ])
        .unwrap();
        let tls = s.tls.unwrap();
        assert!(!tls.verify);
        assert_eq!(
            tls.server_name,
            ServerName::try_from("server.dc1.consul").unwrap()
        );
    }

    #[test]
    fn every_bad_variable_is_reported() {
        let errors = parse(&[
            (CONSUL_HTTP_ADDR, "ftp://x:1"),
            (CONSUL_HTTP_SSL, "yes"),
            (CONSUL_HTTP_TOKEN_FILE, "/nonexistent/token"),
        ])
        .unwrap_err();
        let names: Vec<_> = errors.iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [CONSUL_HTTP_SSL, CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN_FILE]
        );
        let errors = parse(&[(CONSUL_HTTP_ADDR, "ftp://admin:hunter2@consul")]).unwrap_err();
        assert!(!errors[0].value.contains("hunter2"), "{errors:?}");
        for bad in [
            "nohost",
            "host:0",
            "host:99999",
            ":8500",
            "unix://",
            "::1",
            "[::1]",
            "fe80::1:8500",
        ] {
            assert!(
                parse(&[(CONSUL_HTTP_ADDR, bad)]).is_err(),
                "{bad} should be refused"
            );
        }
        let errors = parse(&[
            (CONSUL_HTTP_ADDR, "https://consul:8501"),
            (CONSUL_CACERT, "/nonexistent/ca.pem"),
            (CONSUL_CLIENT_CERT, "/nonexistent/cert.pem"),
        ])
        .unwrap_err();
        let names: Vec<_> = errors.iter().map(|e| e.name).collect();
        assert_eq!(names, [CONSUL_CACERT, CONSUL_CLIENT_KEY]);
    }

    #[test]
    fn the_token_file_wins_and_is_never_shown() {
        let path = std::env::temp_dir().join(format!("baton-token-{}", std::process::id()));
        std::fs::write(&path, "file-token\n").unwrap();
        let s = parse(&[
            (CONSUL_HTTP_TOKEN, "env-token"),
            (CONSUL_HTTP_TOKEN_FILE, path.to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!(s.token, Some(Secret("file-token".into())));
        assert!(!format!("{s:?}").contains("file-token"));
        let _ = std::fs::remove_file(&path);
        let s = parse(&[(CONSUL_HTTP_TOKEN, "env-token")]).unwrap();
        assert_eq!(s.token, Some(Secret("env-token".into())));
    }
}
