//! ClusterIPs a tenant chooses by hand. The host copy of a Service carries the virtual one's
//! address, so a hand-picked address is taken on the host: it must be in the host's service
//! range and above that range's static band. The band holds the host's well-known addresses
//! (its DNS Service's, other tenants' hand-picked ones), which a tenant could otherwise take first.

use std::net::IpAddr;

use ipnet::IpNet;

/// The first addresses of a service range, which Kubernetes keeps for addresses chosen by hand
/// (the `kubernetes` Service's, the DNS Service's): min(max(16, size/16), 256) of them.
pub fn static_band(net: &IpNet) -> u128 {
    let bits = net.max_prefix_len() - net.prefix_len();
    let size: u128 = if bits >= 128 { u128::MAX } else { 1 << bits };
    if size < 16 { 0 } else { (size / 16).clamp(16, 256) }
}

/// The first address of `(field, ip)` that may not be taken on the host, and why, in the API
/// server's words (`spec.clusterIP: Invalid value: ...`). Empty and `None` (headless) are fine.
pub fn violation<'a>(ranges: &[IpNet], ips: impl IntoIterator<Item = (String, &'a str)>) -> Option<String> {
    for (field, ip) in ips {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        let Ok(addr) = ip.parse::<IpAddr>() else {
            return Some(format!("{field}: Invalid value: {ip:?}: not an IP address"));
        };
        if ranges.is_empty() {
            return Some(format!(
                "{field}: Invalid value: {ip:?}: this cluster takes no ClusterIP chosen by hand (the platform admin \
                 has not given it the host's service range); leave it empty to get one"
            ));
        }
        let Some(net) = ranges.iter().find(|n| n.contains(&addr)) else {
            let ranges: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            return Some(format!(
                "{field}: Invalid value: {ip:?}: not in this cluster's service range ({}); leave it empty to get one",
                ranges.join(", ")
            ));
        };
        let offset = match (addr, net.network()) {
            (IpAddr::V4(a), IpAddr::V4(n)) => u128::from(u32::from(a) - u32::from(n)),
            (IpAddr::V6(a), IpAddr::V6(n)) => u128::from(a) - u128::from(n),
            _ => 0,
        };
        if offset < static_band(net) {
            return Some(format!(
                "{field}: Invalid value: {ip:?}: the first {} addresses of {net} are reserved for the host's own \
                 Services; choose an address above them or leave it empty to get one",
                static_band(net)
            ));
        }
    }
    None
}

/// The `(field, ip)` pairs of a Service spec's hand-picked addresses.
pub fn of<'a>(cluster_ip: Option<&'a str>, cluster_ips: &'a [String]) -> impl Iterator<Item = (String, &'a str)> {
    let chosen = cluster_ip.map(|ip| ("spec.clusterIP".to_string(), ip));
    let listed = cluster_ips.iter().enumerate().map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.as_str()));
    chosen.into_iter().chain(listed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_chosen_cluster_ips_stay_out_of_the_static_band() {
        let ranges: Vec<IpNet> = vec!["10.96.0.0/16".parse().unwrap(), "fd00:10:96::/112".parse().unwrap()];
        let ok: Option<&str> = None;
        for (ip, ips, expected) in [
            (None, vec![], ok),
            (Some(""), vec![], None),
            (Some("None"), vec![], None),
            (Some("10.96.1.0"), vec![], None),
            (Some("10.96.200.7"), vec!["10.96.200.7", "fd00:10:96::1000"], None),
            (Some("10.96.0.10"), vec![], Some("spec.clusterIP: Invalid value: \"10.96.0.10\": the first 256")),
            (Some("10.96.0.1"), vec![], Some("spec.clusterIP: Invalid value: \"10.96.0.1\"")),
            (Some("10.96.0.255"), vec![], Some("reserved")),
            (None, vec!["10.96.5.5", "fd00:10:96::a"], Some("spec.clusterIPs[1]")),
            (None, vec!["10.96.0.10"], Some("spec.clusterIPs[0]")),
            (Some("10.0.0.10"), vec![], Some("not in this cluster's service range (10.96.0.0/16, fd00:10:96::/112)")),
            (Some("kube-dns"), vec![], Some("not an IP address")),
        ] {
            let ips: Vec<String> = ips.into_iter().map(String::from).collect();
            let got = violation(&ranges, of(ip, &ips));
            match expected {
                None => assert_eq!(got, None, "{ip:?} {ips:?}"),
                Some(needle) => assert!(got.as_ref().is_some_and(|e| e.contains(needle)), "{ip:?} {ips:?}: {got:?}"),
            }
        }
        assert!(violation(&[], of(Some("10.96.1.0"), &[])).is_some(), "no range known: no hand-picked address");
    }

    #[test]
    fn static_band_follows_kubernetes() {
        for (cidr, band) in [
            ("10.96.0.0/16", 256),
            ("10.96.0.0/24", 16),
            ("10.96.0.0/20", 256),
            ("10.96.0.0/22", 64),
            ("10.96.0.0/29", 0),
            ("fd00::/64", 256),
        ] {
            assert_eq!(static_band(&cidr.parse().unwrap()), band, "{cidr}");
        }
    }
}
