//! Kubeconfigs that carry their credentials inline, so one file is all a client needs.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use kube::config::{AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext};

/// Where a kubeconfig points and with which client certificate.
pub struct ClientCert<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

/// A kubeconfig with one cluster, user and context, all named `name`.
pub fn with_client_cert(name: &str, server: &str, ca_pem: &str, client: ClientCert<'_>) -> Kubeconfig {
    Kubeconfig {
        clusters: vec![NamedCluster {
            name: name.into(),
            cluster: Some(Cluster {
                server: Some(server.into()),
                certificate_authority_data: Some(STANDARD.encode(ca_pem)),
                ..Default::default()
            }),
            ..Default::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.into(),
            auth_info: Some(AuthInfo {
                client_certificate_data: Some(STANDARD.encode(client.cert_pem)),
                client_key_data: Some(STANDARD.encode(client.key_pem).into()),
                ..Default::default()
            }),
            ..Default::default()
        }],
        contexts: vec![NamedContext {
            name: name.into(),
            context: Some(Context { cluster: name.into(), user: Some(name.into()), ..Default::default() }),
            ..Default::default()
        }],
        current_context: Some(name.into()),
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        ..Default::default()
    }
}

/// Serializes a kubeconfig as YAML, the form kubectl users expect to read.
pub fn to_yaml(config: &Kubeconfig) -> String {
    serde_saphyr::to_string(config).expect("a kubeconfig always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_kubes_own_parser() {
        let yaml = to_yaml(&with_client_cert(
            "vk",
            "https://127.0.0.1:8443",
            "CA PEM",
            ClientCert { cert_pem: "CERT", key_pem: "KEY" },
        ));
        let parsed = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some("vk"));
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:8443"));
        assert_eq!(STANDARD.decode(cluster.certificate_authority_data.as_ref().unwrap()).unwrap(), b"CA PEM");
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(STANDARD.decode(user.client_certificate_data.as_ref().unwrap()).unwrap(), b"CERT");
    }
}
