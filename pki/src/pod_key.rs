//! A pod's key for a podCertificate projection, made as a kubelet makes it: a fresh private key
//! of the projection's `keyType` (PKCS#8 PEM, what the pod reads) and a stub PKCS#10 request,
//! empty but signed by that key, which proves possession to the signer.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SignatureAlgorithm};

/// The algorithm of a podCertificate `keyType`, if rcgen can make such keys here (the RSA types
/// and ECDSAP521 need a crypto backend this build does not have).
fn algorithm(key_type: &str) -> Option<&'static SignatureAlgorithm> {
    match key_type {
        "ECDSAP256" => Some(&rcgen::PKCS_ECDSA_P256_SHA256),
        "ECDSAP384" => Some(&rcgen::PKCS_ECDSA_P384_SHA384),
        "ED25519" => Some(&rcgen::PKCS_ED25519),
        _ => None,
    }
}

/// A new key of `key_type`: (private key as PKCS#8 PEM, stub PKCS#10 request as DER).
pub fn pod_key(key_type: &str) -> Result<(String, Vec<u8>), String> {
    let alg = algorithm(key_type).ok_or_else(|| format!("key type {key_type} is not supported"))?;
    let key = KeyPair::generate_for(alg).map_err(|e| format!("generating a {key_type} key: {e}"))?;
    // Empty, as the kubelet's: signers take nothing from it but the key.
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| format!("signing the stub request: {e}"))?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn the_request_carries_the_keys_public_half_and_nothing_else() {
        for key_type in ["ECDSAP256", "ECDSAP384", "ED25519"] {
            let (pem, der) = pod_key(key_type).unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "PKCS#8: {pem}");
            let key = KeyPair::from_pem(&pem).unwrap();
            // Parsing checks the request's signature.
            let csr = rcgen::CertificateSigningRequestParams::from_der(&der.into()).unwrap();
            assert_eq!(csr.public_key.der_bytes(), key.der_bytes(), "{key_type}");
            assert_eq!(csr.params.distinguished_name.iter().count(), 0, "an empty subject");
            assert!(csr.params.subject_alt_names.is_empty());
        }
        assert!(pod_key("RSA3072").unwrap_err().contains("not supported"));
    }
}
