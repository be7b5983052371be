//! Certificates for a control plane, generated with rcgen.
//!
//! Pure: nothing here reads or writes files or talks to a cluster. A [`Bundle`] is a set of named
//! PEM files (`ca.crt`, `ca.key`, `apiserver.crt`, ...) that callers store where they like (a host
//! Secret, a directory). [`Bundle::ensure`] creates whatever is missing and renews leaf
//! certificates that expire within the renewal margin or no longer match their specification, so
//! running it at every start is how certificates are kept valid.

pub mod kubeconfig;
mod pod_key;

pub use pod_key::pod_key;

use std::collections::BTreeMap;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
pub use time::{Duration, OffsetDateTime};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating certificate {name}: {source}")]
    Generate { name: String, source: rcgen::Error },
    #[error("stored certificate {name} cannot be read: {reason}")]
    Corrupt { name: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long certificates live. Leaves are renewed once less than `renew_before` is left.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub ca: Duration,
    pub leaf: Duration,
    pub renew_before: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Validity { ca: Duration::days(3650), leaf: Duration::days(365), renew_before: Duration::days(90) }
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// The specification of one leaf certificate, signed by the CA named `issuer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafSpec {
    /// File stem: the bundle holds `<name>.crt` and `<name>.key`.
    pub name: String,
    pub issuer: String,
    pub common_name: String,
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub usage: Usage,
}

impl LeafSpec {
    /// A client certificate for user `common_name` in group `organization` (Kubernetes reads
    /// O as groups; rcgen writes at most one O per subject, which is all vkube needs).
    pub fn client(name: &str, issuer: &str, common_name: &str, organization: Option<&str>) -> Self {
        LeafSpec {
            name: name.into(),
            issuer: issuer.into(),
            common_name: common_name.into(),
            organizations: organization.iter().map(|o| o.to_string()).collect(),
            dns_names: vec![],
            ips: vec![],
            usage: Usage::Client,
        }
    }

    pub fn server(name: &str, issuer: &str, dns_names: &[String], ips: &[IpAddr]) -> Self {
        LeafSpec {
            name: name.into(),
            issuer: issuer.into(),
            common_name: dns_names.first().cloned().unwrap_or_else(|| name.into()),
            organizations: vec![],
            dns_names: dns_names.to_vec(),
            ips: ips.to_vec(),
            usage: Usage::Server,
        }
    }
}

/// The names in-cluster clients use for the API server, which every serving certificate of an
/// API server must carry (with the cluster domain `cluster.local`).
pub fn api_server_names() -> Vec<String> {
    ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// What a bundle must contain: CAs (by file stem), leaves, and bare key pairs (service-account
/// signing keys: `<name>.key` and `<name>.pub`).
#[derive(Clone, Debug, Default)]
pub struct BundleSpec {
    pub cas: Vec<(String, String)>,
    pub leaves: Vec<LeafSpec>,
    pub key_pairs: Vec<String>,
}

/// Named PEM files. Keys are file names such as `ca.crt`; values are PEM text.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bundle {
    pub files: BTreeMap<String, String>,
}

/// What [`Bundle::ensure`] changed, by file stem, for logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub created: Vec<String>,
    pub renewed: Vec<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.renewed.is_empty()
    }
}

impl Bundle {
    pub fn get(&self, file: &str) -> Option<&str> {
        self.files.get(file).map(String::as_str)
    }

    /// Creates what is missing and renews leaves that expire within `validity.renew_before` or
    /// whose names or subject differ from the spec. CAs are never replaced: that would invalidate
    /// every kubeconfig handed out.
    pub fn ensure(&mut self, spec: &BundleSpec, validity: Validity, now: OffsetDateTime) -> Result<Changes> {
        let mut changes = Changes::default();
        for (name, common_name) in &spec.cas {
            if self.files.contains_key(&crt(name)) && self.files.contains_key(&key(name)) {
                continue;
            }
            let (cert, key_pem) = new_ca(name, common_name, validity, now)?;
            self.files.insert(crt(name), cert);
            self.files.insert(key(name), key_pem);
            changes.created.push(name.clone());
        }
        for name in &spec.key_pairs {
            if self.files.contains_key(&key(name)) && self.files.contains_key(&format!("{name}.pub")) {
                continue;
            }
            let pair = KeyPair::generate().map_err(|source| Error::Generate { name: name.clone(), source })?;
            self.files.insert(key(name), pair.serialize_pem());
            self.files.insert(format!("{name}.pub"), pair.public_key_pem());
            changes.created.push(name.clone());
        }
        for leaf in &spec.leaves {
            let current = match (self.files.get(&crt(&leaf.name)), self.files.get(&key(&leaf.name))) {
                (Some(c), Some(_)) => Some(leaf_status(c, leaf, self.get(&crt(&leaf.issuer)), validity, now)?),
                _ => None,
            };
            if current == Some(LeafStatus::Valid) {
                continue;
            }
            let (cert, key_pem) = self.issue(leaf, validity, now)?;
            self.files.insert(crt(&leaf.name), cert);
            self.files.insert(key(&leaf.name), key_pem);
            match current {
                None => changes.created.push(leaf.name.clone()),
                Some(_) => changes.renewed.push(leaf.name.clone()),
            }
        }
        Ok(changes)
    }

    /// A new certificate and key (PEM) for `leaf`, signed by its issuer in this bundle, valid from
    /// `now` for `validity.leaf`; the bundle itself is left as it is.
    pub fn issue(&self, leaf: &LeafSpec, validity: Validity, now: OffsetDateTime) -> Result<(String, String)> {
        let err = |source| Error::Generate { name: leaf.name.clone(), source };
        let corrupt = |reason: &str| Error::Corrupt { name: leaf.issuer.clone(), reason: reason.into() };
        let ca_cert = self.get(&crt(&leaf.issuer)).ok_or_else(|| corrupt("CA certificate missing"))?;
        let ca_key = self.get(&key(&leaf.issuer)).ok_or_else(|| corrupt("CA key missing"))?;
        let ca_key = KeyPair::from_pem(ca_key).map_err(|e| corrupt(&e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(ca_cert, ca_key).map_err(|e| corrupt(&e.to_string()))?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, leaf.common_name.as_str());
        for org in &leaf.organizations {
            params.distinguished_name.push(DnType::OrganizationName, org.as_str());
        }
        for dns in &leaf.dns_names {
            params.subject_alt_names.push(SanType::DnsName(dns.clone().try_into().map_err(err)?));
        }
        for ip in &leaf.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![match leaf.usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + validity.leaf;
        let pair = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&pair, &issuer).map_err(err)?;
        Ok((cert.pem(), pair.serialize_pem()))
    }
}

fn crt(name: &str) -> String {
    format!("{name}.crt")
}

fn key(name: &str) -> String {
    format!("{name}.key")
}

fn new_ca(name: &str, common_name: &str, validity: Validity, now: OffsetDateTime) -> Result<(String, String)> {
    let err = |source| Error::Generate { name: name.into(), source };
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + validity.ca;
    let pair = KeyPair::generate().map_err(err)?;
    let cert = params.self_signed(&pair).map_err(err)?;
    Ok((cert.pem(), pair.serialize_pem()))
}

#[derive(Debug, PartialEq, Eq)]
enum LeafStatus {
    Valid,
    Stale,
}

/// A stored leaf is stale when it expires soon, names other subjects or SANs than its spec, or
/// was not signed by the current CA (e.g. a CA restored from elsewhere).
fn leaf_status(
    cert_pem: &str,
    spec: &LeafSpec,
    ca_pem: Option<&str>,
    validity: Validity,
    now: OffsetDateTime,
) -> Result<LeafStatus> {
    let info = CertInfo::parse(cert_pem).map_err(|reason| Error::Corrupt { name: spec.name.clone(), reason })?;
    if info.not_after - now < validity.renew_before {
        return Ok(LeafStatus::Stale);
    }
    let mut want_dns = spec.dns_names.clone();
    want_dns.sort();
    let mut want_ips = spec.ips.clone();
    want_ips.sort();
    let mut orgs = spec.organizations.clone();
    orgs.sort();
    if info.common_name != spec.common_name
        || info.organizations != orgs
        || info.dns_names != want_dns
        || info.ips != want_ips
    {
        return Ok(LeafStatus::Stale);
    }
    if let Some(ca_pem) = ca_pem {
        let ca = CertInfo::parse(ca_pem).map_err(|reason| Error::Corrupt { name: spec.issuer.clone(), reason })?;
        if ca.subject_key_id.is_some() && ca.subject_key_id != info.authority_key_id {
            return Ok(LeafStatus::Stale);
        }
    }
    Ok(LeafStatus::Valid)
}

/// The parts of a certificate vkube reads back: identity, names and expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: String,
    /// Sorted.
    pub organizations: Vec<String>,
    /// Sorted.
    pub dns_names: Vec<String>,
    /// Sorted.
    pub ips: Vec<IpAddr>,
    pub not_after: OffsetDateTime,
    subject_key_id: Option<Vec<u8>>,
    authority_key_id: Option<Vec<u8>>,
}

impl CertInfo {
    /// Parses the first certificate of a PEM text.
    pub fn parse(pem: &str) -> Result<Self, String> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        Self::from_der(&pem.contents)
    }

    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let subject = cert.subject();
        let common_name =
            subject.iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
        let mut organizations: Vec<String> =
            subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
        organizations.sort();
        let (mut dns_names, mut ips) = (vec![], vec![]);
        let (mut subject_key_id, mut authority_key_id) = (None, None);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                            GeneralName::IPAddress(b) => {
                                if let Ok(a) = <[u8; 4]>::try_from(*b) {
                                    ips.push(IpAddr::from(a));
                                } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                                    ips.push(IpAddr::from(a));
                                }
                            }
                            _ => {}
                        }
                    }
                }
                ParsedExtension::SubjectKeyIdentifier(id) => subject_key_id = Some(id.0.to_vec()),
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    authority_key_id = aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => {}
            }
        }
        dns_names.sort();
        ips.sort();
        let not_after = cert.validity().not_after.to_datetime();
        Ok(CertInfo { common_name, organizations, dns_names, ips, not_after, subject_key_id, authority_key_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dns: &[&str]) -> BundleSpec {
        BundleSpec {
            cas: vec![("ca".into(), "test-ca".into())],
            leaves: vec![
                LeafSpec::server(
                    "serving",
                    "ca",
                    &dns.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                    &["127.0.0.1".parse().unwrap()],
                ),
                LeafSpec::client("admin", "ca", "admin", Some("system:masters")),
            ],
            key_pairs: vec!["sa".into()],
        }
    }

    #[test]
    fn ensure_creates_everything_then_nothing() {
        let now = OffsetDateTime::now_utc();
        let mut b = Bundle::default();
        let c = b.ensure(&spec(&["localhost"]), Validity::default(), now).unwrap();
        assert_eq!(c.created, vec!["ca", "sa", "serving", "admin"]);
        for f in ["ca.crt", "ca.key", "serving.crt", "serving.key", "admin.crt", "admin.key", "sa.key", "sa.pub"] {
            assert!(b.get(f).is_some(), "{f} missing");
        }
        let before = b.clone();
        let c = b.ensure(&spec(&["localhost"]), Validity::default(), now).unwrap();
        assert!(c.is_empty(), "{c:?}");
        assert_eq!(b, before);
    }

    #[test]
    fn leaves_carry_identity_and_names() {
        let now = OffsetDateTime::now_utc();
        let mut b = Bundle::default();
        b.ensure(&spec(&["localhost", "vk.example"]), Validity::default(), now).unwrap();
        let admin = CertInfo::parse(b.get("admin.crt").unwrap()).unwrap();
        assert_eq!(admin.common_name, "admin");
        assert_eq!(admin.organizations, vec!["system:masters"]);
        let serving = CertInfo::parse(b.get("serving.crt").unwrap()).unwrap();
        assert_eq!(serving.dns_names, vec!["localhost", "vk.example"]);
        assert_eq!(serving.ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(serving.not_after > now + Duration::days(364));
    }

    #[test]
    fn leaves_expiring_soon_are_renewed_but_the_ca_is_kept() {
        let issued = OffsetDateTime::now_utc();
        let mut b = Bundle::default();
        b.ensure(&spec(&["localhost"]), Validity::default(), issued).unwrap();
        let ca = b.get("ca.crt").unwrap().to_string();
        let old = b.get("serving.crt").unwrap().to_string();
        // 300 days later, 65 days are left: within the 90-day margin.
        let later = issued + Duration::days(300);
        let c = b.ensure(&spec(&["localhost"]), Validity::default(), later).unwrap();
        assert_eq!(c.renewed, vec!["serving", "admin"]);
        assert_eq!(b.get("ca.crt").unwrap(), ca);
        assert_ne!(b.get("serving.crt").unwrap(), old);
        let renewed = CertInfo::parse(b.get("serving.crt").unwrap()).unwrap();
        assert!(renewed.not_after > later + Duration::days(364));
    }

    #[test]
    fn a_changed_name_list_reissues_the_serving_cert() {
        let now = OffsetDateTime::now_utc();
        let mut b = Bundle::default();
        b.ensure(&spec(&["localhost"]), Validity::default(), now).unwrap();
        let c = b.ensure(&spec(&["localhost", "new.example"]), Validity::default(), now).unwrap();
        assert_eq!(c.renewed, vec!["serving"]);
    }

    #[test]
    fn a_replaced_ca_reissues_its_leaves() {
        let now = OffsetDateTime::now_utc();
        let mut b = Bundle::default();
        b.ensure(&spec(&["localhost"]), Validity::default(), now).unwrap();
        let mut other = Bundle::default();
        other.ensure(&spec(&["localhost"]), Validity::default(), now).unwrap();
        b.files.insert("ca.crt".into(), other.files["ca.crt"].clone());
        b.files.insert("ca.key".into(), other.files["ca.key"].clone());
        let c = b.ensure(&spec(&["localhost"]), Validity::default(), now).unwrap();
        assert_eq!(c.renewed, vec!["serving", "admin"]);
    }

    #[test]
    fn garbage_is_reported_not_silently_replaced() {
        let now = OffsetDateTime::now_utc();
        let mut b = Bundle::default();
        b.ensure(&spec(&["localhost"]), Validity::default(), now).unwrap();
        b.files.insert("serving.crt".into(), "not a certificate".into());
        assert!(matches!(b.ensure(&spec(&["localhost"]), Validity::default(), now), Err(Error::Corrupt { .. })));
    }
}
